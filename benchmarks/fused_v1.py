"""The first fused kernels as a benchmark provider, `fused_v1`: one program per routing tile.

Kept outside the package until a GPU run has timed them beside the kernels `cgc_lora` dispatches
to (cgc_kernels/op/triton/forward.py, backward.py); then the slower set is deleted. Only the
benchmarks' call pattern is served: one cluster, per-task gates, no dropout, y = the delta.

    forward, grid (tiles):  z = x[rows] @ A^T (both sides), saved; y[rows] = (z * g * s) @ B^T
    backward launch 1, grid (tiles):  dz = dy @ B, dzg = dz * g * s (saved), per-tile dgates
        partials, dx = dzg @ A
    backward launch 2, grid (cluster + tasks, d blocks): dA = dzg^T x, dB = dy^T (z * g * s)
        over each owner's rows, one side per program

The device loops are the package's (cgc_kernels/op/triton/kernel_utils.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cgc_kernels.op.routing import TaskRouting
from cgc_kernels.op.triton import common
from cgc_kernels.op.triton.kernel_utils import dy_times_b, expand_rows, load_rank_gates, shrink_rows, write_dx


@triton.jit
def _v1_fwd_kernel(
    x_ptr, stride_xm, stride_xk, sa_ptr, stride_sar, stride_sak, sb_ptr, stride_sbn, stride_sbr,
    ta_ptr, stride_tat, stride_tar, stride_tak, tb_ptr, stride_tbt, stride_tbn, stride_tbr,
    g_ptr, stride_gm, stride_ge, order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr,
    y_ptr, stride_ym, stride_yn, z_ptr, stride_zm, stride_zr,
    scaling, d_in, d_out, r, RS, RK, S,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_task_ptr + pid)
    if t >= 0:
        t64 = t.to(tl.int64)
        lo = tl.load(tile_start_ptr + pid)
        hi = tl.load(tile_end_ptr + pid)
        op_dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        rs = tl.arange(0, RS_PAD)
        rk = tl.arange(0, RK_PAD)
        rs_ok = rs < RS
        rk_ok = rk < RK
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            z_s, z_t = shrink_rows(x_ptr, stride_xm, stride_xk, rows, row_ok, 0, d_in, d_in, sa_ptr, stride_sar,
                                   stride_sak, ta_ptr + t64 * stride_tat, stride_tar, stride_tak,
                                   rs, rs_ok, rk, rk_ok, 0, 0.0, HAS_SHARED, HAS_TASK, False, op_dtype,
                                   DOT_PRECISION, BLOCK_M, BLOCK_K, RS_PAD, RK_PAD)
            tl.store(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr, z_s,
                     mask=row_ok[:, None] & rs_ok[None, :])
            tl.store(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr, z_t,
                     mask=row_ok[:, None] & rk_ok[None, :])
            g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, rs // r, rs_ok, False)
            g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, S + rk // r, rk_ok, False)
            expand_rows((z_s * g_s * scaling).to(op_dtype), (z_t * g_t * scaling).to(op_dtype), rows, row_ok,
                        0, d_out, d_out, sb_ptr, stride_sbn, stride_sbr, tb_ptr + t64 * stride_tbt, stride_tbn,
                        stride_tbr, rs, rs_ok, rk, rk_ok, y_ptr, 0, 0, y_ptr, stride_ym, stride_yn,
                        HAS_SHARED, HAS_TASK, False, op_dtype, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _v1_bwd_tile_kernel(
    dy_ptr, stride_dym, stride_dyn, sa_ptr, stride_sar, stride_sak, sb_ptr, stride_sbn, stride_sbr,
    ta_ptr, stride_tat, stride_tar, stride_tak, tb_ptr, stride_tbt, stride_tbn, stride_tbr,
    g_ptr, stride_gm, stride_ge, order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr,
    z_ptr, stride_zm, stride_zr, dzg_ptr, stride_dzm, stride_dzr, dx_ptr, stride_dxm, stride_dxk,
    dg_ptr, stride_dgm, stride_dge,  # [tiles, E_PAD] per-tile dgates partials
    scaling, d_in, d_out, r, RS, RK, S,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    E_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_task_ptr + pid)
    e = tl.arange(0, E_PAD)
    dg_tile = tl.zeros([E_PAD], dtype=tl.float32)
    if t >= 0:
        t64 = t.to(tl.int64)
        lo = tl.load(tile_start_ptr + pid)
        hi = tl.load(tile_end_ptr + pid)
        op_dtype = tl.float32 if UPCAST else dy_ptr.dtype.element_ty
        rs = tl.arange(0, RS_PAD)
        rk = tl.arange(0, RK_PAD)
        rs_ok = rs < RS
        rk_ok = rk < RK
        oh_s = ((rs[:, None] // r == e[None, :]) & rs_ok[:, None]).to(tl.float32)
        oh_t = (((S + rk[:, None] // r) == e[None, :]) & rk_ok[:, None]).to(tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            dz_s, dz_t = dy_times_b(dy_ptr, stride_dym, stride_dyn, rows, row_ok, d_out, sb_ptr, stride_sbn,
                                    stride_sbr, tb_ptr + t64 * stride_tbt, stride_tbn, stride_tbr,
                                    rs, rs_ok, rk, rk_ok, HAS_SHARED, HAS_TASK, op_dtype, DOT_PRECISION,
                                    BLOCK_M, BLOCK_N, RS_PAD, RK_PAD)
            g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, rs // r, rs_ok, False)
            g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, S + rk // r, rk_ok, False)
            dzg_s = dz_s * g_s * scaling
            dzg_t = dz_t * g_t * scaling
            tl.store(dzg_ptr + rows[:, None] * stride_dzm + rs[None, :] * stride_dzr, dzg_s,
                     mask=row_ok[:, None] & rs_ok[None, :])
            tl.store(dzg_ptr + rows[:, None] * stride_dzm + (RS + rk)[None, :] * stride_dzr, dzg_t,
                     mask=row_ok[:, None] & rk_ok[None, :])
            z_s = tl.load(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr,
                          mask=row_ok[:, None] & rs_ok[None, :], other=0.0)
            z_t = tl.load(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr,
                          mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
            dg_rows = tl.dot(dz_s * z_s, oh_s, input_precision="ieee")
            dg_rows = tl.dot(dz_t * z_t, oh_t, dg_rows, input_precision="ieee")
            dg_tile += tl.sum(dg_rows, axis=0) * scaling
            write_dx(dzg_s.to(op_dtype), dzg_t.to(op_dtype), rows, row_ok, d_in, sa_ptr, stride_sar, stride_sak,
                     ta_ptr + t64 * stride_tat, stride_tar, stride_tak, rs, rs_ok, rk, rk_ok,
                     dx_ptr, stride_dxm, stride_dxk, 0, 0.0, HAS_SHARED, HAS_TASK, False, op_dtype,
                     DOT_PRECISION, BLOCK_M, BLOCK_K)
    tl.store(dg_ptr + pid * stride_dgm + e * stride_dge, dg_tile)


@triton.jit
def _v1_bwd_weight_kernel(
    x_ptr, stride_xm, stride_xk, dy_ptr, stride_dym, stride_dyn, z_ptr, stride_zm, stride_zr,
    dzg_ptr, stride_dzm, stride_dzr, g_ptr, stride_gm, stride_ge, order_ptr, counts_ptr, starts_ptr,
    dsa_ptr, stride_dsar, stride_dsak, dsb_ptr, stride_dsbn, stride_dsbr,  # one cluster's
    dta_ptr, stride_dtat, stride_dtar, stride_dtak, dtb_ptr, stride_dtbt, stride_dtbn, stride_dtbr,
    scaling, d_in, d_out, r, RS, RK, S, T,
    n_a_blocks,  # programs along axis 1 doing dA (d_in blocks); the rest do dB (d_out blocks)
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seg = tl.program_id(0)  # 0: the cluster's shared experts (every task's rows); 1 + t: task t's
    blk = tl.program_id(1)
    is_shared = seg == 0
    R = tl.where(is_shared, RS, RK)
    col0 = tl.where(is_shared, 0, RS)
    gcol0 = tl.where(is_shared, 0, S)
    t_lo = tl.where(is_shared, 0, seg - 1)
    t_hi = tl.where(is_shared, T, seg)
    owner = (seg - 1).to(tl.int64)
    if R > 0:
        op_dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        if blk < n_a_blocks:
            kk = blk * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < d_in
            acc_a = tl.zeros([R_PAD, BLOCK_K], dtype=tl.float32)
            for tt in range(t_lo, t_hi):
                start = tl.load(starts_ptr + tt)
                end = start + tl.load(counts_ptr + tt)
                for p0 in range(start, end, BLOCK_R):
                    pos = p0 + tl.arange(0, BLOCK_R)
                    row_ok = pos < end
                    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                    dz = tl.load(dzg_ptr + rows[:, None] * stride_dzm + (col0 + rr)[None, :] * stride_dzr,
                                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                    h = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    acc_a = tl.dot(tl.trans(dz.to(op_dtype)), h.to(op_dtype), acc_a, input_precision=DOT_PRECISION)
            if is_shared:
                da_ptr = dsa_ptr + rr[:, None] * stride_dsar + kk[None, :] * stride_dsak
            else:
                da_ptr = dta_ptr + owner * stride_dtat + rr[:, None] * stride_dtar + kk[None, :] * stride_dtak
            tl.store(da_ptr, acc_a.to(dsa_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])
        else:
            nn = (blk - n_a_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = nn < d_out
            acc = tl.zeros([BLOCK_N, R_PAD], dtype=tl.float32)
            for tt in range(t_lo, t_hi):
                start = tl.load(starts_ptr + tt)
                end = start + tl.load(counts_ptr + tt)
                g = load_rank_gates(g_ptr, stride_gm, stride_ge, tt, rr, r_ok, gcol0 + rr // r, r_ok,
                                    False) * scaling
                for p0 in range(start, end, BLOCK_R):
                    pos = p0 + tl.arange(0, BLOCK_R)
                    row_ok = pos < end
                    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                    zr = tl.load(z_ptr + rows[:, None] * stride_zm + (col0 + rr)[None, :] * stride_zr,
                                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                                 mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = tl.dot(tl.trans(dy.to(op_dtype)), (zr * g).to(op_dtype), acc, input_precision=DOT_PRECISION)
            if is_shared:
                db_ptr = dsb_ptr + nn[:, None] * stride_dsbn + rr[None, :] * stride_dsbr
            else:
                db_ptr = dtb_ptr + owner * stride_dtbt + nn[:, None] * stride_dtbn + rr[None, :] * stride_dtbr
            tl.store(db_ptr, acc.to(dsb_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])


# Tiers (limit, config) by padded rank, the package's format (common.pick_tier).
FWD_TIERS = {"half": [(64, dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3)),
                      (128, dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3)),
                      (256, dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2))],
             "fp32": [(256, dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=2))]}
TILE_TIERS = {"half": [(64, dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=3)),
                       (128, dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=3)),
                       (256, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2))],
              "fp32": [(256, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2))]}
WEIGHT_TIERS = {"half": [(64, dict(BLOCK_R=64, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=3)),
                         (128, dict(BLOCK_R=32, BLOCK_K=32, BLOCK_N=32, num_warps=8, num_stages=3))],
                "fp32": [(128, dict(BLOCK_R=16, BLOCK_K=16, BLOCK_N=16, num_warps=8, num_stages=2))]}
PINNED = dict(BLOCK_M=64, BLOCK_R=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _config(tiers: dict, size: int, dtype: torch.dtype, keys: tuple[str, ...]) -> tuple[dict, dict]:
    cfg = dict(PINNED) if common.configs_pinned() else common.pick_tier(tiers[common.tier_kind(dtype)], size)
    return {k: cfg[k] for k in keys}, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _sides(x, shared_a, task_a):
    RS, RK = shared_a.shape[1], task_a.shape[1]
    rank = dict(HAS_SHARED=RS > 0, HAS_TASK=RK > 0, RS_PAD=common.rank_pad(RS), RK_PAD=common.rank_pad(RK),
                UPCAST=common.upcast_operands(), DOT_PRECISION=common.dot_precision(x.dtype))
    return RS, RK, rank


class FusedV1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, shared_a, shared_b, task_a, task_b, routing: TaskRouting, scaling: float):
        M, d_in = x.shape
        d_out, E = task_b.shape[1], gates.shape[1]
        RS, RK, rank = _sides(x, shared_a, task_a)
        r = (RS + RK) // E
        y = torch.zeros(M, d_out, dtype=x.dtype, device=x.device)
        z = torch.zeros(M, RS + RK, dtype=torch.float32, device=x.device)
        blocks, launch = _config(FWD_TIERS, common.rank_size(RS, RK), x.dtype, ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
        sa, sb = shared_a[0], shared_b[0]
        rt = routing
        if M and rt.tile_task.numel():
            _v1_fwd_kernel[(rt.tile_task.shape[0],)](
                x, *x.stride(), sa, *sa.stride(), sb, *sb.stride(), task_a, *task_a.stride(), task_b, *task_b.stride(),
                gates, *gates.stride(), rt.order, rt.tile_task, rt.tile_start, rt.tile_end,
                y, *y.stride(), z, *z.stride(), float(scaling), d_in, d_out, r, RS, RK, RS // r,
                **rank, **blocks, **launch)
        ctx.save_for_backward(x, gates, shared_a, shared_b, task_a, task_b, z)
        ctx.routing, ctx.scaling = routing, scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gates, shared_a, shared_b, task_a, task_b, z = ctx.saved_tensors
        rt, s = ctx.routing, float(ctx.scaling)
        dy = dy.contiguous()
        M, d_in = x.shape
        T, d_out, E = task_a.shape[0], task_b.shape[1], gates.shape[1]
        RS, RK, rank = _sides(x, shared_a, task_a)
        r = (RS + RK) // E
        e_pad = common.next_pow2(E, 16)
        n_tiles = rt.tile_task.shape[0]
        dx = torch.zeros_like(x)
        dzg = torch.zeros(M, RS + RK, dtype=torch.float32, device=x.device)
        dg = torch.zeros(n_tiles, e_pad, dtype=torch.float32, device=x.device)
        sa, sb = shared_a[0], shared_b[0]
        if M and n_tiles:
            blocks, launch = _config(TILE_TIERS, common.rank_size(RS, RK), x.dtype, ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
            _v1_bwd_tile_kernel[(n_tiles,)](
                dy, *dy.stride(), sa, *sa.stride(), sb, *sb.stride(), task_a, *task_a.stride(),
                task_b, *task_b.stride(), gates, *gates.stride(), rt.order, rt.tile_task, rt.tile_start,
                rt.tile_end, z, *z.stride(),
                dzg, *dzg.stride(), dx, *dx.stride(), dg, *dg.stride(), s, d_in, d_out, r, RS, RK, RS // r,
                E_PAD=e_pad, **rank, **blocks, **launch)
        onehot = rt.tile_task.to(torch.int64)[None, :] == torch.arange(T, device=x.device)[:, None]
        dgates = (onehot.double() @ dg[:, :E].double()).to(gates.dtype)
        dsa, dsb = torch.empty_like(shared_a), torch.empty_like(shared_b)
        dta, dtb = torch.empty_like(task_a), torch.empty_like(task_b)
        r_pad = max(rank["RS_PAD"] if RS else 16, rank["RK_PAD"] if RK else 16)
        blocks, launch = _config(WEIGHT_TIERS, r_pad, x.dtype, ("BLOCK_R", "BLOCK_K", "BLOCK_N"))
        n_a, n_b = triton.cdiv(d_in, blocks["BLOCK_K"]), triton.cdiv(d_out, blocks["BLOCK_N"])
        if RS + RK:
            _v1_bwd_weight_kernel[(1 + T, n_a + n_b)](
                x, *x.stride(), dy, *dy.stride(), z, *z.stride(), dzg, *dzg.stride(), gates, *gates.stride(),
                rt.order, rt.counts, rt.starts, dsa[0], *dsa[0].stride(), dsb[0], *dsb[0].stride(),
                dta, *dta.stride(), dtb, *dtb.stride(), s, d_in, d_out, r, RS, RK, RS // r, T, n_a,
                UPCAST=rank["UPCAST"], DOT_PRECISION=rank["DOT_PRECISION"], R_PAD=r_pad, **blocks, **launch)
        return dx, dgates, dsa, dsb, dta, dtb, None, None


def fused_v1(x, routing, gates, shared_a, shared_b, task_a, task_b, scaling):
    """The LoRA delta [M, d_out] through the first fused kernels (one cluster, task gates)."""
    return FusedV1.apply(x, gates, shared_a, shared_b, task_a, task_b, routing, float(scaling))
