"""The `cgc-lora train` command, CGCTrainer and TRL's SFTTrainer (CGCSFTTrainer) the way users
scale out: 2 CPU processes (gloo) under `accelerate launch` (DDP and FSDP2 configs, written here
with `use_cpu: true`; DeepSpeed ZeRO-2 and ZeRO-3 where deepspeed is installed) and `torchrun`.

Each launch runs tests/launch_worker.py (the command, then a CGCTrainer script and a CGCSFTTrainer
script with no distributed code) or the command itself, through tests/launch_shim.py, which records which rank saves an
adapter or commits an output folder, and lets accelerate's FSDP config run on CPU processes (see
there). Checked against the same runs in this one process at twice the per-device batch:

* one writer: only rank 0 saves adapters or commits the output, each output is committed once;
* the same adapter: a 2-process run at batch B equals a 1-process run at batch 2B (same seed) to
  float tolerance: the experts start equal and every step sees the same examples;
* FSDP2 through accelerate: every task gate and every decoder block is a group of its own, and
  the adapter is sharded (DTensors);
* --resume under a launcher from the 2-process run's checkpoint-1 ends where that run ended.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from cgc_kernels.cli import main
from cgc_kernels.data import demo_tasks
from tests.cases import TOLERANCES
from tests.launch_worker import STEPS, command_argv, train_cgctrainer, train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIM = os.path.join(ROOT, "tests", "launch_shim.py")
WORKER = os.path.join(ROOT, "tests", "launch_worker.py")
TIMEOUT_S = 400
SCRIPTS = {"trainer": train_cgctrainer, "sft": train_sft}  # the user scripts the worker runs after the command
BATCH = 4  # per process; the single-process runs take 2 x BATCH
# Two AdamW steps: the all-reduce sums gradients in another order than one process does, and Adam
# divides each gradient by its own running size, so a rounding difference in a near-zero gradient
# grows to ~1e-9 of a float64 weight (measured up to 3.7e-9; CGCSFTTrainer: 6.1e-8, TRL scores the
# labels in float32 whatever the model's dtype); float32 runs: up to 5.7e-7. Without
# the same initial experts on every launch the adapters differed by 0.35.
TOLERANCE = {torch.float64: dict(atol=5e-8, rtol=1e-6), torch.float32: TOLERANCES[torch.float32]}

CONFIGS = {
    "ddp": {"distributed_type": "MULTI_GPU"},
    "fsdp2": {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_reshard_after_forward": True, "fsdp_cpu_ram_efficient_loading": False}},
}
for stage in (2, 3):
    CONFIGS[f"zero{stage}"] = {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": stage, "offload_optimizer_device": "none", "offload_param_device": "none",
        "gradient_accumulation_steps": 1, "zero3_init_flag": False}}
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = [e for e in CONFIGS if DEEPSPEED or not e.startswith("zero")]

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, engine: str) -> str:
    """An accelerate config file: 2 processes, CPU, the engine's settings (YAML is a superset of JSON)."""
    config = {"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "num_processes": 2, "machine_rank": 0,
              "mixed_precision": "no", "use_cpu": True, **CONFIGS[engine]}
    path.write_text(json.dumps(config))
    return str(path)


def launch(tmp, name: str, launcher: list[str], target: list[str]) -> list[str]:
    """Run `launcher + shim + target` on 2 CPU processes; return the writes the shim recorded."""
    writers = tmp / f"{name}.writers"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", CGC_TEST_WRITERS=str(writers),
               DS_ACCELERATOR="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [*launcher, SHIM, *target]
    try:
        proc = subprocess.run(cmd, cwd=str(tmp), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{name}: the launch did not finish in {TIMEOUT_S} s (a hung collective?):\n{e.stderr}")
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return writers.read_text().splitlines() if writers.exists() else []


def accelerate(tmp, engine: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            write_config(tmp / f"{engine}.yaml", engine), "--main_process_port", str(free_port())]


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


def adapter(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "cgc_adapter.safetensors"))


def largest_difference(got_dir, want_dir) -> float:
    """The largest difference between two saved adapters (same tensors), asserting float tolerance."""
    got, want = adapter(got_dir), adapter(want_dir)
    assert got.keys() == want.keys()
    worst = 0.0
    for k, w in want.items():
        assert torch.allclose(got[k], w, **TOLERANCE[w.dtype]), (k, float((got[k] - w).abs().max()))
        worst = max(worst, float((got[k] - w).abs().max()))
    assert any(float(w.abs().max()) > 0 for k, w in want.items() if "_b[" in k)  # B moved off its zero init
    return worst


def writer_ranks(writes: list[str], out) -> dict[str, set[str]]:
    """{"save": ranks that saved an adapter under out's folder, "commit": ranks that committed out}."""
    final = os.path.realpath(out)
    parent = os.path.dirname(final)
    ranks: dict[str, set[str]] = {"save": set(), "commit": set()}
    for line in writes:
        rank, what, path = line.split(" ", 2)
        if what == "commit" and path == final:
            ranks["commit"].add(rank)
        if what == "save" and os.path.dirname(path.split(os.sep + "checkpoints")[0]) == parent \
                and os.path.basename(path.split(os.sep + "checkpoints")[0]).startswith(f".{os.path.basename(final)}."):
            ranks["save"].add(rank)  # into the staging folder .NAME.XXXX.partial (or its checkpoints)
    return ranks


def trainer_dtype(engine: str) -> str:
    return "float32" if engine.startswith("zero") else "float64"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, then the DDP and FSDP2 launches of the worker."""
    tmp = tmp_path_factory.mktemp("launch")
    data = tmp / "rows.jsonl"  # 8 rows of each of two demo tasks: 2 steps of 8 rows
    with open(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[0]), encoding="utf-8") as f:
        by_task: dict[str, list[str]] = {}
        for line in f:
            by_task.setdefault(json.loads(line)["task"], []).append(line)
    data.write_text("".join(line for t in sorted(by_task)[:2] for line in by_task[t][:8]))
    single = tmp / "single"
    assert main(command_argv(str(data), str(single / "cmd"), 2 * BATCH)) == 0
    for dtype in ("float64", "float32") if DEEPSPEED else ("float64",):
        for part, train in SCRIPTS.items():
            train(str(data), str(single / f"{part}_{dtype}"), 2 * BATCH, dtype)
    out = {"tmp": tmp, "data": data, "single": single}
    for engine in ENGINES:
        report = tmp / f"{engine}.json"
        writes = launch(tmp, engine, accelerate(tmp, engine),
                        [WORKER, "--data", str(data), "--out", str(tmp / engine), "--batch-size", str(BATCH),
                         "--report", str(report), "--trainer-dtype", trainer_dtype(engine)])
        out[engine] = dict(report=json.loads(report.read_text()), writes=writes)
    return out


@pytest.mark.parametrize("engine", list(CONFIGS))
def test_two_processes_train_the_single_process_adapter_with_one_writer(runs, engine):
    if engine not in ENGINES:
        pytest.skip("deepspeed is not installed (tried: docs/distributed.md, DeepSpeed ZeRO)")
    run, tmp = runs[engine], runs["tmp"]
    assert run["report"]["command_rc"] == 0 and run["report"]["world_size"] == 2, run["report"]
    assert run["report"]["fsdp"] == (engine == "fsdp2")
    assert run["report"]["deepspeed"] == engine.startswith("zero")
    assert run["report"]["sft_world_size"] == 2 and run["report"]["sft_fsdp"] == (engine == "fsdp2"), run["report"]
    reference = {"cmd": "cmd", **{part: f"{part}_{trainer_dtype(engine)}" for part in SCRIPTS}}
    for part, want in reference.items():
        diff = largest_difference(tmp / engine / part, runs["single"] / want)
        print(f"{engine} {part}: largest difference from the single-process adapter {diff:.3g}")
    ranks = writer_ranks(run["writes"], tmp / engine / "cmd")
    assert ranks == {"save": {"0"}, "commit": {"0"}}, run["writes"]
    assert sum(line.endswith(os.sep + "cmd") and " commit " in line for line in run["writes"]) == 1
    for part in SCRIPTS:  # CGCTrainer, CGCSFTTrainer: checkpoints and save_model
        saves = [line.split()[0] for line in run["writes"] if f"{os.sep}{engine}{os.sep}{part}" in line]
        assert set(saves) == {"0"} and len(saves) == 1 + STEPS, run["writes"]
    # the per-rank files transformers writes went into the one staging folder, now the output
    assert sorted(os.listdir(tmp / engine / "cmd" / "checkpoints" / "checkpoint-1")).count("rng_state_1.pth") == 1


def test_fsdp2_shards_the_adapter_with_gates_and_blocks_alone(runs):
    facts = runs["fsdp2"]["report"]
    assert facts["gates"] > 0 and facts["gates_sharded_alone"] == facts["gates"], facts
    assert facts["blocks"] > 0 and facts["blocks_sharded_alone"] == facts["blocks"], facts
    assert facts["adapter_dtensors"], facts


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_resume_under_a_launcher_ends_where_the_run_ended(runs, engine):
    tmp = runs["tmp"]
    resumed = tmp / f"{engine}_resumed"
    checkpoint = tmp / engine / "cmd" / "checkpoints" / "checkpoint-1"
    launcher = torchrun() if engine == "ddp" else accelerate(tmp, engine)  # both launchers get a run
    argv = command_argv(str(runs["data"]), str(resumed), BATCH, "--resume", str(checkpoint))
    writes = launch(tmp, f"{engine}_resume", launcher, ["-m", "cgc_kernels.cli", *argv])
    diff = largest_difference(resumed, tmp / engine / "cmd")
    print(f"{engine} --resume: largest difference from the uninterrupted run {diff:.3g}")
    assert writer_ranks(writes, resumed) == {"save": {"0"}, "commit": {"0"}}, writes


def test_a_launch_whose_trainer_runs_each_process_alone_is_refused(monkeypatch):
    from cgc_kernels.cli.launcher import check_launch, is_main_process, launch_world
    from cgc_kernels.data.reader import UserError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_world() == (1, 2) and not is_main_process()
    with pytest.raises(UserError, match="launched as 2 processes.*world size 1.*ACCELERATE_USE_CPU=true"):
        check_launch(1)  # each process would train on all the data and write alone
    check_launch(2)
