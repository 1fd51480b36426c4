"""Every fused kernel compiles ahead of time for sm_80 and sm_90 (fp16, bf16, fp32) without a GPU,
at every block config the dispatcher can choose, and spills no registers, under the installed
Triton (scripts/test runs this under Triton 3.7 in .venv and 3.6 in .venv-triton36).

The compile runs in a subprocess without TRITON_INTERPRET: the interpreter replaces @triton.jit
functions by Python, so they cannot be compiled in this (interpreted) test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile_kernels.py")


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton's NVIDIA backend with ptxas")
def test_kernels_compile_for_sm80_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SCRIPT.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(SCRIPT), "--caps", "80,90", "--dtypes", "fp16,bf16,fp32",
                          "--workers", str(min(4, os.cpu_count() or 1))],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print(f"\ntriton {rows[0]['triton'] if rows else '?'}")
    print(f"{'kernel':<13}{'config':<9}{'cap':<5}{'dtype':<6}{'regs':>5}{'spill':>7}{'smem':>8}  mma")
    for r in rows:
        mma = "wgmma" if r["has_wgmma"] else "mma.sync" if r["has_mma"] else "-"
        print(f"{r['kernel']:<13}{r['config']:<9}{r['cap']:<5}{r['dtype']:<6}{r['regs']:>5}"
              f"{r['spill_stores']:>7}{r['shared']:>8}  {mma}")
    kernels = {r["kernel"] for r in rows}
    # today's kernels and the GPU-filling ones; new kernels join through aot_compile_kernels.KERNELS
    assert {"forward", "bwd_tile", "bwd_weight", "dropout_mask", "fwd_grid", "shrink", "bwd_rows", "bwd_weights",
            "bwd_reduce"} <= kernels, kernels
    assert {(r["cap"], r["dtype"]) for r in rows if r["kernel"] == "forward"} == {
        (c, d) for c in (80, 90) for d in ("fp16", "bf16", "fp32")}
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills: {spilled}"
    # Shared memory within the smallest of the targets' per-block limits (sm_80: 163 KiB).
    assert max(r["shared"] for r in rows) <= 163 * 1024
    # Tensor cores are used for half inputs: wgmma on sm_90 where the tile allows, mma.sync on sm_80.
    half80 = [r for r in rows if r["cap"] == 80 and r["dtype"] in ("fp16", "bf16")
              and r["kernel"] not in ("dropout_mask", "bwd_reduce")]  # the reduce only adds partials
    assert all(r["has_mma"] for r in half80)
