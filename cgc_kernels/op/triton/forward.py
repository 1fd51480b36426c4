"""Fused CGC-LoRA forward: the whole LoRA branch of a layer in ONE launch.

Data flow (one program per tile of the routing's tile table; a tile = up to `block_m` rows of one task,
processed BLOCK_M rows at a time):

    rows   = order[tile_start:tile_end]                         original token indices (gather)
    h      = drop(x[rows])                                      [BLOCK_M, d_in], mask regenerated from seed
    z      = h @ [shared_a[c]; task_a[t]]^T                     ONE loop over d_in feeds both sides; fp32
    save z                                                      [M, (S+K) r] fp32, at the original rows
    zg     = z * gate(expert of each rank column) * scaling     per-task or per-token gates
    y      = (base[rows] +) zg @ [shared_b[c], task_b[t]]^T     loop over d_out blocks, scatter to rows

Rows are unique across tiles, so the scatter needs no atomics. Rows of task -1 belong to no tile: their
output stays the base (or 0) and their z is never read. The backward (backward.py) reads z instead
of recomputing A x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .dropout import keep_mask


@triton.jit
def load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, e, col_ok,
                    PER_TOKEN_GATES: tl.constexpr):
    """fp32 gate of each rank column's expert `e` [R_PAD]: [1, R_PAD] from the task's row of a task
    gate, or [BLOCK_M, R_PAD] from each token's row of a per-token gate (both broadcast over rows)."""
    if PER_TOKEN_GATES:
        g = tl.load(g_ptr + rows[:, None] * stride_gm + e[None, :] * stride_ge,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + t64 * stride_gm + e * stride_ge, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return g


@triton.jit
def _cgc_lora_fwd_kernel(
    x_ptr, stride_xm, stride_xk,  # [M, d_in]
    sa_ptr, stride_sac, stride_sar, stride_sak,  # shared_a [C, S*r, d_in]
    sb_ptr, stride_sbc, stride_sbn, stride_sbr,  # shared_b [C, d_out, S*r]
    ta_ptr, stride_tat, stride_tar, stride_tak,  # task_a [T, K*r, d_in]
    tb_ptr, stride_tbt, stride_tbn, stride_tbr,  # task_b [T, d_out, K*r]
    g_ptr, stride_gm, stride_ge,  # gates [T, S+K] or [M, S+K] (PER_TOKEN_GATES)
    cluster_ptr,  # task_cluster [T] (read only if HAS_CLUSTER)
    order_ptr,  # [M] int64 token indices sorted by task
    tile_task_ptr, tile_start_ptr, tile_end_ptr,  # [max_tiles] int32
    base_ptr, stride_bm, stride_bn,  # [M, d_out] added to the delta (HAS_BASE); may alias y
    y_ptr, stride_ym, stride_yn,  # [M, d_out] out
    z_ptr, stride_zm, stride_zr,  # [M, S*r + K*r] fp32 out: z = A drop(x), shared columns first
    seed_ptr,  # [1] int64 dropout seed (read only if HAS_DROPOUT)
    p_drop, scaling,
    d_in, d_out, r, RS, RK, S,  # RS = S*r, RK = K*r
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr,
    RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_Z: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_task_ptr + pid)
    if t < 0:  # unused slot of the fixed-size tile table
        return
    t64 = t.to(tl.int64)  # int64: t * stride overflows int32 for large T * r * d
    if HAS_CLUSTER:
        c64 = tl.load(cluster_ptr + t).to(tl.int64)
    else:
        c64 = t64 * 0
    tile_start = tl.load(tile_start_ptr + pid)
    tile_end = tl.load(tile_end_ptr + pid)
    in_dtype = x_ptr.dtype.element_ty
    op_dtype = tl.float32 if UPCAST else in_dtype  # interpreter: bf16 dot is wrong there

    rs = tl.arange(0, RS_PAD)
    rk = tl.arange(0, RK_PAD)
    rs_ok = rs < RS
    rk_ok = rk < RK
    inv_keep = 1.0 / (1.0 - p_drop)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    for m0 in range(tile_start, tile_end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        row_ok = pos < tile_end
        rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)

        # ---- z = drop(x) @ A^T, one pass over d_in for both sides ----
        z_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
        z_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < d_in
            h = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = keep_mask(seed, rows, kk, d_in, p_drop)
                h = tl.where(keep, h.to(tl.float32) * inv_keep, 0.0).to(in_dtype)
            h = h.to(op_dtype)
            if HAS_SHARED:
                a = tl.load(sa_ptr + c64 * stride_sac + rs[None, :] * stride_sar + kk[:, None] * stride_sak,
                            mask=rs_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, RS_PAD]
                z_s = tl.dot(h, a.to(op_dtype), z_s, input_precision=DOT_PRECISION)
            if HAS_TASK:
                a = tl.load(ta_ptr + t64 * stride_tat + rk[None, :] * stride_tar + kk[:, None] * stride_tak,
                            mask=rk_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, RK_PAD]
                z_t = tl.dot(h, a.to(op_dtype), z_t, input_precision=DOT_PRECISION)

        # ---- save z (fp32) and scale each rank column by its expert's gate and the scaling ----
        if HAS_SHARED:
            if SAVE_Z:
                tl.store(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr, z_s,
                         mask=row_ok[:, None] & rs_ok[None, :])
            e_s = rs // r  # gate column of each shared rank column
            g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, e_s, rs_ok,
                                  PER_TOKEN_GATES)
            zg_s = (z_s * g_s * scaling).to(op_dtype)
        if HAS_TASK:
            if SAVE_Z:
                tl.store(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr, z_t,
                         mask=row_ok[:, None] & rk_ok[None, :])
            e_t = S + rk // r
            g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, e_t, rk_ok,
                                  PER_TOKEN_GATES)
            zg_t = (z_t * g_t * scaling).to(op_dtype)

        # ---- y = (base +) zg @ B^T, one d_out block at a time ----
        for n0 in range(0, d_out, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            n_ok = nn < d_out
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_SHARED:
                b = tl.load(sb_ptr + c64 * stride_sbc + nn[None, :] * stride_sbn + rs[:, None] * stride_sbr,
                            mask=rs_ok[:, None] & n_ok[None, :], other=0.0)  # [RS_PAD, BLOCK_N]
                acc = tl.dot(zg_s, b.to(op_dtype), acc, input_precision=DOT_PRECISION)
            if HAS_TASK:
                b = tl.load(tb_ptr + t64 * stride_tbt + nn[None, :] * stride_tbn + rk[:, None] * stride_tbr,
                            mask=rk_ok[:, None] & n_ok[None, :], other=0.0)  # [RK_PAD, BLOCK_N]
                acc = tl.dot(zg_t, b.to(op_dtype), acc, input_precision=DOT_PRECISION)
            io = row_ok[:, None] & n_ok[None, :]
            if HAS_BASE:
                acc += tl.load(base_ptr + rows[:, None] * stride_bm + nn[None, :] * stride_bn,
                               mask=io, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows[:, None] * stride_ym + nn[None, :] * stride_yn,
                     acc.to(y_ptr.dtype.element_ty), mask=io)


# ---- block configuration ---------------------------------------------------------------------

# Tiers keyed on the padded stacked rank (shared + task side): z for BLOCK_M rows of both sides
# stays in registers, so BLOCK_M shrinks as the rank grows. Each tier is compiled for sm_80/sm_90 by
# tests/test_aot_compile.py at its largest rank and must not spill. The choice depends on dtype and
# rank only (no autotuning), so GPU runs are reproducible. PINNED serves the interpreter and tests
# (few large blocks: the interpreter pays per program and loop iteration); a GPU never picks it
# unless pinned explicitly, so the ahead-of-time check covers the tiers only.
FORWARD_TIERS = {
    "half": [
        (64, "r64", dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3)),
        (128, "r128", dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3)),
        (2 * common.MAX_RANK_PAD, "r256",
         dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2)),
    ],
    "fp32": [
        (2 * common.MAX_RANK_PAD, "r256",
         dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=2)),
    ],
}
FORWARD_PINNED = (64, "pinned", dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2))


def _rank_size(rs_pad: int, rk_pad: int, has_shared: bool, has_task: bool) -> int:
    return (rs_pad if has_shared else 0) + (rk_pad if has_task else 0)


def forward_config(M: int, d_in: int, d_out: int, rank_size: int, dtype: torch.dtype) -> dict:
    """Block sizes for the forward kernel, from shapes only. `rank_size` = padded S*r + padded K*r
    (sides that exist). BLOCK_M is the row sub-block within a routing tile."""
    if common.configs_pinned():
        return FORWARD_PINNED[2]
    return common.pick_tier(FORWARD_TIERS[common.tier_kind(dtype)], rank_size)[1]


def forward_config_space(dtype_name: str) -> list[tuple[str, dict, int, int]]:
    """Every config forward_config can return for a dtype, with the heaviest kernel flags and the
    largest rank it serves: (name, constexprs, num_warps, num_stages), for ahead-of-time checks."""
    kind = "fp32" if dtype_name == "fp32" else "half"
    out = []
    for limit, name, cfg in FORWARD_TIERS[kind]:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        consts = dict(HAS_SHARED=True, HAS_TASK=True, RS_PAD=limit // 2, RK_PAD=limit // 2,
                      PER_TOKEN_GATES=True, HAS_CLUSTER=True, HAS_BASE=True, HAS_DROPOUT=True, SAVE_Z=True,
                      UPCAST=False, DOT_PRECISION="ieee" if kind == "fp32" else "tf32", **cfg)
        out.append((name, consts, warps, stages))
    return out


# ---- launcher --------------------------------------------------------------------------------

def cgc_lora_forward(
    x: torch.Tensor,  # [M, d_in]
    gates: torch.Tensor,  # [T, S+K] or [M, S+K]
    shared_a: torch.Tensor, shared_b: torch.Tensor,  # [C, S*r, d_in], [C, d_out, S*r]
    task_a: torch.Tensor, task_b: torch.Tensor,  # [T, K*r, d_in], [T, d_out, K*r]
    task_cluster: torch.Tensor | None,  # [T] or None (one cluster)
    order: torch.Tensor, tile_task: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    scaling: float, per_token_gates: bool, dropout_p: float,
    seed: torch.Tensor | None,  # [1] int64 on x's device (dropout_p > 0), else None
    y: torch.Tensor,  # [M, d_out] written; pass the base output with base=y to add in place
    base: torch.Tensor | None = None,  # [M, d_out] or None
    save_z: bool = True,
) -> torch.Tensor | None:
    """Launch the fused forward; writes `y` (= base + delta, or delta) and returns
    z [M, (S+K) r] fp32 (None when not `save_z`: inference skips storing it)."""
    M, d_in = x.shape
    RS, RK = shared_a.shape[1], task_a.shape[1]
    d_out = task_b.shape[1]
    E = gates.shape[1]
    r = (RS + RK) // E
    S = RS // r
    # Zero-filled: rows of task -1 are never written, and the saved z must not hold garbage.
    z = torch.zeros(M, RS + RK, dtype=torch.float32, device=x.device) if save_z else None
    if M == 0 or tile_task.numel() == 0:
        return z
    rs_pad, rk_pad = common.rank_pad(RS), common.rank_pad(RK)
    cfg = dict(forward_config(M, d_in, d_out, _rank_size(rs_pad, rk_pad, RS > 0, RK > 0), x.dtype))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    b = y if base is None else base
    zt = z if z is not None else y  # never written without SAVE_Z
    grid = (tile_task.shape[0],)
    _cgc_lora_fwd_kernel[grid](
        x, x.stride(0), x.stride(1),
        shared_a, *shared_a.stride(), shared_b, *shared_b.stride(),
        task_a, *task_a.stride(), task_b, *task_b.stride(),
        gates, gates.stride(0), gates.stride(1),
        task_cluster if task_cluster is not None else tile_task,
        order, tile_task, tile_start, tile_end,
        b, b.stride(0), b.stride(1),
        y, y.stride(0), y.stride(1),
        zt, zt.stride(0), zt.stride(1),
        seed if seed is not None else tile_task, float(dropout_p), float(scaling),
        d_in, d_out, r, RS, RK, S,
        HAS_SHARED=RS > 0, HAS_TASK=RK > 0, RS_PAD=rs_pad, RK_PAD=rk_pad,
        PER_TOKEN_GATES=per_token_gates, HAS_CLUSTER=task_cluster is not None,
        HAS_BASE=base is not None, HAS_DROPOUT=dropout_p > 0, SAVE_Z=save_z,
        UPCAST=common.upcast_operands(), DOT_PRECISION=common.dot_precision(x.dtype),
        **cfg, num_warps=warps, num_stages=stages,
    )
    return z
