"""Compile every fused kernel ahead of time for NVIDIA targets, without a GPU, and report resources.

Run as a script WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions):

    python tests/op/aot_compile_kernels.py [--caps 80,90] [--dtypes fp16,bf16,fp32]

For each kernel, each block config its config function can choose (`*_config_space()`, each config
at the largest rank it serves), each capability and dtype: triton.compile to PTX + cubin, then
`ptxas -v` (shipped with the triton wheel) for registers and spills. Prints one JSON line per
compile: kernel, config, cap, dtype, regs, spill_stores, spill_loads, shared (bytes), and the Triton
version. New kernels are added to `KERNELS` below.
"""

from __future__ import annotations

import argparse
import functools
import inspect
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from cgc_kernels.op.triton import backward, common, dropout, forward, reduce_parts  # noqa: E402

# Pointer element types by argument name; everything else ending in _ptr carries the input dtype.
INDEX_PTRS = {"order_ptr": "*i64", "seed_ptr": "*i64", "keep_ptr": "*u8",
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


def _dropout_mask_space(dtype_name: str) -> list[tuple[str, str, int, dict, int, int]]:
    return [("dropout_mask", "default", 0, dict(BLOCK_M=dropout._BITS_BLOCK_M, BLOCK_K=dropout._BITS_BLOCK_K),
             dropout._BITS_WARPS, 1)]


MATRICES = ("heavy", "reachable", "full")


def rank_splits(limit: int, lower: int, matrix: str) -> list[tuple[int, int]]:
    """(RS_PAD, RK_PAD) pairs the planner sends to the tier of `limit` (0: that side absent).

    Each side is padded to a power of two in 16..MAX_RANK_PAD and the tier serves padded sums in
    (lower, limit] (lower: the table's previous limit). "full": every such pair; "reachable": the
    balanced pair at the limit and the most lopsided ones (one side as large as the tier allows, the
    other 16 or absent), where the register allocation has differed most (e.g. 128 / 16 spilled
    where 128 / 128 did not; _variants gives bf16 every pair here too); "heavy": the balanced pair
    alone."""
    pads = [0] + [p for p in (16, 32, 64, 128) if p <= common.MAX_RANK_PAD]
    pairs = [(a, b) for a in pads for b in pads if lower < a + b <= limit]
    if matrix == "full":
        return pairs
    if matrix == "heavy":
        return [(limit // 2, limit // 2)]
    big = max(a for a, _ in pairs)
    picked = {(limit // 2, limit // 2), (big, 16), (16, big), (big, 0)}
    return sorted(p for p in pairs if p in picked)


def _variants(kernel: str, fn, limit: int, lower: int, consts: dict, dtype_name: str,
              matrix: str) -> list[tuple[str, dict]]:
    """(suffix, constexprs) of the flag and rank variants of one tier of `kernel`: every rank split,
    per-task and per-token gates, dropout on and off, where the tier's code path reads them (the dA
    launch reads no gate, the dB launch and the expand from z parts no x); the other flags at their
    heaviest (every output wanted, clusters, a base). fp16 differs from bf16 only in conversions:
    outside "full" it compiles each split with every flag on, as "heavy" does for every dtype."""
    args = set(fn.arg_names)
    # bf16 (what training runs in) at every split in the test command's matrix too: the sample alone
    # missed spills at 16 / 32, 32 / 16 and 64 / 64.
    split_matrix = "full" if matrix == "reachable" and dtype_name == "bf16" else matrix
    splits = rank_splits(limit, lower, split_matrix) if "RS_PAD" in args else [(limit // 2, limit // 2)]
    reads_gates = "PER_TOKEN_GATES" in args and not consts.get("DO_A")
    reads_x = "HAS_DROPOUT" in args and not consts.get("Z_FROM_PARTS") and consts.get("DO_A", True)
    light = matrix == "heavy" or dtype_name == "fp16" and matrix != "full"
    gates = ((True,) if light else (False, True)) if reads_gates else (None,)
    drops = ((True,) if light else (False, True)) if reads_x else (None,)
    out = []
    for rs, rk in splits:
        for per_token in gates:
            for drop in drops:
                c = dict(HAS_SHARED=rs > 0, HAS_TASK=rk > 0, RS_PAD=max(rs, 16), RK_PAD=max(rk, 16), R_PAD=limit // 2,
                         T_PAD=64, E_PAD=16, PER_TOKEN_GATES=bool(per_token), HAS_DROPOUT=bool(drop), HAS_CLUSTER=True,
                         HAS_BASE=True, IN_PLACE=False, SAVE_Z=True, WANT_DX=True, WANT_DGATE=True, WANT_DZ=True,
                         WANT_A=True, WANT_B=True, UPCAST=False)
                c = {k: v for k, v in c.items() if k in args}
                name = f"{rs}/{rk}" + {None: "", False: " task-g", True: " token-g"}[per_token] + \
                    {None: "", False: "", True: " drop"}[drop]
                out.append((name, c))
    return out


def _space(config_space, kernel: str):
    """Every compile of one kernel: its tiers from its file's config space, each with its variants."""
    def space(dtype_name: str, matrix: str = "heavy") -> list[tuple[str, dict, int, int]]:
        fn = KERNELS[kernel].fn
        prec = "ieee" if dtype_name == "fp32" else "tf32"
        out = []
        tiers = [t for t in config_space(dtype_name) if t[0] == kernel]
        for _, cname, limit, consts, warps, stages in tiers:
            table = re.sub(r"r\d+", "", cname)  # tiers of one table share their name but the limit
            lower = max((t[2] for t in tiers if t[2] < limit and re.sub(r"r\d+", "", t[1]) == table), default=0)
            for suffix, flags in _variants(kernel, fn, limit, lower, consts, dtype_name, matrix):
                c = dict(consts, **flags)
                if "DOT_PRECISION" in fn.arg_names:
                    c["DOT_PRECISION"] = prec
                out.append((f"{cname} {suffix}".strip(), c, warps, stages))
        return out
    return space


@dataclass(frozen=True)
class AotKernel:
    """One kernel to compile: its @triton.jit function and every config its launcher can pick.

    space(dtype_name, matrix) -> [(config name, constexprs, num_warps, num_stages)]: each tier of the
    kernel's file (`*_config_space()`) with every rank split and flag it can meet (`_variants`).
    `dtype_free`: the kernel has no float input (one compile per capability, dtype "-").
    `pointer_types`: element types of pointer arguments that are neither the input dtype nor in
    INDEX_PTRS / FP32_PTRS (e.g. {"mask_ptr": "*i8"}).
    `dropout_rows`: the constexpr naming the rows of its dropout tile (Philox multiplies per element).
    """

    fn: object
    space: Callable
    dtype_free: bool = False
    pointer_types: dict = field(default_factory=dict)
    dropout_rows: str = "BLOCK_M"


# Every kernel the op can launch. A new kernel file adds its entry here; the test compiles all of
# them for sm_80 and sm_90 and asserts none spills.
KERNELS: dict[str, AotKernel] = {
    "fwd": AotKernel(forward._fwd_kernel, _space(forward.forward_config_space, "fwd")),
    "shrink": AotKernel(forward._shrink_kernel, _space(forward.forward_config_space, "shrink")),
    "bwd_rows": AotKernel(backward._bwd_rows_kernel, _space(backward.backward_config_space, "bwd_rows")),
    "bwd_weights": AotKernel(backward._bwd_weight_kernel, _space(backward.backward_config_space, "bwd_weights"),
                             dropout_rows="BLOCK_R"),
    "bwd_reduce": AotKernel(reduce_parts._bwd_reduce_kernel, _space(backward.backward_config_space, "bwd_reduce")),
    "dropout_mask": AotKernel(dropout._keep_bits_kernel, lambda dt, matrix="heavy": [
        (c, consts, w, s) for _, c, _, consts, w, s in _dropout_mask_space(dt)], dtype_free=True,
        pointer_types={"bits_ptr": "*u8"}),
}


def jobs(caps, dtypes, kernels=None, matrix="heavy"):
    """(kernel name, config name, cap, dtype, constexprs, num_warps, num_stages) for every compile."""
    out = []
    names = kernels or list(KERNELS)
    for cap in caps:
        for name in names:
            k = KERNELS[name]
            for dt in (["-"] if k.dtype_free else dtypes):
                for cname, consts, warps, stages in k.space(dt, matrix):
                    out.append((name, cname, cap, dt, consts, warps, stages))
    return out


@functools.cache
def ptxas_options() -> list[str]:
    """The register-allocation options the installed Triton passes to ptxas when it compiles a
    kernel (Triton 3.7 adds --regAllocOptLevel=2, 3.6 nothing): the allocation checked here must
    be the one a GPU run gets."""
    from triton.backends.nvidia import compiler

    return ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in inspect.getsource(compiler) else []


def compile_one(job):
    kname, cname, cap, dt, consts, warps, stages = job
    fn = KERNELS[kname].fn
    # A tier's register cap (`maxnreg`) travels with its constexprs and is a compile option.
    options = {k: consts[k] for k in ("maxnreg",) if consts.get(k)}
    consts = {**{k: v for k, v in consts.items() if k != "maxnreg"},
              **{n: 1 for n in fn.arg_names if n in UNIT_STRIDES}}
    sig = signature(fn, dt, consts, KERNELS[kname].pointer_types)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and (sig[n].startswith("*") or n in ALIGNED)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": warps, "num_stages": stages, **options})
    ptx = k.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", *ptxas_options(), f"--gpu-name={arch}", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kname}/{cname}/sm_{cap}/{dt}: {res.stderr[-2000:]}")
    info = res.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", info).group(1))
    # Philox multiplies: every round of tl.randint4x is two mul.hi.u32, and nothing else in these
    # kernels emits one. Per element: over the dropout tile's elements per thread.
    mulhi = ptx.count("mul.hi.u32")
    # A 64-bit integer division or remainder is a called subroutine: the call saves live registers
    # to the stack, which ptxas reports as spills even in small kernels.
    div64 = len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))
    rows = consts.get(KERNELS[kname].dropout_rows, 0)
    per_thread = rows * consts.get("BLOCK_K", 0) / (32 * warps)
    return dict(kernel=kname, config=cname, cap=cap, dtype=dt, triton=triton.__version__, regs=regs, **options,
                spill_stores=spill_st, spill_loads=spill_ld, shared=int(k.metadata.shared), num_warps=warps,
                has_wgmma="wgmma" in ptx, has_mma="mma.sync" in ptx, mulhi=mulhi, div64=div64,
                dropout=bool(consts.get("HAS_DROPOUT")) or kname == "dropout_mask",
                tile_elems_per_thread=per_thread)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="80,90")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--kernels", default=None, help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--matrix", choices=MATRICES, default="heavy",
                    help="rank splits and flags per tier (rank_splits, _variants)")
    a = ap.parse_args(argv)
    todo = jobs([int(c) for c in a.caps.split(",")], a.dtypes.split(","),
                a.kernels.split(",") if a.kernels else None, a.matrix)
    with ProcessPoolExecutor(a.workers) as pool:
        for r in pool.map(compile_one, todo):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
