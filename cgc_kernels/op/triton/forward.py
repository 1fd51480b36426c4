"""CGC-LoRA forward that fills the GPU at every M: one launch at training shapes, shrink + expand at decode.

Two plans over the routing's tile table (tiles of same-task rows; the unused slots take the
task -1 rows, see slots.py), chosen per shape by `forward_plan`:

    "fused" (many tiles), ONE launch, grid (tile x sub row parts, N_SPLIT d_out groups):
        h      = drop(x[rows])                                  [BLOCK_M, d_in], keep-bits (dropout.py)
        z      = h @ [shared_a[c]; task_a[t]]^T                 one d_in loop for both sides, fp32
        save z                                                  [M, (S+K) r] fp32 (d_out group 0)
        y      = base[rows] + (z * g * s) @ [shared_b[c], task_b[t]]^T     over its d_out group
        task -1 rows: y = base, z = 0

    "split" (few tiles: decode), TWO launches back to back:
        shrink, grid (tile, K_SPLIT d_in parts):    zpart[k] = h[:, part k] @ A[:, part k]^T
        expand, grid (tile, d_out blocks):          z = sum_k zpart[k] (fixed order), then as above

Recomputing z per d_out group re-reads x and the A's (from L2) once per group, so "fused" keeps
N_SPLIT = 1 wherever the tiles alone make two waves; "split" reads the A's once and moves only
fp32 partials of z [K_SPLIT, M, (S+K) r] between its launches. The output is always written
whole (base + delta): nothing is zero-filled before and nothing is added after. Rows are unique
across programs, so no atomics. The backward (backward.py) reads the saved z.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import common, dropout
from .kernel_utils import expand_rows, load_rank_gates, shrink_rows, store_rank_cols, sum_row_parts, task_cluster
from .slots import tile_rows

# Per-call integers (M, the routing's tile rows, the plan's splits and the fp32 partials' strides,
# which follow M) are not specialized: one compiled variant serves every batch size.
_PER_CALL = ["M", "tile_rows_n", "sub", "k_split", "n_per_prog", "stride_zps", "stride_zpm"]


@triton.jit(do_not_specialize=_PER_CALL)
def _fwd_kernel(
    x_ptr, stride_xm, stride_xk,  # [M, d_in]
    sa_ptr, stride_sac, stride_sar, stride_sak,  # shared_a [C, S*r, d_in]
    sb_ptr, stride_sbc, stride_sbn, stride_sbr,  # shared_b [C, d_out, S*r]
    ta_ptr, stride_tat, stride_tar, stride_tak,  # task_a [T, K*r, d_in]
    tb_ptr, stride_tbt, stride_tbn, stride_tbr,  # task_b [T, d_out, K*r]
    g_ptr, stride_gm, stride_ge,  # gates [T, S+K] or [M, S+K] (PER_TOKEN_GATES)
    cluster_ptr,  # task_cluster [T] (HAS_CLUSTER)
    order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,  # routing
    zp_ptr, stride_zps, stride_zpm, stride_zpr,  # [K_SPLIT, M, S*r + K*r] fp32 partial z (Z_FROM_PARTS)
    base_ptr, stride_bm, stride_bn,  # [M, d_out] (HAS_BASE); may be y itself (IN_PLACE)
    y_ptr, stride_ym, stride_yn,  # [M, d_out] out: base + delta
    z_ptr, stride_zm, stride_zr,  # [M, S*r + K*r] fp32 out (SAVE_Z): z = A drop(x), shared first
    keep_ptr, stride_keep, p_drop, scaling,  # [M, cdiv(d_in, 8)] uint8 dropout keep-bits (HAS_DROPOUT)
    M, d_in, d_out, r, RS, RK, S, T, tile_rows_n, sub, k_split, n_per_prog,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    T_PAD: tl.constexpr, PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr,
    HAS_BASE: tl.constexpr, IN_PLACE: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_Z: tl.constexpr,
    Z_FROM_PARTS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    t, lo, hi = tile_rows(pid // sub, pid % sub, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,
                          M, T, tile_rows_n, sub, T_PAD)
    n_lo = pid_n * n_per_prog
    n_hi = tl.minimum(n_lo + n_per_prog, d_out)
    rs = tl.arange(0, RS_PAD)
    rk = tl.arange(0, RK_PAD)
    rs_ok = rs < RS
    rk_ok = rk < RK
    if t < 0:
        # Task -1 rows: the base model alone. In place there is nothing to do.
        if not IN_PLACE:
            for m0 in range(lo, hi, BLOCK_M):
                pos = m0 + tl.arange(0, BLOCK_M)
                row_ok = pos < hi
                rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                for n0 in range(n_lo, n_hi, BLOCK_N):
                    nn = n0 + tl.arange(0, BLOCK_N)
                    io = row_ok[:, None] & (nn < d_out)[None, :]
                    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    if HAS_BASE:
                        v = tl.load(base_ptr + rows[:, None] * stride_bm + nn[None, :] * stride_bn,
                                    mask=io, other=0.0).to(tl.float32)
                    tl.store(y_ptr + rows[:, None] * stride_ym + nn[None, :] * stride_yn,
                             v.to(y_ptr.dtype.element_ty), mask=io)
                if SAVE_Z:
                    if pid_n == 0:
                        store_rank_cols(z_ptr, stride_zm, stride_zr, rows, row_ok, RS, rs, rs_ok, rk, rk_ok,
                                        tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32),
                                        tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32), HAS_SHARED, HAS_TASK)
    else:
        t64, c64 = task_cluster(t, cluster_ptr, HAS_CLUSTER)
        op_dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty  # interpreter: its bf16 dot is wrong
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            if Z_FROM_PARTS:
                z_s, z_t = sum_row_parts(zp_ptr, stride_zps, stride_zpm, stride_zpr, k_split, rows, row_ok, RS,
                                         rs, rs_ok, rk, rk_ok, HAS_SHARED, HAS_TASK, BLOCK_M, RS_PAD, RK_PAD)
            else:
                z_s, z_t = shrink_rows(x_ptr, stride_xm, stride_xk, rows, row_ok, 0, d_in, d_in,
                                       sa_ptr + c64 * stride_sac, stride_sar, stride_sak,
                                       ta_ptr + t64 * stride_tat, stride_tar, stride_tak, rs, rs_ok, rk, rk_ok,
                                       keep_ptr, stride_keep, p_drop, HAS_SHARED, HAS_TASK, HAS_DROPOUT, op_dtype,
                                       DOT_PRECISION, BLOCK_M, BLOCK_K, RS_PAD, RK_PAD)
            if SAVE_Z:
                if pid_n == 0:
                    store_rank_cols(z_ptr, stride_zm, stride_zr, rows, row_ok, RS, rs, rs_ok, rk, rk_ok, z_s, z_t,
                                    HAS_SHARED, HAS_TASK)
            zg_s = z_s.to(op_dtype)
            zg_t = z_t.to(op_dtype)
            if HAS_SHARED:
                g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, rs // r, rs_ok,
                                      PER_TOKEN_GATES)
                zg_s = (z_s * g_s * scaling).to(op_dtype)
            if HAS_TASK:
                g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, S + rk // r, rk_ok,
                                      PER_TOKEN_GATES)
                zg_t = (z_t * g_t * scaling).to(op_dtype)
            expand_rows(zg_s, zg_t, rows, row_ok, n_lo, n_hi, d_out,
                        sb_ptr + c64 * stride_sbc, stride_sbn, stride_sbr, tb_ptr + t64 * stride_tbt, stride_tbn,
                        stride_tbr, rs, rs_ok, rk, rk_ok, base_ptr, stride_bm, stride_bn, y_ptr, stride_ym,
                        stride_yn, HAS_SHARED, HAS_TASK, HAS_BASE, op_dtype, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M", "tile_rows_n", "sub", "k_per_prog", "stride_zps", "stride_zpm"])
def _shrink_kernel(
    x_ptr, stride_xm, stride_xk,  # [M, d_in]
    sa_ptr, stride_sac, stride_sar, stride_sak,  # shared_a [C, S*r, d_in]
    ta_ptr, stride_tat, stride_tar, stride_tak,  # task_a [T, K*r, d_in]
    cluster_ptr,  # [T] (HAS_CLUSTER)
    order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,  # routing
    zp_ptr, stride_zps, stride_zpm, stride_zpr,  # [K_SPLIT, M, S*r + K*r] fp32 out
    keep_ptr, stride_keep, p_drop,  # [M, cdiv(d_in, 8)] uint8 dropout keep-bits (HAS_DROPOUT)
    M, d_in, RS, RK, T, tile_rows_n, sub, k_per_prog,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    T_PAD: tl.constexpr, HAS_CLUSTER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    t, lo, hi = tile_rows(pid // sub, pid % sub, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,
                          M, T, tile_rows_n, sub, T_PAD)
    if t >= 0:  # task -1 rows have no z; the expand writes their output
        t64, c64 = task_cluster(t, cluster_ptr, HAS_CLUSTER)
        op_dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        rs = tl.arange(0, RS_PAD)
        rk = tl.arange(0, RK_PAD)
        rs_ok = rs < RS
        rk_ok = rk < RK
        k_lo = ks * k_per_prog
        k_hi = tl.minimum(k_lo + k_per_prog, d_in)
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            z_s, z_t = shrink_rows(x_ptr, stride_xm, stride_xk, rows, row_ok, k_lo, k_hi, d_in,
                                   sa_ptr + c64 * stride_sac, stride_sar, stride_sak,
                                   ta_ptr + t64 * stride_tat, stride_tar, stride_tak, rs, rs_ok, rk, rk_ok,
                                   keep_ptr, stride_keep, p_drop, HAS_SHARED, HAS_TASK, HAS_DROPOUT, op_dtype,
                                   DOT_PRECISION, BLOCK_M, BLOCK_K, RS_PAD, RK_PAD)
            store_rank_cols(zp_ptr + ks * stride_zps, stride_zpm, stride_zpr, rows, row_ok, RS, rs, rs_ok, rk, rk_ok,
                            z_s, z_t, HAS_SHARED, HAS_TASK)


# ---- block configuration ---------------------------------------------------------------------

WAVE_PROGRAMS = 264  # two waves of an H200's 132 SMs: the least any launch should offer


@dataclass(frozen=True)
class ForwardPlan:
    """How one forward call is launched. kind "fused": one launch, grid (tiles * sub, n_split);
    kind "split": shrink grid (tiles * sub, k_split) then expand grid (tiles * sub, n_split).
    Only the blocks and the kind are compiled in; sub, k_split and n_split are run-time values."""

    kind: str
    sub: int  # programs per routing tile (row parts)
    BLOCK_M: int
    BLOCK_K: int
    BLOCK_N: int
    n_split: int  # d_out groups (programs along axis 1 of the fused / expand launch)
    k_split: int  # d_in parts of the shrink (1 for "fused")
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas register cap (None: ptxas picks)

    def grids(self, max_tiles: int) -> list[tuple[int, int]]:
        rows = max_tiles * self.sub
        if self.kind == "fused":
            return [(rows, self.n_split)]
        return [(rows, self.k_split), (rows, self.n_split)]


# Tiers (limit, config) by padded rank (shared + task side, both in registers) and dtype kind, in
# the one format common.pick_tier reads; each compiled ahead of time (tests/op/aot_compile_kernels.py)
# at every rank split and flag its limit admits, spill-free on sm_80 / sm_90.
FORWARD_BLOCKS = {
    # Both half tiers cap ptxas at 255 registers with 8 warps and 32-wide d_in blocks: 4 warps at
    # r64 spilled up to 188 B at lopsided splits (16 / 32, 32 / 16), and r256 with 64-wide d_in
    # blocks up to 80 B under triton 3.6 even at 255; left to itself ptxas held some splits to 128
    # registers and spilled (64 / 64 with per-token gates, 16 / 64 on sm_90).
    "half": [(64, dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=255)),
             (2 * common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=64, num_warps=8, num_stages=2,
                                            maxnreg=255))],
    # fp32 runs its dots on FMA units (no tensor cores): one small tier, up to a padded rank of 128
    # (backward.max_rank_size: the backward's limit). Left to itself ptxas holds it to 128 registers
    # and spills 16-36 B; capped at 255 with 16-column output blocks, unpipelined, it takes <= 208
    # and spills none (two stages took 255 and spilled 8 B at 32 / 64 with per-token gates, sm_90).
    "fp32": [(common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=1,
                                        maxnreg=255))],
}
# Decode / small M: shrink blocks of 16 rows (tl.dot's minimum) and d_in parts of several BLOCK_K.
# No fp32 tier (its shrink spills at every block size tried): fp32 takes the fused plan.
# maxnreg 255: left to itself, ptxas holds the split launches to 128 registers at some lopsided
# splits (two blocks per SM) and spills 8-16 B (r64 16 / 32 with per-token gates on sm_80, r256 on
# sm_80 and sm_90); with the cap at the hardware's 255 they take <= 205 and spill nothing.
SPLIT_BLOCKS = {
    "half": [(64, dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3, maxnreg=255)),
             (2 * common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=64, num_warps=8, num_stages=2,
                                            maxnreg=255))],
    "fp32": [],
}
# The interpreter's config: few, large programs (it pays per program and per loop iteration).
PINNED = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2)


def forward_plan(M: int, T: int, d_in: int, d_out: int, rank_size: int, dtype: torch.dtype,
                 max_tiles: int, tile_rows: int, kind: str | None = None) -> ForwardPlan:
    """The launch plan for one forward, from shapes only (no autotuning: reproducible on a GPU).

    "fused" when the routing tiles, split in up to two row parts of BLOCK_M rows, already give two
    waves; otherwise "split", with as many d_in parts as two waves need (each at least 2 * BLOCK_K
    wide) and one d_out block per expand program. `kind` forces a plan (tests); the pinned config
    (`common.configs_pinned()`) keeps the choice but uses the interpreter's large blocks.
    """
    kind = kind or _FORCED_KIND[0]
    kt = common.tier_kind(dtype)
    pinned = common.configs_pinned()
    fused_cfg = dict(PINNED) if pinned else common.pick_tier(FORWARD_BLOCKS[kt], rank_size)
    sub = max(1, min(tile_rows // fused_cfg["BLOCK_M"], 2))
    split_tiers = SPLIT_BLOCKS[kt]
    if kind is None:
        splittable = pinned or bool(split_tiers) and rank_size <= split_tiers[-1][0]
        kind = "fused" if max_tiles * sub >= WAVE_PROGRAMS or not splittable else "split"
    if kind == "fused":
        return ForwardPlan("fused", sub, n_split=1, k_split=1, **fused_cfg)
    if kind != "split":
        raise ValueError(f"forward plan kind must be 'fused' or 'split', got {kind!r}")
    cfg = dict(PINNED) if pinned else common.pick_tier(split_tiers, rank_size)
    # Row parts only as far as the tiles are full on average (decode tiles hold one row each).
    avg_rows = triton.cdiv(max(M, 1), max_tiles)
    sub = max(1, min(triton.cdiv(avg_rows, cfg["BLOCK_M"]), triton.cdiv(tile_rows, cfg["BLOCK_M"])))
    rows = max_tiles * sub
    k_split = max(1, min(triton.cdiv(WAVE_PROGRAMS, rows), d_in // (2 * cfg["BLOCK_K"])))
    n_split = max(1, triton.cdiv(d_out, cfg["BLOCK_N"]))
    return ForwardPlan("split", sub, n_split=n_split, k_split=k_split, **cfg)


_FORCED_KIND: list[str | None] = [None]


@contextlib.contextmanager
def forced_plan(kind: str | None):
    """Within the block every forward uses plan `kind` ("fused" / "split"; None: by shape). Tests
    run both plans at small shapes through the public op with this."""
    old, _FORCED_KIND[0] = _FORCED_KIND[0], kind
    try:
        yield
    finally:
        _FORCED_KIND[0] = old


def forward_config_space(dtype_name: str) -> list[tuple[str, str, int, dict, int, int]]:
    """(kernel, tier name, tier limit, constexprs fixed by the tier, num_warps, num_stages) of every
    GPU config (the constexprs carry the tier's `maxnreg`, a compile option, None where ptxas picks);
    tests/op/aot_compile_kernels.py adds the rank pads and flags each tier can meet."""
    kind = "fp32" if dtype_name == "fp32" else "half"
    out = []
    for table, name in ((FORWARD_BLOCKS, "fused"), (SPLIT_BLOCKS, "split")):
        for limit, cfg in table[kind]:
            cfg = dict(cfg)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], maxnreg=cfg.get("maxnreg"))
            out.append(("fwd", f"{name}-r{limit}", limit,
                        dict(blocks, Z_FROM_PARTS=name == "split", BLOCK_N=cfg["BLOCK_N"]), warps, stages))
            if name == "split":
                out.append(("shrink", f"split-r{limit}", limit, blocks, warps, stages))
    return out


# ---- launcher --------------------------------------------------------------------------------

def cgc_lora_forward(
    x: torch.Tensor,  # [M, d_in]
    gates: torch.Tensor,  # [T, S+K] or [M, S+K]
    shared_a: torch.Tensor, shared_b: torch.Tensor,  # [C, S*r, d_in], [C, d_out, S*r]
    task_a: torch.Tensor, task_b: torch.Tensor,  # [T, K*r, d_in], [T, d_out, K*r]
    task_cluster: torch.Tensor | None,  # [T] or None (one cluster)
    order: torch.Tensor, tile_task: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    counts: torch.Tensor, tile_rows_n: int,  # routing (counts [T]; tile_rows_n = routing.tile_rows)
    scaling: float, per_token_gates: bool, dropout_p: float,
    seed: torch.Tensor | int | None,  # [1] int64 on the device (an int in tests; None: no dropout)
    base: torch.Tensor | None,  # [M, d_out] base output (or None: the delta alone)
    out: torch.Tensor | None = None,  # [M, d_out] written; may be `base` itself (in place)
    save_z: bool = True,
    plan: ForwardPlan | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, z): y [M, d_out] = base + delta (every row written: task -1 rows get base, or 0), and
    z [M, (S+K) r] fp32 (None without `save_z`: inference stores nothing)."""
    M, d_in = x.shape
    RS, RK = shared_a.shape[1], task_a.shape[1]
    T = task_a.shape[0]
    d_out = task_b.shape[1]
    E = gates.shape[1]
    r = (RS + RK) // E
    S = RS // r
    y = out if out is not None else torch.empty(M, d_out, dtype=x.dtype, device=x.device)
    keep, stride_keep = dropout.kernel_keep_bits(seed, M, d_in, dropout_p, counts)
    z = torch.empty(M, RS + RK, dtype=torch.float32, device=x.device) if save_z else None
    if M == 0:
        return y, z
    max_tiles = tile_task.shape[0]
    if not isinstance(plan, ForwardPlan):
        plan = forward_plan(M, T, d_in, d_out, common.rank_size(RS, RK), x.dtype, max_tiles, tile_rows_n,
                            kind=plan)
    in_place = base is not None and base.data_ptr() == y.data_ptr()
    b = base if base is not None else y  # never read without HAS_BASE
    zt = z if z is not None else y  # never written without SAVE_Z
    cl = task_cluster if task_cluster is not None else counts  # never read without HAS_CLUSTER
    flags = dict(HAS_SHARED=RS > 0, HAS_TASK=RK > 0, RS_PAD=common.rank_pad(RS), RK_PAD=common.rank_pad(RK),
                 T_PAD=common.next_pow2(T), HAS_CLUSTER=task_cluster is not None, HAS_DROPOUT=dropout_p > 0,
                 UPCAST=common.upcast_operands(), DOT_PRECISION=common.dot_precision(x.dtype),
                 BLOCK_M=plan.BLOCK_M, BLOCK_K=plan.BLOCK_K)
    launch = dict(num_warps=plan.num_warps, num_stages=plan.num_stages,
                  **({"maxnreg": plan.maxnreg} if plan.maxnreg else {}))
    grids = plan.grids(max_tiles)
    zp = y  # never read without Z_FROM_PARTS
    zp_strides = (0, 0, 0)
    if plan.kind == "split":
        zp = torch.empty(plan.k_split, M, RS + RK, dtype=torch.float32, device=x.device)
        zp_strides = zp.stride()
        k_per = triton.cdiv(triton.cdiv(d_in, plan.k_split), plan.BLOCK_K) * plan.BLOCK_K
        _shrink_kernel[grids[0]](
            x, *x.stride(), shared_a, *shared_a.stride(), task_a, *task_a.stride(), cl,
            order, tile_task, tile_start, tile_end, counts,
            zp, *zp_strides, keep, stride_keep, float(dropout_p),
            M, d_in, RS, RK, T, tile_rows_n, plan.sub, k_per,
            **flags, **launch,
        )
    n_per = triton.cdiv(triton.cdiv(d_out, plan.n_split), plan.BLOCK_N) * plan.BLOCK_N
    _fwd_kernel[grids[-1]](
        x, *x.stride(), shared_a, *shared_a.stride(), shared_b, *shared_b.stride(),
        task_a, *task_a.stride(), task_b, *task_b.stride(),
        gates, gates.stride(0), gates.stride(1), cl,
        order, tile_task, tile_start, tile_end, counts,
        zp, *zp_strides,
        b, b.stride(0), b.stride(1), y, y.stride(0), y.stride(1), zt, zt.stride(0), zt.stride(1),
        keep, stride_keep, float(dropout_p), float(scaling),
        M, d_in, d_out, r, RS, RK, S, T, tile_rows_n, plan.sub, plan.k_split, n_per,
        PER_TOKEN_GATES=per_token_gates, HAS_BASE=base is not None, IN_PLACE=in_place, SAVE_Z=save_z,
        Z_FROM_PARTS=plan.kind == "split", BLOCK_N=plan.BLOCK_N, **flags, **launch,
    )
    return y, z
