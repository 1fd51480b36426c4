"""Device code the forward and backward kernels share: the loops over d_in and d_out that feed both
expert sides at once, and the per-rank-column gate load.

Conventions: `rows` [BLOCK_M] int64 original row indices, `row_ok` their mask; `rs` / `rk`
[RS_PAD] / [RK_PAD] rank-column indices of the shared and task side with masks `rs_ok` / `rk_ok`;
expert pointers (`sa_ptr`, `tb_ptr`, ...) already point at the expert's [R, d] block (the caller
adds cluster / task * stride, in int64). A side whose flag is off returns zeros and loads nothing.

WIDE_DOT_LAST: where both sides' dots share an operand in one loop (dy_times_b, shrink_rows), Triton
(3.6, 3.7) treats them as chained and gives both the warp layout it picks for the dot it converts
first, which is the LAST one in program order: for a [BLOCK_M, R_PAD] result it puts all warps
along M when R_PAD <= BLOCK_M, else along the rank columns. With BLOCK_M 16, 8 warps and the
narrow side (R_PAD 16) last, every warp held the whole [16, 128] accumulator of the wide side: 8
copies, 64 registers a thread instead of 8, and the r256 tier at RS_PAD 128 / RK_PAD 16 spilled
(rows launch 244 B on sm_90, fused forward 72 B on sm_80). So the wider side's dot comes last; the
two accumulators are separate, so the order changes no result (equal widths: shared side first).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dropout import load_keep


@triton.jit
def task_cluster(t, cluster_ptr, HAS_CLUSTER: tl.constexpr):
    """A task program's task and cluster index in int64 (t * stride overflows int32 for large
    T * r * d; cluster 0 without task_cluster)."""
    t64 = t.to(tl.int64)
    if HAS_CLUSTER:
        c64 = tl.load(cluster_ptr + t).to(tl.int64)
    else:
        c64 = t64 * 0
    return t64, c64


@triton.jit
def dot_block(acc, lhs, ptr, ii, i_ok, stride_i, jj, j_ok, stride_j, op_dtype: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """acc + lhs @ the [len(ii), len(jj)] block of `ptr` at rows ii, columns jj (zeros where masked),
    in op_dtype: one expert side's step of the backward's loops (the forward's shrink_rows keeps its
    own load: through this helper the fused r256 fp32 dropout forward spills on sm_80)."""
    b = tl.load(ptr + ii[:, None] * stride_i + jj[None, :] * stride_j, mask=i_ok[:, None] & j_ok[None, :], other=0.0)
    return tl.dot(lhs, b.to(op_dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def store_block(ptr, ii, stride_i, jj, stride_j, value, i_ok, j_ok):
    """value [len(ii), len(jj)] into ptr[ii, jj], in ptr's dtype, masked to i_ok x j_ok."""
    tl.store(ptr + ii[:, None] * stride_i + jj[None, :] * stride_j, value.to(ptr.dtype.element_ty),
             mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def store_task_grad(acc, nt, d_ptr, stride_di, stride_dj, p_ptr, stride_pi, stride_pj, ii, i_ok, jj, j_ok):
    """A task expert's fp32 gradient block [len(ii), len(jj)]: straight into the gradient (`d_ptr`,
    its dtype) when the task's rows are one chunk (nt == 1), else into this chunk's partial (`p_ptr`)."""
    if nt == 1:
        store_block(d_ptr, ii, stride_di, jj, stride_dj, acc, i_ok, j_ok)
    else:
        store_block(p_ptr, ii, stride_pi, jj, stride_pj, acc, i_ok, j_ok)


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
def _shrink_dot(acc, h, a_ptr, rr, r_ok, stride_ar, kk, k_ok, stride_ak, op_dtype: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """acc + h @ A[rr, kk]^T: one expert side's step of shrink_rows (A read as [len(kk), len(rr)])."""
    a = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                mask=r_ok[None, :] & k_ok[:, None], other=0.0)
    return tl.dot(h, a.to(op_dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def shrink_rows(x_ptr, stride_xm, stride_xk, rows, row_ok, k_lo, k_hi, d_in,
                sa_ptr, stride_sar, stride_sak, ta_ptr, stride_tar, stride_tak, rs, rs_ok, rk, rk_ok,
                keep_ptr, stride_keep, p_drop,
                HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                op_dtype: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr):
    """(z_s, z_t) fp32 = drop(x[rows, k_lo:k_hi]) @ A[:, k_lo:k_hi]^T for both sides, one read of
    x; dropped elements (keep-bits `keep_ptr`, dropout.py) are zero and kept ones scaled."""
    in_dtype = x_ptr.dtype.element_ty
    inv_keep = 1.0 / (1.0 - p_drop)
    z_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
    z_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        h = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = load_keep(keep_ptr, stride_keep, rows, row_ok, k0, BLOCK_K)
            h = tl.where(keep, h.to(tl.float32) * inv_keep, 0.0).to(in_dtype)
        h = h.to(op_dtype)
        # The wider side's dot last: it sets both dots' warp layout (see WIDE_DOT_LAST above).
        if HAS_TASK and RS_PAD > RK_PAD:
            z_t = _shrink_dot(z_t, h, ta_ptr, rk, rk_ok, stride_tar, kk, k_ok, stride_tak, op_dtype, DOT_PRECISION)
        if HAS_SHARED:
            z_s = _shrink_dot(z_s, h, sa_ptr, rs, rs_ok, stride_sar, kk, k_ok, stride_sak, op_dtype, DOT_PRECISION)
        if HAS_TASK and RS_PAD <= RK_PAD:
            z_t = _shrink_dot(z_t, h, ta_ptr, rk, rk_ok, stride_tar, kk, k_ok, stride_tak, op_dtype, DOT_PRECISION)
    return z_s, z_t


@triton.jit
def dy_times_b(dy_ptr, stride_dym, stride_dyn, rows, row_ok, d_out,
               sb_ptr, stride_sbn, stride_sbr, tb_ptr, stride_tbn, stride_tbr, rs, rs_ok, rk, rk_ok,
               HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, op_dtype: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               RS_PAD: tl.constexpr, RK_PAD: tl.constexpr):
    """(dz_s, dz_t) fp32 = dy[rows] @ B for both sides, one pass over dy."""
    dz_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
    dz_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < d_out
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(op_dtype)
        # The wider side's dot last: it sets both dots' warp layout (see WIDE_DOT_LAST above).
        if HAS_TASK and RS_PAD > RK_PAD:
            dz_t = dot_block(dz_t, dy, tb_ptr, nn, n_ok, stride_tbn, rk, rk_ok, stride_tbr, op_dtype, DOT_PRECISION)
        if HAS_SHARED:  # B block [BLOCK_N, RS_PAD]
            dz_s = dot_block(dz_s, dy, sb_ptr, nn, n_ok, stride_sbn, rs, rs_ok, stride_sbr, op_dtype, DOT_PRECISION)
        if HAS_TASK and RS_PAD <= RK_PAD:
            dz_t = dot_block(dz_t, dy, tb_ptr, nn, n_ok, stride_tbn, rk, rk_ok, stride_tbr, op_dtype, DOT_PRECISION)
    return dz_s, dz_t


@triton.jit
def sum_row_parts(p_ptr, stride_ps, stride_pm, stride_pr, n_parts, rows, row_ok, RS, rs, rs_ok, rk, rk_ok,
                  HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, BLOCK_M: tl.constexpr,
                  RS_PAD: tl.constexpr, RK_PAD: tl.constexpr):
    """(s, t) fp32 = sum over parts j < n_parts of p[j, rows, cols], in part order (bitwise
    reproducible); shared columns [0, RS), task columns from RS."""
    s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
    t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
    for j in range(0, n_parts):
        part = p_ptr + j * stride_ps + rows[:, None] * stride_pm
        if HAS_SHARED:
            s += tl.load(part + rs[None, :] * stride_pr, mask=row_ok[:, None] & rs_ok[None, :], other=0.0)
        if HAS_TASK:
            t += tl.load(part + (RS + rk)[None, :] * stride_pr, mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
    return s, t


@triton.jit
def store_rank_cols(ptr, stride_m, stride_r, rows, row_ok, RS, rs, rs_ok, rk, rk_ok, v_s, v_t,
                    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr):
    """Store the [BLOCK_M, R_PAD] blocks of both sides into a [M, S*r + K*r] tensor (shared first)."""
    if HAS_SHARED:
        tl.store(ptr + rows[:, None] * stride_m + rs[None, :] * stride_r, v_s, mask=row_ok[:, None] & rs_ok[None, :])
    if HAS_TASK:
        tl.store(ptr + rows[:, None] * stride_m + (RS + rk)[None, :] * stride_r, v_t,
                 mask=row_ok[:, None] & rk_ok[None, :])


@triton.jit
def expand_rows(zg_s, zg_t, rows, row_ok, n_lo, n_hi, d_out,
                sb_ptr, stride_sbn, stride_sbr, tb_ptr, stride_tbn, stride_tbr, rs, rs_ok, rk, rk_ok,
                base_ptr, stride_bm, stride_bn, y_ptr, stride_ym, stride_yn,
                HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, HAS_BASE: tl.constexpr,
                op_dtype: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[rows, n_lo:n_hi] = (base +) zg @ B^T, one BLOCK_N block at a time."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < d_out
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_SHARED:
            b = tl.load(sb_ptr + nn[None, :] * stride_sbn + rs[:, None] * stride_sbr,
                        mask=rs_ok[:, None] & n_ok[None, :], other=0.0)  # [RS_PAD, BLOCK_N]
            acc = tl.dot(zg_s, b.to(op_dtype), acc, input_precision=DOT_PRECISION)
        if HAS_TASK:
            b = tl.load(tb_ptr + nn[None, :] * stride_tbn + rk[:, None] * stride_tbr,
                        mask=rk_ok[:, None] & n_ok[None, :], other=0.0)  # [RK_PAD, BLOCK_N]
            acc = tl.dot(zg_t, b.to(op_dtype), acc, input_precision=DOT_PRECISION)
        io = row_ok[:, None] & n_ok[None, :]
        if HAS_BASE:
            acc += tl.load(base_ptr + rows[:, None] * stride_bm + nn[None, :] * stride_bn,
                           mask=io, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + nn[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=io)


@triton.jit
def write_dx(dzg_s, dzg_t, rows, row_ok, d_in, sa_ptr, stride_sar, stride_sak, ta_ptr, stride_tar, stride_tak,
             rs, rs_ok, rk, rk_ok, dx_ptr, stride_dxm, stride_dxk, keep_ptr, stride_keep, p_drop,
             HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             op_dtype: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[rows] = drop'(dzg @ A) for both sides, one d_in block at a time (the forward's mask)."""
    inv_keep = 1.0 / (1.0 - p_drop)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < d_in
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        if HAS_SHARED:  # A block [RS_PAD, BLOCK_K]
            acc = dot_block(acc, dzg_s, sa_ptr, rs, rs_ok, stride_sar, kk, k_ok, stride_sak, op_dtype, DOT_PRECISION)
        if HAS_TASK:
            acc = dot_block(acc, dzg_t, ta_ptr, rk, rk_ok, stride_tar, kk, k_ok, stride_tak, op_dtype, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = load_keep(keep_ptr, stride_keep, rows, row_ok, k0, BLOCK_K)
            acc = tl.where(keep, acc * inv_keep, 0.0)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + kk[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])
