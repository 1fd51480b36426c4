"""Launch 4 of the backward (backward.py): the weight-gradient partials summed per owner.

Owner = a cluster (its shared experts: the fp32 partials of every chunk of its tasks, tasks in
index order, each task's chunks in order) or a task (the partials of its chunks, when it has more
than one; a single-chunk task's gradient was written directly; a task without rows gets zeros).
One program per (owner, d block): a fixed order of additions, so reruns are bitwise equal.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .slots import task_chunk_span


@triton.jit
def _sum_parts(p_ptr, stride_s, stride_i, stride_j, slot_lo, slot_hi, ii, i_ok, jj, j_ok, acc):
    """acc + sum over slots [slot_lo, slot_hi) of the fp32 partial tiles p[slot, ii, jj], in order."""
    for s in range(slot_lo, slot_hi):
        acc += tl.load(p_ptr + s * stride_s + ii[:, None] * stride_i + jj[None, :] * stride_j,
                       mask=i_ok[:, None] & j_ok[None, :], other=0.0)
    return acc


@triton.jit(do_not_specialize=["chunk"])
def _bwd_reduce_kernel(
    psa_ptr, stride_psas, stride_psar, stride_psak,  # [chunks, S*r, d_in] fp32
    psb_ptr, stride_psbs, stride_psbn, stride_psbr,  # [chunks, d_out, S*r] fp32
    pta_ptr, stride_ptas, stride_ptar, stride_ptak,  # [chunks, K*r, d_in] fp32
    ptb_ptr, stride_ptbs, stride_ptbn, stride_ptbr,  # [chunks, d_out, K*r] fp32
    dsa_ptr, stride_dsac, stride_dsar, stride_dsak,  # [C, S*r, d_in] out
    dsb_ptr, stride_dsbc, stride_dsbn, stride_dsbr,  # [C, d_out, S*r] out
    dta_ptr, stride_dtat, stride_dtar, stride_dtak,  # [T, K*r, d_in] out (multi-chunk / empty tasks)
    dtb_ptr, stride_dtbt, stride_dtbn, stride_dtbr,  # [T, d_out, K*r] out
    cluster_ptr, counts_ptr,  # [T], [T]
    d_in, d_out, RS, RK, C, T, n_a_blocks, chunk,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, HAS_CLUSTER: tl.constexpr,
    WANT_A: tl.constexpr, WANT_B: tl.constexpr, R_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    owner = tl.program_id(0)  # [0, C): a cluster's shared experts; [C, C+T): a task's experts
    blk = tl.program_id(1)
    rr = tl.arange(0, R_PAD)
    is_a = blk < n_a_blocks
    kk = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    nn = (blk - n_a_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kk < d_in
    n_ok = nn < d_out
    if owner < C:
        if HAS_SHARED:
            c64 = owner.to(tl.int64)
            r_ok = rr < RS
            acc_a = tl.zeros([R_PAD, BLOCK_K], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_N, R_PAD], dtype=tl.float32)
            slot0 = 0
            for tt in range(0, T):  # the cluster's tasks in index order, each task's chunks in order
                n = (tl.load(counts_ptr + tt).to(tl.int32) + chunk - 1) // chunk  # int32: see slots.load_counts
                if HAS_CLUSTER:
                    n_mine = tl.where(tl.load(cluster_ptr + tt) == owner, n, 0)
                else:
                    n_mine = n
                if is_a:
                    if WANT_A:
                        acc_a = _sum_parts(psa_ptr, stride_psas, stride_psar, stride_psak, slot0,
                                           slot0 + n_mine, rr, r_ok, kk, k_ok, acc_a)
                else:
                    if WANT_B:
                        acc_b = _sum_parts(psb_ptr, stride_psbs, stride_psbn, stride_psbr, slot0,
                                           slot0 + n_mine, nn, n_ok, rr, r_ok, acc_b)
                slot0 += n
            if is_a:
                if WANT_A:
                    tl.store(dsa_ptr + c64 * stride_dsac + rr[:, None] * stride_dsar + kk[None, :] * stride_dsak,
                             acc_a.to(dsa_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])
            else:
                if WANT_B:
                    tl.store(dsb_ptr + c64 * stride_dsbc + nn[:, None] * stride_dsbn + rr[None, :] * stride_dsbr,
                             acc_b.to(dsb_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])
    else:
        if HAS_TASK:
            t = owner - C
            t64 = t.to(tl.int64)
            first, nt = task_chunk_span(t, counts_ptr, T, chunk, T_PAD)
            if nt != 1:  # one chunk: launch 2 wrote the gradient; none: zeros
                r_ok = rr < RK
                if is_a:
                    if WANT_A:
                        acc_a = _sum_parts(pta_ptr, stride_ptas, stride_ptar, stride_ptak, first, first + nt,
                                           rr, r_ok, kk, k_ok, tl.zeros([R_PAD, BLOCK_K], dtype=tl.float32))
                        tl.store(dta_ptr + t64 * stride_dtat + rr[:, None] * stride_dtar + kk[None, :] * stride_dtak,
                                 acc_a.to(dta_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])
                else:
                    if WANT_B:
                        acc_b = _sum_parts(ptb_ptr, stride_ptbs, stride_ptbn, stride_ptbr, first, first + nt,
                                           nn, n_ok, rr, r_ok, tl.zeros([BLOCK_N, R_PAD], dtype=tl.float32))
                        tl.store(dtb_ptr + t64 * stride_dtbt + nn[:, None] * stride_dtbn + rr[None, :] * stride_dtbr,
                                 acc_b.to(dtb_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])
