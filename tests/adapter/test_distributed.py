"""Data-parallel training of CGCModel: DDP and FSDP2 (fully_shard) over gloo, 2 CPU processes under
torchrun. The worker (tests/distributed_worker.py) runs one step on each rank's half of a mixed-task
batch and compares the synchronized gradients with a single-process step on the whole batch; this
test launches it on a free port with a timeout and checks its report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("dist") / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a hung collective?):\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _check(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["n_grads"] > 0 and not result["missing"], result
    assert not result["mismatched"], f"gradients differ from a single-process step: {result}"
    assert result["max_grad"] > 1e-3  # gradients are not trivially zero
    assert result["ranks_agree_after_step"], "ranks hold different adapter weights after one step"


def test_ddp_gradients_equal_single_process_step(report):
    assert report["world"] == 2
    _check(report["ddp"])


def test_broadcast_adapter_gives_every_rank_rank0s_adapter(report):
    result = report["broadcast"]
    assert "error" not in result, result.get("error")
    assert result["differed_before"] and result["sent"] == result["n_trainable"] > 0, result
    assert result["agree_after"] and result["equal_rank0"], result


def test_fsdp2_gradients_equal_single_process_step(report):
    if "skipped" in report["fsdp2"]:
        pytest.skip(report["fsdp2"]["skipped"])
    _check(report["fsdp2"])
    saved = report["fsdp2"]["saved_equals_single_step"]  # unshard, save on rank 0, load in one process
    assert saved["n_grads"] > 0 and not saved["missing"] and not saved["mismatched"], saved
