"""Compile every fused kernel ahead of time for NVIDIA targets, without a GPU, and report resources.

Run as a script WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions):

    python tests/aot_compile_kernels.py [--caps 80,90] [--dtypes fp16,bf16,fp32]

For each kernel, each block config its config function can choose (`*_config_space()`, each config
at the largest rank it serves), each capability and dtype: triton.compile to PTX + cubin, then
`ptxas -v` (shipped with the triton wheel) for registers and spills. Prints one JSON line per
compile: kernel, config, cap, dtype, regs, spill_stores, spill_loads, shared (bytes), and the Triton
version. New kernels are added to `KERNELS` below.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from cgc_kernels.op.triton import backward, backward_grid, dropout, forward, forward_grid, reduce_parts  # noqa: E402

# Pointer element types by argument name; everything else ending in _ptr carries the input dtype.
INDEX_PTRS = {"order_ptr": "*i64", "seed_ptr": "*i64",
              "counts_ptr": "*i64", "starts_ptr": "*i64", "cluster_ptr": "*i64",
              "tile_task_ptr": "*i32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32"}
FP32_PTRS = {"z_ptr", "dzg_ptr", "g_ptr", "dg_ptr", "zp_ptr", "dzp_ptr", "psa_ptr", "psb_ptr", "pta_ptr", "ptb_ptr"}
FLOAT_SCALARS = {"p_drop", "scaling", "p"}
# What Triton's launcher specializes at run time for contiguous inputs: inner strides equal to 1
# become constants (vectorised loads); pointers and row strides of d-sized dims divisible by 16.
UNIT_STRIDES = {"stride_xk", "stride_sak", "stride_sbr", "stride_tak", "stride_tbr", "stride_ge", "stride_bn",
                "stride_yn", "stride_zr", "stride_dyn", "stride_dzr", "stride_dxk", "stride_dge",
                "stride_dsak", "stride_dsbr", "stride_dtak", "stride_dtbr", "stride_zpr", "stride_dzpr",
                "stride_psak", "stride_psbr", "stride_ptak", "stride_ptbr"}
ALIGNED = {"stride_xm", "stride_dym", "stride_ym", "stride_bm", "stride_dxm", "d_in", "d_out",
           "stride_sac", "stride_sar", "stride_sbc", "stride_sbn", "stride_tat", "stride_tar", "stride_tbt",
           "stride_tbn", "stride_dsac", "stride_dsar", "stride_dsbc", "stride_dsbn", "stride_dtat",
           "stride_dtar", "stride_dtbt", "stride_dtbn"}


def signature(fn, dtype: str, constexprs: dict, pointer_types: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in INDEX_PTRS:
            sig[name] = INDEX_PTRS[name]
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # strides, sizes
    return sig


def _dropout_mask_space(dtype_name: str) -> list[tuple[str, dict, int, int]]:
    return [("default", dict(BLOCK_M=64, BLOCK_K=64), 4, 1)]


def _grid_space(config_space, kernel: str):
    """The configs of one GPU-filling kernel from its file's config space (which lists several
    kernels). Their tables have one "half" tier for fp16 and bf16: bf16 compiles it, fp16 adds none."""
    def space(dtype_name: str) -> list[tuple[str, dict, int, int]]:
        if dtype_name == "fp16":
            return []
        return [(c, consts, w, s) for k, c, consts, w, s in config_space(dtype_name) if k == kernel]
    return space


@dataclass(frozen=True)
class AotKernel:
    """One kernel to compile: its @triton.jit function and every config its launcher can pick.

    space(dtype_name) -> [(config name, constexprs, num_warps, num_stages)], each config at the
    heaviest flags and largest rank it serves (the `*_config_space()` functions beside the tiers).
    `dtype_free`: the kernel has no float input (one compile per capability, dtype "-").
    `pointer_types`: element types of pointer arguments that are neither the input dtype nor in
    INDEX_PTRS / FP32_PTRS (e.g. {"mask_ptr": "*i8"}).
    """

    fn: object
    space: Callable[[str], list[tuple[str, dict, int, int]]]
    dtype_free: bool = False
    pointer_types: dict = field(default_factory=dict)


# Every kernel the op can launch. A new kernel file adds its entry here; the test compiles all of
# them for sm_80 and sm_90 and asserts none spills.
KERNELS: dict[str, AotKernel] = {
    "forward": AotKernel(forward._cgc_lora_fwd_kernel, forward.forward_config_space),
    "bwd_tile": AotKernel(backward._cgc_lora_bwd_tile_kernel, backward.backward_tile_config_space),
    "bwd_weight": AotKernel(backward._cgc_lora_bwd_weight_kernel, backward.backward_weight_config_space),
    "dropout_mask": AotKernel(dropout._keep_mask_kernel, _dropout_mask_space, dtype_free=True,
                              pointer_types={"mask_ptr": "*i8"}),
    # The GPU-filling kernels cgc_lora dispatches to (forward_grid.py, backward_grid.py).
    "fwd_grid": AotKernel(forward_grid._fwd_kernel, _grid_space(forward_grid.forward_config_space, "fwd_grid")),
    "shrink": AotKernel(forward_grid._shrink_kernel, _grid_space(forward_grid.forward_config_space, "shrink")),
    "bwd_rows": AotKernel(backward_grid._bwd_rows_kernel,
                          _grid_space(backward_grid.backward_config_space, "bwd_rows")),
    "bwd_weights": AotKernel(backward_grid._bwd_weight_kernel,
                             _grid_space(backward_grid.backward_config_space, "bwd_weights")),
    "bwd_reduce": AotKernel(reduce_parts._bwd_reduce_kernel,
                            _grid_space(backward_grid.backward_config_space, "bwd_reduce")),
}


def jobs(caps, dtypes, kernels=None):
    """(kernel name, config name, cap, dtype, constexprs, num_warps, num_stages) for every compile."""
    out = []
    names = kernels or list(KERNELS)
    for cap in caps:
        for name in names:
            k = KERNELS[name]
            for dt in (["-"] if k.dtype_free else dtypes):
                for cname, consts, warps, stages in k.space(dt):
                    out.append((name, cname, cap, dt, consts, warps, stages))
    return out


def compile_one(job):
    kname, cname, cap, dt, consts, warps, stages = job
    fn = KERNELS[kname].fn
    consts = {**consts, **{n: 1 for n in fn.arg_names if n in UNIT_STRIDES}}
    sig = signature(fn, dt, consts, KERNELS[kname].pointer_types)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and (sig[n].startswith("*") or n in ALIGNED)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": warps, "num_stages": stages})
    ptx = k.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kname}/{cname}/sm_{cap}/{dt}: {res.stderr[-2000:]}")
    info = res.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", info).group(1))
    return dict(kernel=kname, config=cname, cap=cap, dtype=dt, triton=triton.__version__, regs=regs,
                spill_stores=spill_st,
                spill_loads=spill_ld, shared=int(k.metadata.shared), num_warps=warps,
                has_wgmma="wgmma" in ptx, has_mma="mma.sync" in ptx)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="80,90")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--kernels", default=None, help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    todo = jobs([int(c) for c in a.caps.split(",")], a.dtypes.split(","),
                a.kernels.split(",") if a.kernels else None)
    with ProcessPoolExecutor(a.workers) as pool:
        for r in pool.map(compile_one, todo):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
