"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps end to end on CPU, offline, so its plumbing
(preflight, the compile step's bookkeeping, order, time limits, what comes back, the summary) is proven
on every commit: in .venv with Triton's interpreter, and in the GPU image's twin (.venv-gpu-twin:
Triton 3.6 with numpy 2.5, where the interpreter cannot run) with the kernels stubbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_variants

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable, PIP_NO_INDEX="1")
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                          "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["key"]: s for s in summary["steps"]}
    assert list(steps) == ["pre", "warm", "a", "b", "c", "d", "e", "f"]
    assert all(s["status"] in ("pass", "skip") for s in steps.values()), [
        (s["key"], s["status"], s["detail"]) for s in steps.values()]
    assert {k for k, s in steps.items() if s["status"] == "pass"} >= {"pre", "warm", "a", "b", "c", "f"}
    # the GPU plan: one 10-minute command holds it with the machine's start
    plan = gpu_check.plan(dry=False)
    assert sum(s.limit_s for s in plan) <= gpu_check.TOTAL_LIMIT_S and sum(s.planned_s for s in plan) <= 7 * 60
    # preflight: every required import, the compiler and Python.h found
    assert steps["pre"]["numbers"]["failed"] == 0
    # the compile step resolved every recorded variant against the kernels as they are now
    compiled = json.loads((out / "compile.json").read_text())
    manifest = json.loads(gpu_variants.MANIFEST.read_text())["variants"]
    assert compiled["variants"] == len(manifest) > 0 and compiled["errors"] == 0, compiled["first_errors"]
    smoke = json.loads((out / "smoke.json").read_text())
    assert len(smoke["rows"]) == 2
    if "stubbed" in summary["mode"]:  # the host side ran and launched kernels; nothing computed
        assert all(sum(r["launches"].values()) > 0 for r in smoke["rows"])
    else:
        assert all(r["worst_ratio"] <= 1.0 for r in smoke["rows"])
    results = json.loads((out / "cgc-results-ci.json").read_text())
    assert results["results"] and results["environment"]["copy_bandwidth_bytes_per_s"] > 0
    assert (out / "ci.md").read_text().strip() and (out / "ci.png").exists()
    # the extra training rows (the torch backend's in the rehearsal), each read against the same case
    # at p = 0, r = 8: the time ratios in the summary are those of the results JSON's rows
    full = {r["case"]: r["median_s"] for r in results["results"] if (r["level"], r["mode"], r["provider"]) == (
        "op", "full", "torch")}
    assert set(full) == {"M256-128x128-T4-S2K1r8-uniform", "M256-128x128-T4-S2K1r8-uniform-drop0.1",
                         "M256-128x128-T4-S2K1r32-uniform"}, set(full)
    base = full["M256-128x128-T4-S2K1r8-uniform"]
    assert steps["c"]["numbers"]["op full M256-128x128 torch p=0.1 / base time"] == round(
        full["M256-128x128-T4-S2K1r8-uniform-drop0.1"] / base, 2)
    assert steps["c"]["numbers"]["op full M256-128x128 torch S2K1r32 / base time"] == round(
        full["M256-128x128-T4-S2K1r32-uniform"] / base, 2)
    # the decode row: compiled (dynamo's eager backend on CPU) and eager decode agree
    decode = steps["f"]["numbers"]
    assert decode["same tokens"] is True and decode["eager tok/s"] > 0 and decode["compiled tok/s"] > 0
    # what comes back from the device: at most 8 files of at most 16 MiB, the logs in one tarball
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files), files
    assert summary["returned"]["fits"] and summary["returned"]["count"] == len(files)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{k}.log" for k in ("pre", "warm", "a", "b", "c", "e", "f")} | {"logs/decode.json"} <= names
    # the summary table is the last thing printed
    assert res.stdout.rstrip().splitlines()[-1].startswith("| f |")


def test_the_large_rank_row_takes_the_largest_kernel_tier():
    """Step c's r = 32 row exists to time the kernels' largest rank tier: its padded rank is beyond
    every smaller tier of the forward and backward tables (bf16, the GPU sweep's dtype)."""
    from benchmarks.cases import cases
    from cgc_kernels.op.triton import backward, common, forward

    (case,) = [c for c in cases("gpu") if c.name.endswith(gpu_check.EXTRA_CASES[1])]
    size = common.rank_size(case.S * case.r, case.K * case.r)
    for table in (forward.FORWARD_BLOCKS["half"], backward.BACKWARD_BLOCKS["half"]):
        assert table[-2][0] < size <= table[-1][0], (size, [limit for limit, _ in table])


def test_a_timed_out_step_kills_its_whole_process_group(tmp_path):
    (tmp_path / "logs").mkdir()
    pid_file = tmp_path / "child.pid"
    # a parent that starts a long-lived child (as pytest starts xdist workers) and waits
    script = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    step = gpu_check.Step("x", "sleeper", 1, 3)
    t0 = time.monotonic()
    rc = gpu_check._run(step, [sys.executable, "-c", script], tmp_path, dict(os.environ))
    assert rc is None and step.status == "timeout" and time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the child was killed with the group (give the kernel a moment to reap it)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{child}/stat") as f:
            assert f.read().split()[2] == "Z", "the child outlived the step's limit"


def test_variant_keys_follow_tritons_specialization():
    def v(**args):
        return dict(kernel="m:k", args=args, options={"num_warps": 4})

    same = [v(n=["i", 48], x=["t", "bfloat16", True]), v(n=["i", 4096], x=["t", "bfloat16", True])]
    assert gpu_variants.variant_key(same[0]) == gpu_variants.variant_key(same[1])  # both divisible by 16
    for other in (v(n=["i", 1], x=["t", "bfloat16", True]), v(n=["i", 33], x=["t", "bfloat16", True]),
                  v(n=["i", 48], x=["t", "float32", True]), v(n=["i", 48], x=["t", "bfloat16", False])):
        assert gpu_variants.variant_key(other) != gpu_variants.variant_key(same[0]), other


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="records interpreted launches")
def test_recording_sees_every_launch_and_runs_none():
    """The recorder (what writes benchmarks/gpu_variants.json) catches the op's launches with the
    GPU's configs, without running a kernel."""
    import torch

    from cgc_kernels import cgc_lora
    from tests.cases import Case, make_inputs

    args = make_inputs(Case(M=40, d_in=32, d_out=32, T=3, S=2, K=1, r=4), dtype=torch.float32, device="cpu")
    sink: list = []
    with gpu_variants.recording(sink):
        y = cgc_lora(**args, backend="triton")
    assert sink and all(v["kernel"].startswith("cgc_kernels.op.triton.") for v in sink)
    assert {"num_warps"} <= set(sink[0]["options"]) and y.shape == (40, 32)
    manifest = {v["kernel"].split(":")[1] for v in json.loads(gpu_variants.MANIFEST.read_text())["variants"]}
    assert {v["kernel"].split(":")[1] for v in sink} <= manifest  # every kernel the op launches is warmed
