"""Every kernel compiles ahead of time for sm_80 and sm_90 (fp16, bf16, fp32) without a GPU at the
block configs the planner can choose (MATRIX below: which rank splits and flags), with no register
spill and no 64-bit division, under the installed Triton (scripts/test runs this under Triton 3.7
in .venv and 3.6 in .venv-triton36). It also reports the Philox multiplies per dropout element:
only the keep-bits kernel runs the generator.

The compile runs in a subprocess without TRITON_INTERPRET: the interpreter replaces @triton.jit
functions by Python, so they cannot be compiled in this (interpreted) test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile_kernels.py")
# The rank splits and flags compiled per tier (aot_compile_kernels.rank_splits, _variants):
# "reachable" in the test command (~1000 compiles, about 4 minutes per Triton version on 2 cores):
# bf16 at every split and flag, fp16 and fp32 at each tier's balanced and most lopsided splits;
# "full" (CGC_AOT_MATRIX=full, ~2100, about 12 minutes) every split and flag of every dtype, to run
# when a kernel or a tier changes; "heavy" the balanced split with every flag on (~90).
MATRIX = os.environ.get("CGC_AOT_MATRIX", "reachable")


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


# Philox multiplies (mul.hi.u32) per dropout element in the PTX, sm_90 bf16, when every dropout
# kernel ran the generator itself (tl.rand: one full Philox per element), by kernel and tier.
PHILOX_PER_ELEMENT_BEFORE = {("fwd", "fused-r64"): 17.1, ("fwd", "fused-r256"): 17.2, ("shrink", "split-r64"): 17.1,
                             ("shrink", "split-r256"): 17.5, ("bwd_rows", "r64-parts"): 68.2,
                             ("bwd_rows", "r64-dy"): 68.2, ("bwd_rows", "r256-dy"): 137.0,
                             ("bwd_weights", "r64-dA"): 17.1, ("bwd_weights", "r256-dA"): 17.2,
                             ("dropout_mask", "default"): 17.0}
ROUNDS_MULHI = 20  # a 10-round Philox call: two mul.hi.u32 per round


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton's NVIDIA backend with ptxas")
def test_kernels_compile_for_sm80_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SCRIPT.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(SCRIPT), "--caps", "80,90", "--dtypes", "fp16,bf16,fp32",
                          "--workers", str(min(2, os.cpu_count() or 1)), "--matrix", MATRIX],
                         capture_output=True, text=True, env=env, timeout=3600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print(f"\ntriton {rows[0]['triton'] if rows else '?'}, matrix {MATRIX}: {len(rows)} compiles in "
          f"{time.monotonic() - t0:.0f} s")
    worst = sorted(rows, key=lambda r: (r["spill_stores"] + r["spill_loads"], r["regs"]), reverse=True)[:12]
    print(f"{'kernel':<13}{'config':<32}{'cap':<5}{'dtype':<6}{'regs':>5}{'spill':>7}{'smem':>8}  mma")
    for r in worst:
        mma = "wgmma" if r["has_wgmma"] else "mma.sync" if r["has_mma"] else "-"
        print(f"{r['kernel']:<13}{r['config']:<32}{r['cap']:<5}{r['dtype']:<6}{r['regs']:>5}"
              f"{r['spill_stores']:>7}{r['shared']:>8}  {mma}")
    kernels = {r["kernel"] for r in rows}
    # new kernels join through aot_compile_kernels.KERNELS
    assert {"fwd", "shrink", "bwd_rows", "bwd_weights", "bwd_reduce", "dropout_mask"} <= kernels, kernels
    assert {(r["cap"], r["dtype"]) for r in rows if r["kernel"] == "fwd"} == {
        (c, d) for c in (80, 90) for d in ("fp16", "bf16", "fp32")}
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills: {spilled}"
    # No 64-bit integer division (a subroutine call; index math divides in int32).
    assert not [r for r in rows if r["div64"]], [(r["kernel"], r["config"]) for r in rows if r["div64"]]
    # Shared memory within the smallest of the targets' per-block limits (sm_80: 163 KiB).
    assert max(r["shared"] for r in rows) <= 163 * 1024
    # Tensor cores are used for half inputs: wgmma on sm_90 where the tile allows, mma.sync on sm_80.
    half80 = [r for r in rows if r["cap"] == 80 and r["dtype"] in ("fp16", "bf16")
              and r["kernel"] not in ("dropout_mask", "bwd_reduce")]  # the reduce only adds partials
    assert all(r["has_mma"] for r in half80)
    # Dropout: Philox multiplies per element of each kernel's dropout tile. One launch draws the
    # keep-bits (one call per 8 elements, several calls per thread); the matmul kernels read bits and
    # run no generator at all, so nothing in them emits mul.hi.u32, with or without dropout.
    print("Philox mul.hi.u32 per dropout element (sm_90 bf16): config, now, before")
    for r in rows:
        if r["dropout"] and r["cap"] == 90 and r["dtype"] in ("bf16", "-"):
            per = r["mulhi"] / r["tile_elems_per_thread"]
            tier = r["config"].split(" ")[0]
            before = PHILOX_PER_ELEMENT_BEFORE.get((r["kernel"], tier))
            print(f"  {r['kernel']:<13}{r['config']:<32}{per:6.2f}  {before}")
    for r in rows:
        if r["kernel"] != "dropout_mask":
            assert r["mulhi"] == 0, r
            continue
        per = r["mulhi"] / r["tile_elems_per_thread"]
        assert r["tile_elems_per_thread"] >= 8 and per <= ROUNDS_MULHI / 8, r
        assert per <= PHILOX_PER_ELEMENT_BEFORE[("dropout_mask", "default")] / 4, r
