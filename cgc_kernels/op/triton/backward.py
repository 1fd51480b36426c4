"""Fused CGC-LoRA backward: two launches, deterministic (no float atomics).

With zg = z * g * s (z saved by the forward, g each rank column's gate) and h = drop(x):

    launch 1, per routing tile (like the forward):
        dz     = dy[rows] @ [shared_b[c], task_b[t]]         ONE pass over dy (d_out loop)
        dzg    = dz * g * s                                  saved [M, (S+K) r] fp32 for launch 2
        dgates = s * sum_{rank cols of e} dz * z             per token, or per-tile partial sums
        dx     = drop'(dzg @ [shared_a[c]; task_a[t]])       d_in loop, scattered to the tile's rows
    launch 2, grouped reductions, one program per (segment, output block):
        segment = a cluster (its shared experts: every token of every task of the cluster)
               or a task (its own experts: that task's tokens)
        dA[seg] = dzg[seg rows]^T @ h[seg rows]              programs over d_in blocks
        dB[seg] = dy[seg rows]^T @ zg[seg rows]              programs over d_out blocks
    per-task dgates: the per-tile partials summed per task by a one-hot product (fixed order).

Each program loops over its rows in a fixed order, so the gradients are bitwise reproducible.
Loop bounds (task segments, tiles) are read from device tensors: no host sync, fixed grids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .dropout import keep_mask
from .forward import load_rank_gates


@triton.jit
def _cgc_lora_bwd_tile_kernel(
    dy_ptr, stride_dym, stride_dyn,  # [M, d_out]
    sa_ptr, stride_sac, stride_sar, stride_sak,  # shared_a [C, S*r, d_in]
    sb_ptr, stride_sbc, stride_sbn, stride_sbr,  # shared_b [C, d_out, S*r]
    ta_ptr, stride_tat, stride_tar, stride_tak,  # task_a [T, K*r, d_in]
    tb_ptr, stride_tbt, stride_tbn, stride_tbr,  # task_b [T, d_out, K*r]
    g_ptr, stride_gm, stride_ge,  # gates [T, S+K] or [M, S+K]
    cluster_ptr,  # [T] (HAS_CLUSTER)
    order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr,  # routing
    z_ptr, stride_zm, stride_zr,  # [M, S*r + K*r] fp32, saved by the forward
    dzg_ptr, stride_dzm, stride_dzr,  # [M, S*r + K*r] fp32 out (WANT_DZ)
    dx_ptr, stride_dxm, stride_dxk,  # [M, d_in] out (WANT_DX)
    dg_ptr, stride_dgm, stride_dge,  # [M, S+K] per-token dgates, or [max_tiles, E_PAD] partials (WANT_DGATE)
    seed_ptr,  # [1] int64 dropout seed of the forward (read only if HAS_DROPOUT)
    p_drop, scaling,
    d_in, d_out, r, RS, RK, S, E,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr,
    RS_PAD: tl.constexpr, RK_PAD: tl.constexpr, E_PAD: tl.constexpr,
    PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DGATE: tl.constexpr, WANT_DZ: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_task_ptr + pid)
    if t < 0:
        return
    t64 = t.to(tl.int64)
    if HAS_CLUSTER:
        c64 = tl.load(cluster_ptr + t).to(tl.int64)
    else:
        c64 = t64 * 0
    tile_start = tl.load(tile_start_ptr + pid)
    tile_end = tl.load(tile_end_ptr + pid)
    in_dtype = dy_ptr.dtype.element_ty
    op_dtype = tl.float32 if UPCAST else in_dtype

    rs = tl.arange(0, RS_PAD)
    rk = tl.arange(0, RK_PAD)
    rs_ok = rs < RS
    rk_ok = rk < RK
    e = tl.arange(0, E_PAD)
    # One-hot [rank column, gate column] maps, to sum dz * z over each expert's r columns by a dot.
    oh_s = ((rs[:, None] // r == e[None, :]) & rs_ok[:, None]).to(tl.float32)
    oh_t = (((S + rk[:, None] // r) == e[None, :]) & rk_ok[:, None]).to(tl.float32)
    dg_tile = tl.zeros([E_PAD], dtype=tl.float32)
    inv_keep = 1.0 / (1.0 - p_drop)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    for m0 in range(tile_start, tile_end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        row_ok = pos < tile_end
        rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)

        # ---- dz = dy @ B, one pass over dy ----
        dz_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
        dz_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
        for n0 in range(0, d_out, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < d_out
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(op_dtype)
            if HAS_SHARED:
                b = tl.load(sb_ptr + c64 * stride_sbc + nn[:, None] * stride_sbn + rs[None, :] * stride_sbr,
                            mask=n_ok[:, None] & rs_ok[None, :], other=0.0)  # [BLOCK_N, RS_PAD]
                dz_s = tl.dot(dy, b.to(op_dtype), dz_s, input_precision=DOT_PRECISION)
            if HAS_TASK:
                b = tl.load(tb_ptr + t64 * stride_tbt + nn[:, None] * stride_tbn + rk[None, :] * stride_tbr,
                            mask=n_ok[:, None] & rk_ok[None, :], other=0.0)  # [BLOCK_N, RK_PAD]
                dz_t = tl.dot(dy, b.to(op_dtype), dz_t, input_precision=DOT_PRECISION)

        # ---- gates per rank column; dzg = dz * g * s; dgates = s * sum dz * z per expert ----
        dg_rows = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
        if HAS_SHARED:
            e_s = rs // r
            g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, e_s, rs_ok,
                                  PER_TOKEN_GATES)
            dzg_s = dz_s * g_s * scaling
            if WANT_DZ:
                tl.store(dzg_ptr + rows[:, None] * stride_dzm + rs[None, :] * stride_dzr, dzg_s,
                         mask=row_ok[:, None] & rs_ok[None, :])
            if WANT_DGATE:
                z_s = tl.load(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr,
                              mask=row_ok[:, None] & rs_ok[None, :], other=0.0)
                dg_rows = tl.dot(dz_s * z_s, oh_s, dg_rows, input_precision="ieee")
        if HAS_TASK:
            e_t = S + rk // r
            g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, e_t, rk_ok,
                                  PER_TOKEN_GATES)
            dzg_t = dz_t * g_t * scaling
            if WANT_DZ:
                tl.store(dzg_ptr + rows[:, None] * stride_dzm + (RS + rk)[None, :] * stride_dzr, dzg_t,
                         mask=row_ok[:, None] & rk_ok[None, :])
            if WANT_DGATE:
                z_t = tl.load(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr,
                              mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
                dg_rows = tl.dot(dz_t * z_t, oh_t, dg_rows, input_precision="ieee")
        if WANT_DGATE:
            dg_rows = dg_rows * scaling
            if PER_TOKEN_GATES:
                tl.store(dg_ptr + rows[:, None] * stride_dgm + e[None, :] * stride_dge,
                         dg_rows.to(dg_ptr.dtype.element_ty), mask=row_ok[:, None] & (e < E)[None, :])
            else:
                dg_tile += tl.sum(dg_rows, axis=0)

        # ---- dx = drop'(dzg @ A), one d_in block at a time ----
        if WANT_DX:
            if HAS_SHARED:
                dzg_s_op = dzg_s.to(op_dtype)
            if HAS_TASK:
                dzg_t_op = dzg_t.to(op_dtype)
            for k0 in range(0, d_in, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < d_in
                acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                if HAS_SHARED:
                    a = tl.load(sa_ptr + c64 * stride_sac + rs[:, None] * stride_sar
                                + kk[None, :] * stride_sak,
                                mask=rs_ok[:, None] & k_ok[None, :], other=0.0)  # [RS_PAD, BLOCK_K]
                    acc = tl.dot(dzg_s_op, a.to(op_dtype), acc, input_precision=DOT_PRECISION)
                if HAS_TASK:
                    a = tl.load(ta_ptr + t64 * stride_tat + rk[:, None] * stride_tar
                                + kk[None, :] * stride_tak,
                                mask=rk_ok[:, None] & k_ok[None, :], other=0.0)  # [RK_PAD, BLOCK_K]
                    acc = tl.dot(dzg_t_op, a.to(op_dtype), acc, input_precision=DOT_PRECISION)
                if HAS_DROPOUT:
                    keep = keep_mask(seed, rows, kk, d_in, p_drop)
                    acc = tl.where(keep, acc * inv_keep, 0.0)
                tl.store(dx_ptr + rows[:, None] * stride_dxm + kk[None, :] * stride_dxk,
                         acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])

    if WANT_DGATE:
        if not PER_TOKEN_GATES:
            # This tile's partial sum; the launcher reduces partials per task in a fixed order.
            tl.store(dg_ptr + pid * stride_dgm + e * stride_dge, dg_tile)


@triton.jit
def _cgc_lora_bwd_weight_kernel(
    x_ptr, stride_xm, stride_xk,  # [M, d_in]
    dy_ptr, stride_dym, stride_dyn,  # [M, d_out]
    z_ptr, stride_zm, stride_zr,  # [M, S*r + K*r] fp32 (forward)
    dzg_ptr, stride_dzm, stride_dzr,  # [M, S*r + K*r] fp32 (launch 1)
    g_ptr, stride_gm, stride_ge,  # gates
    cluster_ptr,  # [T] (HAS_CLUSTER)
    order_ptr, counts_ptr, starts_ptr,  # routing: task segments of `order`
    dsa_ptr, stride_dsac, stride_dsar, stride_dsak,  # [C, S*r, d_in] out
    dsb_ptr, stride_dsbc, stride_dsbn, stride_dsbr,  # [C, d_out, S*r] out
    dta_ptr, stride_dtat, stride_dtar, stride_dtak,  # [T, K*r, d_in] out
    dtb_ptr, stride_dtbt, stride_dtbn, stride_dtbr,  # [T, d_out, K*r] out
    seed_ptr,  # [1] int64 dropout seed of the forward (read only if HAS_DROPOUT)
    p_drop, scaling,
    d_in, d_out, r, RS, RK, S, C, T,
    n_a_blocks,  # programs along axis 1 doing dA (d_in blocks); the rest do dB (d_out blocks)
    PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seg = tl.program_id(0)  # [0, C): a cluster's shared experts; [C, C+T): a task's experts
    blk = tl.program_id(1)
    is_shared = seg < C
    if is_shared:
        R = RS
        col0 = 0
        gcol0 = 0
        t_lo = 0
        t_hi = T
        owner = seg.to(tl.int64)
    else:
        R = RK
        col0 = RS
        gcol0 = S
        t_lo = seg - C
        t_hi = seg - C + 1
        owner = (seg - C).to(tl.int64)
    if R == 0:  # this side has no experts
        return
    in_dtype = x_ptr.dtype.element_ty
    op_dtype = tl.float32 if UPCAST else in_dtype
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    inv_keep = 1.0 / (1.0 - p_drop)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    if blk < n_a_blocks:
        # ---- dA block: [R_PAD, BLOCK_K] = sum over the segment's rows of dzg^T h ----
        kk = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < d_in
        acc_a = tl.zeros([R_PAD, BLOCK_K], dtype=tl.float32)
        for tt in range(t_lo, t_hi):
            start = tl.load(starts_ptr + tt)
            end = start + tl.load(counts_ptr + tt)
            if is_shared:
                if HAS_CLUSTER:
                    # Only the cluster's own tasks; an empty range skips the others.
                    end = tl.where(tl.load(cluster_ptr + tt) == seg, end, start)
            for p0 in range(start, end, BLOCK_R):
                pos = p0 + tl.arange(0, BLOCK_R)
                row_ok = pos < end
                rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                dz = tl.load(dzg_ptr + rows[:, None] * stride_dzm + (col0 + rr)[None, :] * stride_dzr,
                             mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_R, R_PAD]
                h = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
                if HAS_DROPOUT:
                    keep = keep_mask(seed, rows, kk, d_in, p_drop)
                    h = tl.where(keep, h.to(tl.float32) * inv_keep, 0.0).to(in_dtype)
                acc_a = tl.dot(tl.trans(dz.to(op_dtype)), h.to(op_dtype), acc_a,
                               input_precision=DOT_PRECISION)
        if is_shared:
            da_ptr = dsa_ptr + owner * stride_dsac + rr[:, None] * stride_dsar + kk[None, :] * stride_dsak
        else:
            da_ptr = dta_ptr + owner * stride_dtat + rr[:, None] * stride_dtar + kk[None, :] * stride_dtak
        tl.store(da_ptr, acc_a.to(dsa_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])
    else:
        # ---- dB block: [BLOCK_N, R_PAD] = sum over the segment's rows of dy^T zg ----
        nn = (blk - n_a_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = nn < d_out
        acc = tl.zeros([BLOCK_N, R_PAD], dtype=tl.float32)
        gcol = gcol0 + rr // r
        for tt in range(t_lo, t_hi):
            start = tl.load(starts_ptr + tt)
            end = start + tl.load(counts_ptr + tt)
            if is_shared:
                if HAS_CLUSTER:
                    end = tl.where(tl.load(cluster_ptr + tt) == seg, end, start)
            if not PER_TOKEN_GATES:
                g = tl.load(g_ptr + tt * stride_gm + gcol * stride_ge, mask=r_ok, other=0.0)
                g = g.to(tl.float32)[None, :] * scaling
            for p0 in range(start, end, BLOCK_R):
                pos = p0 + tl.arange(0, BLOCK_R)
                row_ok = pos < end
                rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                zr = tl.load(z_ptr + rows[:, None] * stride_zm + (col0 + rr)[None, :] * stride_zr,
                             mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_R, R_PAD]
                if PER_TOKEN_GATES:
                    gr = tl.load(g_ptr + rows[:, None] * stride_gm + gcol[None, :] * stride_ge,
                                 mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                    zg = zr * gr * scaling
                else:
                    zg = zr * g
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
                acc = tl.dot(tl.trans(dy.to(op_dtype)), zg.to(op_dtype), acc, input_precision=DOT_PRECISION)
        if is_shared:
            db_ptr = dsb_ptr + owner * stride_dsbc + nn[:, None] * stride_dsbn + rr[None, :] * stride_dsbr
        else:
            db_ptr = dtb_ptr + owner * stride_dtbt + nn[:, None] * stride_dtbn + rr[None, :] * stride_dtbr
        tl.store(db_ptr, acc.to(dsb_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])


# ---- block configuration ---------------------------------------------------------------------

# Tiers keyed on padded rank, as in forward.py; each is compiled ahead of time at its largest rank
# and must not spill. Launch 1 holds dz (and dzg) for BLOCK_M rows of both sides; launch 2 holds a
# [R_PAD, BLOCK_K] or [BLOCK_N, R_PAD] accumulator for ONE side (R_PAD = the larger side's pad).
TILE_TIERS = {
    "half": [
        (64, "r64", dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=3)),
        (128, "r128", dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=3)),
        # 16-wide d blocks: with 32, Triton 3.6 spills on sm_80 (36 B)
        (2 * common.MAX_RANK_PAD, "r256",
         dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2)),
    ],
    "fp32": [
        # spill-free under Triton 3.6 and 3.7 (BLOCK_M 32 spills on sm_80 under both)
        (64, "r64", dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=4, num_stages=2)),
        (2 * common.MAX_RANK_PAD, "r256",
         dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2)),
    ],
}
# Per-Triton-version replacements of whole tiers lists, where no config serves both versions.
# Triton 3.6 spills the fp32 tile kernel at rank 256 on sm_90 with every block shape tried (12 B at
# best), so there fp32 stops at a padded rank of 128 and larger fp32 problems take the reference.
TILE_TIERS_BY_VERSION = {
    (3, 6): {"fp32": [
        (64, "r64", dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=4, num_stages=2)),
        (128, "r128", dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2)),
    ]},
}
TILE_PINNED = (64, "pinned", dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2))

WEIGHT_TIERS = {
    "half": [
        # 8 warps: with 4, Triton 3.6 spills (sm_80 164 B, sm_90 68 B)
        (64, "r64", dict(BLOCK_R=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=3)),
        (common.MAX_RANK_PAD, "r128", dict(BLOCK_R=32, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=3)),
    ],
    "fp32": [
        (64, "r64", dict(BLOCK_R=16, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=2)),
        (common.MAX_RANK_PAD, "r128", dict(BLOCK_R=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2)),
    ],
}
WEIGHT_PINNED = (64, "pinned", dict(BLOCK_R=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2))


def tile_tiers() -> dict:
    """TILE_TIERS with this Triton version's replacements (TILE_TIERS_BY_VERSION)."""
    return {**TILE_TIERS, **TILE_TIERS_BY_VERSION.get(common.triton_version(), {})}


def max_rank_size(dtype: torch.dtype) -> int:
    """Largest padded rank (both sides) the backward takes for `dtype` under this Triton version."""
    return tile_tiers()[common.tier_kind(dtype)][-1][0]


def backward_tile_config(M: int, d_in: int, d_out: int, rank_size: int, dtype: torch.dtype) -> dict:
    """Block sizes for launch 1 (per tile: dz, dgates, dx), from shapes only; `rank_size` as in
    forward_config."""
    if common.configs_pinned():
        return TILE_PINNED[2]
    return common.pick_tier(tile_tiers()[common.tier_kind(dtype)], rank_size)[1]


def backward_weight_config(M: int, d_in: int, d_out: int, r_pad: int, dtype: torch.dtype) -> dict:
    """Block sizes for launch 2 (grouped dA / dB reductions), from shapes only."""
    if common.configs_pinned():
        return WEIGHT_PINNED[2]
    return common.pick_tier(WEIGHT_TIERS[common.tier_kind(dtype)], r_pad)[1]


def _space(tiers, pinned, dtype_name, consts_for):
    kind = "fp32" if dtype_name == "fp32" else "half"
    out = []
    for limit, name, cfg in tiers[kind]:  # the pinned config is for the interpreter (see forward.py)
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        out.append((name, dict(consts_for(limit), UPCAST=False,
                               DOT_PRECISION="ieee" if kind == "fp32" else "tf32", **cfg), warps, stages))
    return out


def backward_tile_config_space(dtype_name: str) -> list[tuple[str, dict, int, int]]:
    """Every config of launch 1 with its heaviest flags and largest rank (ahead-of-time checks)."""
    return _space(tile_tiers(), TILE_PINNED, dtype_name, lambda limit: dict(
        HAS_SHARED=True, HAS_TASK=True, RS_PAD=limit // 2, RK_PAD=limit // 2, E_PAD=16,
        PER_TOKEN_GATES=True, HAS_CLUSTER=True, HAS_DROPOUT=True, WANT_DX=True, WANT_DGATE=True,
        WANT_DZ=True))


def backward_weight_config_space(dtype_name: str) -> list[tuple[str, dict, int, int]]:
    """Every config of launch 2 with its heaviest flags and largest rank (ahead-of-time checks)."""
    return _space(WEIGHT_TIERS, WEIGHT_PINNED, dtype_name, lambda limit: dict(
        PER_TOKEN_GATES=True, HAS_CLUSTER=True, HAS_DROPOUT=True, R_PAD=limit))


# ---- launcher --------------------------------------------------------------------------------

def _launch_args(cfg: dict) -> tuple[dict, int, int]:
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def cgc_lora_backward(
    dy: torch.Tensor,  # [M, d_out]
    x: torch.Tensor,  # [M, d_in]
    gates: torch.Tensor,  # [T, S+K] or [M, S+K]
    shared_a: torch.Tensor, shared_b: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor,
    task_cluster: torch.Tensor | None,
    order: torch.Tensor, tile_task: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    counts: torch.Tensor, starts: torch.Tensor,
    z: torch.Tensor,  # [M, S*r + K*r] fp32 from the forward
    scaling: float, per_token_gates: bool, dropout_p: float,
    seed: torch.Tensor | None,  # [1] int64, the forward's (dropout_p > 0), else None
    need_x: bool, need_gates: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b); None where not needed."""
    M, d_in = x.shape
    C, RS = shared_a.shape[0], shared_a.shape[1]
    T, RK = task_a.shape[0], task_a.shape[1]
    d_out = task_b.shape[1]
    E = gates.shape[1]
    r = (RS + RK) // E
    S = RS // r
    dev = x.device
    rs_pad, rk_pad = common.rank_pad(RS), common.rank_pad(RK)
    e_pad = common.next_pow2(E, 16)
    cl = task_cluster if task_cluster is not None else tile_task  # never read without HAS_CLUSTER
    interp = common.upcast_operands()
    prec = common.dot_precision(x.dtype)
    seed_t = seed if seed is not None else tile_task  # never read without HAS_DROPOUT

    dx = torch.zeros_like(x) if need_x else None
    dgates = None
    if need_gates:
        dgates = torch.zeros_like(gates) if per_token_gates else torch.zeros(
            tile_task.shape[0], e_pad, dtype=torch.float32, device=dev)
    dzg = torch.zeros(M, RS + RK, dtype=torch.float32, device=dev) if need_a else None
    n_tiles = tile_task.shape[0]

    if (need_x or need_gates or need_a) and M > 0 and n_tiles > 0:
        rank_size = (rs_pad if RS else 0) + (rk_pad if RK else 0)
        cfg, warps, stages = _launch_args(backward_tile_config(M, d_in, d_out, rank_size, x.dtype))
        dummy = z
        dxt = dx if dx is not None else x
        dgt = dgates if dgates is not None else z
        dzt = dzg if dzg is not None else dummy
        _cgc_lora_bwd_tile_kernel[(n_tiles,)](
            dy, dy.stride(0), dy.stride(1),
            shared_a, *shared_a.stride(), shared_b, *shared_b.stride(),
            task_a, *task_a.stride(), task_b, *task_b.stride(),
            gates, gates.stride(0), gates.stride(1),
            cl, order, tile_task, tile_start, tile_end,
            z, z.stride(0), z.stride(1),
            dzt, dzt.stride(0), dzt.stride(1),
            dxt, dxt.stride(0), dxt.stride(1),
            dgt, dgt.stride(0), dgt.stride(1),
            seed_t, float(dropout_p), float(scaling),
            d_in, d_out, r, RS, RK, S, E,
            HAS_SHARED=RS > 0, HAS_TASK=RK > 0, RS_PAD=rs_pad, RK_PAD=rk_pad, E_PAD=e_pad,
            PER_TOKEN_GATES=per_token_gates, HAS_CLUSTER=task_cluster is not None,
            HAS_DROPOUT=dropout_p > 0,
            WANT_DX=need_x, WANT_DGATE=need_gates, WANT_DZ=need_a,
            UPCAST=interp, DOT_PRECISION=prec,
            **cfg, num_warps=warps, num_stages=stages,
        )
    if need_gates and not per_token_gates:
        # Per-task sum of the per-tile partials: a one-hot product in fp64, fixed order (index_add
        # on CUDA would use float atomics). [T, n_tiles] @ [n_tiles, E].
        onehot = tile_task.to(torch.int64)[None, :] == torch.arange(T, device=dev)[:, None]
        dgates = (onehot.double() @ dgates[:, :E].double()).to(gates.dtype)

    dsa = dsb = dta = dtb = None
    if need_a:
        dsa, dta = torch.empty_like(shared_a), torch.empty_like(task_a)
    if need_b:
        dsb, dtb = torch.empty_like(shared_b), torch.empty_like(task_b)
    if (need_a or need_b) and (RS + RK) > 0:
        r_pad = max(rs_pad if RS else 16, rk_pad if RK else 16)
        cfg, warps, stages = _launch_args(backward_weight_config(M, d_in, d_out, r_pad, x.dtype))
        n_a = triton.cdiv(d_in, cfg["BLOCK_K"]) if need_a else 0
        n_b = triton.cdiv(d_out, cfg["BLOCK_N"]) if need_b else 0
        # Unwanted outputs point at a wanted one of the same dtype; their branch never runs.
        dsa_t = dsa if dsa is not None else shared_a
        dta_t = dta if dta is not None else task_a
        dsb_t = dsb if dsb is not None else shared_b
        dtb_t = dtb if dtb is not None else task_b
        dzt = dzg if dzg is not None else z
        if n_a + n_b > 0:
            _cgc_lora_bwd_weight_kernel[(C + T, n_a + n_b)](
                x, x.stride(0), x.stride(1),
                dy, dy.stride(0), dy.stride(1),
                z, z.stride(0), z.stride(1),
                dzt, dzt.stride(0), dzt.stride(1),
                gates, gates.stride(0), gates.stride(1),
                cl, order, counts, starts,
                dsa_t, *dsa_t.stride(), dsb_t, *dsb_t.stride(),
                dta_t, *dta_t.stride(), dtb_t, *dtb_t.stride(),
                seed_t, float(dropout_p), float(scaling),
                d_in, d_out, r, RS, RK, S, C, T, n_a,
                PER_TOKEN_GATES=per_token_gates, HAS_CLUSTER=task_cluster is not None,
                HAS_DROPOUT=dropout_p > 0, UPCAST=interp, DOT_PRECISION=prec, R_PAD=r_pad,
                **cfg, num_warps=warps, num_stages=stages,
            )
    return dx, dgates, dsa, dsb, dta, dtb
