"""CGC-LoRA backward in four launches that each read their big input once: dy, then x.

With z saved by the forward, g each rank column's gate, s the scaling, h = drop(x). A chunk is at
most `chunk` sorted rows of ONE task (slots.py): a long segment (a Zipf-heavy task) becomes several
balanced programs, and a task's chunks are consecutive slots.

    launch 1 "dB", grid (chunk, d_out blocks): ONE read of dy[rows, block] gives
        dB part  = dy^T @ (z * g * s)                 shared and task experts together
        dz part  = dy @ B[block]                      fp32 [n_blocks, M, (S+K) r] (dz_parts plans)
    launch 2 "rows", grid (tile x sub row parts), like the forward:
        dz       = sum of the dz parts, in block order (or dy @ B over all of d_out, reading dy
                   again, when the parts would move more bytes: large ranks)
        dzg      = dz * g * s                         saved [M, (S+K) r] fp32 for launch 3
        dgates   = s * sum_{rank cols of e} dz * z    per token, or one partial per program
        dx       = drop'(dzg @ A)                     every row written (task -1 rows: 0)
    launch 3 "dA", grid (chunk, d_in blocks): ONE read of x[rows, block] gives
        dA part  = dzg^T @ h                          shared and task experts together
    launch 4 "reduce", grid (cluster or task, blocks): each cluster's shared parts and each
        multi-chunk task's parts summed in chunk order; a task in one chunk had its dA / dB
        written directly by launches 1 and 3; tasks and clusters without rows get exact zeros.
    per-task dgates: the per-program partials summed per task by a one-hot product (fixed order).

No float atomics anywhere and every sum runs in a fixed order, so reruns are bitwise equal.
Loop bounds come from device tensors (routing counts): no host sync, grids fixed by M, T, d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import common, forward
from .dropout import kernel_keep_bits, load_keep
from .kernel_utils import (
    dy_times_b,
    load_rank_gates,
    store_block,
    store_rank_cols,
    store_task_grad,
    sum_row_parts,
    task_cluster,
    write_dx,
)
from .reduce_parts import _bwd_reduce_kernel
from .slots import chunk_rows, tile_rows


@triton.jit
def add_expert_sums(acc, p, cols, col_ok, r, e_first, n_experts, e):
    """acc [BLOCK_M, E_PAD] plus p [BLOCK_M, R_PAD] summed per expert: column j belongs to expert
    e_first + j // r. One masked row sum per expert (a loop, not unrolled): the one-hot dot it
    replaces held p, the [R_PAD, E_PAD] map and both in FMA-dot layouts, and spilled."""
    for i in range(0, n_experts):
        part = tl.sum(tl.where(((cols // r == i) & col_ok)[None, :], p, 0.0), axis=1)
        acc = tl.where((e == e_first + i)[None, :], acc + part[:, None], acc)
    return acc


# Per-call integers (M, the routing's tile rows and row parts) are not specialized: one compiled
# variant serves every batch size.
@triton.jit(do_not_specialize=["M", "tile_rows_n", "sub"])
def _bwd_rows_kernel(
    dy_ptr, stride_dym, stride_dyn,  # [M, d_out] (read unless DZ_FROM_PARTS)
    dzp_ptr, stride_dzps, stride_dzpm, stride_dzpr,  # [n_parts, M, S*r + K*r] fp32 partial dz (DZ_FROM_PARTS)
    sa_ptr, stride_sac, stride_sar, stride_sak,  # shared_a [C, S*r, d_in]
    sb_ptr, stride_sbc, stride_sbn, stride_sbr,  # shared_b [C, d_out, S*r]
    ta_ptr, stride_tat, stride_tar, stride_tak,  # task_a [T, K*r, d_in]
    tb_ptr, stride_tbt, stride_tbn, stride_tbr,  # task_b [T, d_out, K*r]
    g_ptr, stride_gm, stride_ge,  # gates [T, S+K] or [M, S+K]
    cluster_ptr,  # [T] (HAS_CLUSTER)
    order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,  # routing
    z_ptr, stride_zm, stride_zr,  # [M, S*r + K*r] fp32 from the forward
    dzg_ptr, stride_dzm, stride_dzr,  # [M, S*r + K*r] fp32 out (WANT_DZ)
    dx_ptr, stride_dxm, stride_dxk,  # [M, d_in] out (WANT_DX)
    dg_ptr, stride_dgm, stride_dge,  # [M, S+K] per-token dgates, or [programs, E_PAD] partials (WANT_DGATE)
    keep_ptr, stride_keep, p_drop, scaling,  # [M, cdiv(d_in, 8)] uint8 dropout keep-bits (HAS_DROPOUT)
    M, d_in, d_out, r, RS, RK, S, E, T, tile_rows_n, sub, n_parts,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr,
    RS_PAD: tl.constexpr, RK_PAD: tl.constexpr, E_PAD: tl.constexpr, T_PAD: tl.constexpr,
    PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DGATE: tl.constexpr, WANT_DZ: tl.constexpr,
    DZ_FROM_PARTS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    t, lo, hi = tile_rows(pid // sub, pid % sub, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,
                          M, T, tile_rows_n, sub, T_PAD)
    e = tl.arange(0, E_PAD)
    rs = tl.arange(0, RS_PAD)
    rk = tl.arange(0, RK_PAD)
    rs_ok = rs < RS
    rk_ok = rk < RK
    # Task gates: sum dz * z over the program's rows per rank column first, mapped to experts once
    # at the end (a per-row one-hot dot would hold [BLOCK_M, E_PAD] and the maps in registers).
    col_s = tl.zeros([RS_PAD], dtype=tl.float32)
    col_t = tl.zeros([RK_PAD], dtype=tl.float32)
    if t < 0:
        # Task -1 rows: no LoRA gradient, but dx (and per-token dgates) are written here as zeros
        # rather than zero-filled before.
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            if WANT_DX:
                for k0 in range(0, d_in, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    tl.store(dx_ptr + rows[:, None] * stride_dxm + kk[None, :] * stride_dxk,
                             tl.zeros([BLOCK_M, BLOCK_K], dtype=dx_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & (kk < d_in)[None, :])
            if WANT_DGATE:
                if PER_TOKEN_GATES:
                    tl.store(dg_ptr + rows[:, None] * stride_dgm + e[None, :] * stride_dge,
                             tl.zeros([BLOCK_M, E_PAD], dtype=dg_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & (e < E)[None, :])
    else:
        t64, c64 = task_cluster(t, cluster_ptr, HAS_CLUSTER)
        op_dtype = tl.float32 if UPCAST else sa_ptr.dtype.element_ty
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            # ---- dz = dy @ B: the dB launch's partials over d_out blocks summed in a fixed order,
            # or one pass over dy here (large ranks, where the partials would outweigh dy) ----
            if DZ_FROM_PARTS:
                dz_s, dz_t = sum_row_parts(dzp_ptr, stride_dzps, stride_dzpm, stride_dzpr, n_parts, rows, row_ok,
                                           RS, rs, rs_ok, rk, rk_ok, HAS_SHARED, HAS_TASK, BLOCK_M, RS_PAD, RK_PAD)
            else:
                dz_s, dz_t = dy_times_b(dy_ptr, stride_dym, stride_dyn, rows, row_ok, d_out,
                                        sb_ptr + c64 * stride_sbc, stride_sbn, stride_sbr,
                                        tb_ptr + t64 * stride_tbt, stride_tbn, stride_tbr, rs, rs_ok, rk, rk_ok,
                                        HAS_SHARED, HAS_TASK, op_dtype, DOT_PRECISION, BLOCK_M, BLOCK_N,
                                        RS_PAD, RK_PAD)
            # ---- dzg = dz * g * s; dgates = s * sum dz * z per expert ----
            if PER_TOKEN_GATES:
                dg_rows = tl.zeros([BLOCK_M, E_PAD], dtype=tl.float32)
            dzg_s = dz_s
            dzg_t = dz_t
            if HAS_SHARED:
                g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, rs // r, rs_ok,
                                      PER_TOKEN_GATES)
                dzg_s = dz_s * g_s * scaling
                if WANT_DGATE:
                    z_s = tl.load(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr,
                                  mask=row_ok[:, None] & rs_ok[None, :], other=0.0)
                    if PER_TOKEN_GATES:
                        dg_rows = add_expert_sums(dg_rows, dz_s * z_s, rs, rs_ok, r, 0, S, e)
                    else:
                        col_s += tl.sum(dz_s * z_s, axis=0)
            if HAS_TASK:
                g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, S + rk // r, rk_ok,
                                      PER_TOKEN_GATES)
                dzg_t = dz_t * g_t * scaling
                if WANT_DGATE:
                    z_t = tl.load(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr,
                                  mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
                    if PER_TOKEN_GATES:
                        dg_rows = add_expert_sums(dg_rows, dz_t * z_t, rk, rk_ok, r, S, E - S, e)
                    else:
                        col_t += tl.sum(dz_t * z_t, axis=0)
            if WANT_DZ:
                store_rank_cols(dzg_ptr, stride_dzm, stride_dzr, rows, row_ok, RS, rs, rs_ok, rk, rk_ok, dzg_s, dzg_t,
                                HAS_SHARED, HAS_TASK)
            if WANT_DGATE:
                if PER_TOKEN_GATES:
                    tl.store(dg_ptr + rows[:, None] * stride_dgm + e[None, :] * stride_dge,
                             (dg_rows * scaling).to(dg_ptr.dtype.element_ty), mask=row_ok[:, None] & (e < E)[None, :])
            # ---- dx = drop'(dzg @ A), one d_in block at a time ----
            if WANT_DX:
                write_dx(dzg_s.to(op_dtype), dzg_t.to(op_dtype), rows, row_ok, d_in,
                         sa_ptr + c64 * stride_sac, stride_sar, stride_sak, ta_ptr + t64 * stride_tat, stride_tar,
                         stride_tak, rs, rs_ok, rk, rk_ok, dx_ptr, stride_dxm, stride_dxk, keep_ptr, stride_keep,
                         p_drop, HAS_SHARED, HAS_TASK, HAS_DROPOUT, op_dtype, DOT_PRECISION, BLOCK_M, BLOCK_K)
    if WANT_DGATE:
        if not PER_TOKEN_GATES:
            dg_prog = tl.zeros([E_PAD], dtype=tl.float32)
            if HAS_SHARED:
                hit_s = (rs[:, None] // r == e[None, :]) & rs_ok[:, None]
                dg_prog += tl.sum(tl.where(hit_s, col_s[:, None], 0.0), axis=0)
            if HAS_TASK:
                hit_t = ((S + rk[:, None] // r) == e[None, :]) & rk_ok[:, None]
                dg_prog += tl.sum(tl.where(hit_t, col_t[:, None], 0.0), axis=0)
            # This program's partial (zeros for task -1 parts); reduced per task in a fixed order.
            tl.store(dg_ptr + pid * stride_dgm + e * stride_dge, dg_prog * scaling)


@triton.jit(do_not_specialize=["chunk"])
def _bwd_weight_kernel(
    x_ptr, stride_xm, stride_xk,  # [M, d_in]
    dy_ptr, stride_dym, stride_dyn,  # [M, d_out]
    z_ptr, stride_zm, stride_zr,  # [M, S*r + K*r] fp32 (forward)
    dzg_ptr, stride_dzm, stride_dzr,  # [M, S*r + K*r] fp32 (rows launch; read by DO_A)
    sb_ptr, stride_sbc, stride_sbn, stride_sbr,  # shared_b [C, d_out, S*r] (dz partials)
    tb_ptr, stride_tbt, stride_tbn, stride_tbr,  # task_b [T, d_out, K*r] (dz partials)
    dzp_ptr, stride_dzps, stride_dzpm, stride_dzpr,  # [n_blocks, M, S*r + K*r] fp32 out (WANT_DZP): dz parts
    g_ptr, stride_gm, stride_ge,  # gates
    cluster_ptr,  # [T] (HAS_CLUSTER)
    order_ptr, counts_ptr, starts_ptr,  # routing: task segments of `order`
    psa_ptr, stride_psas, stride_psar, stride_psak,  # [chunks, S*r, d_in] fp32 shared dA partials
    psb_ptr, stride_psbs, stride_psbn, stride_psbr,  # [chunks, d_out, S*r] fp32 shared dB partials
    pta_ptr, stride_ptas, stride_ptar, stride_ptak,  # [chunks, K*r, d_in] fp32 task dA partials
    ptb_ptr, stride_ptbs, stride_ptbn, stride_ptbr,  # [chunks, d_out, K*r] fp32 task dB partials
    dta_ptr, stride_dtat, stride_dtar, stride_dtak,  # [T, K*r, d_in] out (single-chunk tasks)
    dtb_ptr, stride_dtbt, stride_dtbn, stride_dtbr,  # [T, d_out, K*r] out (single-chunk tasks)
    keep_ptr, stride_keep, p_drop, scaling,  # [M, cdiv(d_in, 8)] uint8 dropout keep-bits (HAS_DROPOUT)
    d_in, d_out, r, RS, RK, S, T, chunk,
    DO_A: tl.constexpr,  # dA programs over d_in blocks; else dB (WANT_DB) and dz partials (WANT_DZP)
    WANT_DB: tl.constexpr, WANT_DZP: tl.constexpr,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    T_PAD: tl.constexpr, PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    slot = tl.program_id(0)
    blk = tl.program_id(1)
    t, lo, hi, nt = chunk_rows(slot, counts_ptr, starts_ptr, T, chunk, T_PAD)
    if t >= 0:
        t64, c64 = task_cluster(t, cluster_ptr, HAS_CLUSTER)
        slot64 = slot.to(tl.int64)
        in_dtype = x_ptr.dtype.element_ty
        op_dtype = tl.float32 if UPCAST else in_dtype
        rs = tl.arange(0, RS_PAD)
        rk = tl.arange(0, RK_PAD)
        rs_ok = rs < RS
        rk_ok = rk < RK
        inv_keep = 1.0 / (1.0 - p_drop)
        if DO_A:
            # ---- dA blocks [R, BLOCK_K] of both sides from one read of x ----
            k0 = blk * BLOCK_K
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < d_in
            acc_sa = tl.zeros([RS_PAD, BLOCK_K], dtype=tl.float32)
            acc_ta = tl.zeros([RK_PAD, BLOCK_K], dtype=tl.float32)
            for p0 in range(lo, hi, BLOCK_R):
                pos = p0 + tl.arange(0, BLOCK_R)
                row_ok = pos < hi
                rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                h = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
                if HAS_DROPOUT:
                    keep = load_keep(keep_ptr, stride_keep, rows, row_ok, k0, BLOCK_K)
                    h = tl.where(keep, h.to(tl.float32) * inv_keep, 0.0).to(in_dtype)
                h = h.to(op_dtype)
                if HAS_SHARED:
                    dz = tl.load(dzg_ptr + rows[:, None] * stride_dzm + rs[None, :] * stride_dzr,
                                 mask=row_ok[:, None] & rs_ok[None, :], other=0.0)  # [BLOCK_R, RS_PAD]
                    acc_sa = tl.dot(tl.trans(dz.to(op_dtype)), h, acc_sa, input_precision=DOT_PRECISION)
                if HAS_TASK:
                    dz = tl.load(dzg_ptr + rows[:, None] * stride_dzm + (RS + rk)[None, :] * stride_dzr,
                                 mask=row_ok[:, None] & rk_ok[None, :], other=0.0)  # [BLOCK_R, RK_PAD]
                    acc_ta = tl.dot(tl.trans(dz.to(op_dtype)), h, acc_ta, input_precision=DOT_PRECISION)
            if HAS_SHARED:
                store_block(psa_ptr + slot64 * stride_psas, rs, stride_psar, kk, stride_psak, acc_sa, rs_ok, k_ok)
            if HAS_TASK:
                store_task_grad(acc_ta, nt, dta_ptr + t64 * stride_dtat, stride_dtar, stride_dtak,
                                pta_ptr + slot64 * stride_ptas, stride_ptar, stride_ptak, rk, rk_ok, kk, k_ok)
        else:
            # ---- one read of dy [rows, d_out block]: dB blocks [BLOCK_N, R] of both sides, and this
            # block's share of dz = dy @ B [rows, R] (fp32 partials; the rows launch sums them) ----
            nn = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = nn < d_out
            acc_sb = tl.zeros([BLOCK_N, RS_PAD], dtype=tl.float32)
            acc_tb = tl.zeros([BLOCK_N, RK_PAD], dtype=tl.float32)
            if WANT_DZP:
                if HAS_SHARED:
                    b_s = tl.load(sb_ptr + c64 * stride_sbc + nn[:, None] * stride_sbn + rs[None, :] * stride_sbr,
                                  mask=n_ok[:, None] & rs_ok[None, :], other=0.0).to(op_dtype)  # [BLOCK_N, RS_PAD]
                if HAS_TASK:
                    b_t = tl.load(tb_ptr + t64 * stride_tbt + nn[:, None] * stride_tbn + rk[None, :] * stride_tbr,
                                  mask=n_ok[:, None] & rk_ok[None, :], other=0.0).to(op_dtype)  # [BLOCK_N, RK_PAD]
            for p0 in range(lo, hi, BLOCK_R):
                pos = p0 + tl.arange(0, BLOCK_R)
                row_ok = pos < hi
                rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
                dy = tl.load(dy_ptr + rows[:, None] * stride_dym + nn[None, :] * stride_dyn,
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(op_dtype)  # [BLOCK_R, BLOCK_N]
                part = dzp_ptr + blk * stride_dzps + rows[:, None] * stride_dzpm
                if HAS_SHARED:
                    if WANT_DB:
                        zr = tl.load(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr,
                                     mask=row_ok[:, None] & rs_ok[None, :], other=0.0)
                        g = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, rs // r, rs_ok,
                                            PER_TOKEN_GATES)
                        acc_sb = tl.dot(tl.trans(dy), (zr * g * scaling).to(op_dtype), acc_sb,
                                        input_precision=DOT_PRECISION)
                    if WANT_DZP:
                        dz = tl.dot(dy, b_s, input_precision=DOT_PRECISION)  # [BLOCK_R, RS_PAD] fp32
                        tl.store(part + rs[None, :] * stride_dzpr, dz, mask=row_ok[:, None] & rs_ok[None, :])
                if HAS_TASK:
                    if WANT_DB:
                        zr = tl.load(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr,
                                     mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
                        g = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, S + rk // r, rk_ok,
                                            PER_TOKEN_GATES)
                        acc_tb = tl.dot(tl.trans(dy), (zr * g * scaling).to(op_dtype), acc_tb,
                                        input_precision=DOT_PRECISION)
                    if WANT_DZP:
                        dz = tl.dot(dy, b_t, input_precision=DOT_PRECISION)  # [BLOCK_R, RK_PAD] fp32
                        tl.store(part + (RS + rk)[None, :] * stride_dzpr, dz, mask=row_ok[:, None] & rk_ok[None, :])
            if WANT_DB:
                if HAS_SHARED:
                    store_block(psb_ptr + slot64 * stride_psbs, nn, stride_psbn, rs, stride_psbr, acc_sb, n_ok, rs_ok)
                if HAS_TASK:
                    store_task_grad(acc_tb, nt, dtb_ptr + t64 * stride_dtbt, stride_dtbn, stride_dtbr,
                                    ptb_ptr + slot64 * stride_ptbs, stride_ptbn, stride_ptbr, nn, n_ok, rk, rk_ok)


# ---- block configuration ---------------------------------------------------------------------

@dataclass(frozen=True)
class BackwardPlan:
    """Blocks of the backward launches; grids from `grids`. Only the blocks, warps and stages are
    compiled in; `sub` and `chunk` are run-time values."""

    sub: int  # rows launch: programs per routing tile
    BLOCK_M: int
    BLOCK_K: int
    BLOCK_N: int
    rows_warps: int
    chunk: int  # rows per weight-gradient chunk
    BLOCK_R: int  # rows per step inside a chunk
    WBLOCK_K: int  # weight launch: d_in block (dA) ...
    WBLOCK_N: int  # ... and d_out block (dB)
    weight_warps: int
    RBLOCK: int  # reduce launch: d block
    num_stages: int
    dz_parts: bool = True  # dz from the dB launch's partials (else the rows launch reads dy again)
    maxnreg: int | None = None  # ptxas register cap of the rows and weight launches (None: ptxas picks)

    def chunk_slots(self, M: int, T: int) -> int:
        return triton.cdiv(M, self.chunk) + T

    def grids(self, M: int, T: int, C: int, d_in: int, d_out: int, max_tiles: int) -> dict:
        slots = self.chunk_slots(M, T)
        n_r = triton.cdiv(d_in, self.RBLOCK) + triton.cdiv(d_out, self.RBLOCK)
        return {"dB": (slots, triton.cdiv(d_out, self.WBLOCK_N)), "rows": (max_tiles * self.sub,),
                "dA": (slots, triton.cdiv(d_in, self.WBLOCK_K)), "reduce": (C + T, n_r)}


# Tiers (limit, config) keyed on padded rank (both sides in registers in every launch) and dtype
# kind, in the format common.pick_tier reads; each compiled ahead of time at every rank split and
# flag its limit admits, spill-free on sm_80 / sm_90 (triton 3.6 and 3.7).
# The half r32 and r64 tiers differ in the dB block: 256 columns of d_out hold the dB accumulators
# of a 64-wide side at 255 registers and spill (276 B at S*r = 64 without task experts); 128 do not,
# at the price of twice the dz parts per row (backward_plan weighs those against a second read of
# dy). Half tiers cap ptxas at the hardware's 255 registers (`maxnreg`) in the rows and weight
# launches: left to itself it held some splits of them to 128 (two blocks of 8 warps per SM) and
# spilled 12-48 B (rows 32 / 32 with per-token gates, dB 16 / 0 and 64 / 32 on sm_80, ...).
_HALF_SMALL = dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, rows_warps=8, BLOCK_R=32, WBLOCK_K=64, weight_warps=8,
                   RBLOCK=128, num_stages=3, maxnreg=255)
BACKWARD_BLOCKS = {
    "half": [(32, dict(_HALF_SMALL, WBLOCK_N=256)), (64, dict(_HALF_SMALL, WBLOCK_N=128)),
             # 16 rows per weight step: with 32, the dB launch of a 128-wide side beside per-token gates
             # spilled (8-92 B)
             (2 * common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, rows_warps=8, BLOCK_R=16,
                                            WBLOCK_K=32, WBLOCK_N=32, weight_warps=8, RBLOCK=32, num_stages=2,
                                            maxnreg=255))],
    # fp32 dots run on FMA units: one small tier (larger fp32 blocks spill), not pipelined (with two
    # stages the dA launch at 128 / 128 spilled 36 B on sm_90), up to a padded rank of 128: above it
    # every fp32 block tried spilled, and larger fp32 problems take the torch backend. Capped at 255
    # registers like the half tiers (uncapped, the rows launch spilled 4-16 B at 16 / 16 - 32 / 16).
    "fp32": [(common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, rows_warps=8, BLOCK_R=16,
                                            WBLOCK_K=16, WBLOCK_N=16, weight_warps=8, RBLOCK=16, num_stages=1,
                                            maxnreg=255))],
}
# dz parts pay only with wide d_out blocks (few parts per row), which only the half r64 tier has;
# above it (and in fp32) the rows launch reads dy. The dB launch with parts is compiled ahead of
# time only up to this rank.
DZ_PARTS_MAX_RANK = {"half": 64, "fp32": 0}
PINNED = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, rows_warps=4, BLOCK_R=64, WBLOCK_K=64, WBLOCK_N=64,
              weight_warps=4, RBLOCK=64, num_stages=2)


def max_rank_size(dtype: torch.dtype) -> int:
    """Largest padded rank (both sides together) the forward and backward configs take for `dtype`."""
    kind = common.tier_kind(dtype)
    return min(forward.FORWARD_BLOCKS[kind][-1][0], BACKWARD_BLOCKS[kind][-1][0])


def chunk_rows_for(M: int, T: int) -> int:
    """Rows per weight-gradient chunk: about M / 8, 256..2048 (a power of two), so even one task
    holding every row becomes >= 8 programs per output block while an average task of a uniform
    mix stays one chunk (its gradient written directly, no partial)."""
    return max(256, min(2048, common.next_pow2(triton.cdiv(max(M, 1), 8))))


_FORCED_CHUNK: list[int | None] = [None]


def backward_plan(M: int, T: int, d_in: int, d_out: int, rank_size: int, dtype: torch.dtype,
                  tile_rows: int, chunk: int | None = None, rank: int | None = None,
                  dz_parts: bool | None = None) -> BackwardPlan:
    """The backward's blocks from shapes only; `chunk` (or `set_forced_chunk`) overrides the rows
    per chunk (tests: small chunks make the chunked reductions run at small M).

    dz comes from fp32 partials written by the dB launch (which reads dy anyway) when they move
    fewer bytes than a second read of dy: 2 * n_parts * rank * 4 < d_out * element size, with
    `rank` = S*r + K*r (rank_size if not given) and n_parts the dB launch's d_out blocks.
    `dz_parts` forces the choice (tests).
    """
    pinned = common.configs_pinned()
    cfg = dict(PINNED) if pinned else common.pick_tier(BACKWARD_BLOCKS[common.tier_kind(dtype)], rank_size)
    sub = max(1, min(tile_rows // cfg["BLOCK_M"], 2))
    chunk = chunk or _FORCED_CHUNK[0] or chunk_rows_for(M, T)
    if dz_parts is None:
        n_parts = triton.cdiv(d_out, cfg["WBLOCK_N"])
        elem = torch.empty((), dtype=dtype).element_size()
        dz_parts = (2 * n_parts * (rank if rank is not None else rank_size) * 4 < d_out * elem
                    and (pinned or rank_size <= DZ_PARTS_MAX_RANK[common.tier_kind(dtype)]))
    return BackwardPlan(sub=sub, chunk=chunk, dz_parts=dz_parts, **cfg)


def set_forced_chunk(chunk: int | None) -> int | None:
    """Make every backward use `chunk` rows per chunk (None: by shape); returns the old value."""
    old, _FORCED_CHUNK[0] = _FORCED_CHUNK[0], chunk
    return old


def backward_config_space(dtype_name: str) -> list[tuple[str, str, int, dict, int, int]]:
    """(kernel, tier name, tier limit, constexprs fixed by the tier, num_warps, num_stages) of every
    GPU config (the rows and weight constexprs carry the tier's `maxnreg`, a compile option, None
    where ptxas picks); tests/op/aot_compile_kernels.py adds the rank pads and flags each tier can
    meet."""
    kind = "fp32" if dtype_name == "fp32" else "half"
    out = []
    for limit, c in BACKWARD_BLOCKS[kind]:
        name = f"r{limit}"
        parts_here = limit <= DZ_PARTS_MAX_RANK[kind]
        for dz_parts in (True, False) if parts_here else (False,):
            rows = dict(DZ_FROM_PARTS=dz_parts, BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"],
                        maxnreg=c.get("maxnreg"))
            out.append(("bwd_rows", name + ("-parts" if dz_parts else "-dy"), limit, rows, c["rows_warps"],
                        c["num_stages"]))
        for do_a in (True, False):
            weights = dict(DO_A=do_a, WANT_DB=not do_a, WANT_DZP=not do_a and parts_here, BLOCK_R=c["BLOCK_R"],
                           BLOCK_K=c["WBLOCK_K"], BLOCK_N=c["WBLOCK_N"], maxnreg=c.get("maxnreg"))
            out.append(("bwd_weights", name + ("-dA" if do_a else "-dB"), limit, weights, c["weight_warps"],
                        c["num_stages"]))
        out.append(("bwd_reduce", name, limit, dict(BLOCK_K=c["RBLOCK"], BLOCK_N=c["RBLOCK"]), 4, 1))
    return out


# ---- launcher --------------------------------------------------------------------------------

def cgc_lora_backward(
    dy: torch.Tensor,  # [M, d_out]
    x: torch.Tensor,  # [M, d_in]
    gates: torch.Tensor,  # [T, S+K] or [M, S+K]
    shared_a: torch.Tensor, shared_b: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor,
    task_cluster: torch.Tensor | None,
    order: torch.Tensor, tile_task: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    counts: torch.Tensor, starts: torch.Tensor, tile_rows_n: int,
    z: torch.Tensor,  # [M, S*r + K*r] fp32 from the forward
    scaling: float, per_token_gates: bool, dropout_p: float,
    seed: torch.Tensor | int | None,  # [1] int64 on the device (an int in tests; None: no dropout)
    need_x: bool, need_gates: bool, need_a: bool, need_b: bool,
    plan: BackwardPlan | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b); None where not needed.
    Every output is written whole by the kernels (nothing zero-filled first)."""
    M, d_in = x.shape
    C, RS = shared_a.shape[0], shared_a.shape[1]
    T, RK = task_a.shape[0], task_a.shape[1]
    d_out = task_b.shape[1]
    E = gates.shape[1]
    r = (RS + RK) // E
    S = RS // r
    dev = x.device
    keep, stride_keep = kernel_keep_bits(seed, M, d_in, dropout_p, counts)  # the forward's mask, again
    rs_pad, rk_pad = common.rank_pad(RS), common.rank_pad(RK)
    e_pad = common.next_pow2(E, 16)
    t_pad = common.next_pow2(T)
    max_tiles = tile_task.shape[0]
    if plan is None:
        plan = backward_plan(M, T, d_in, d_out, common.rank_size(RS, RK), x.dtype, tile_rows_n, rank=RS + RK)
    grids = plan.grids(M, T, C, d_in, d_out, max_tiles)
    cl = task_cluster if task_cluster is not None else counts  # never read without HAS_CLUSTER
    flags = dict(HAS_SHARED=RS > 0, HAS_TASK=RK > 0, RS_PAD=rs_pad, RK_PAD=rk_pad, T_PAD=t_pad,
                 UPCAST=common.upcast_operands(), DOT_PRECISION=common.dot_precision(x.dtype))

    dx = torch.empty_like(x) if need_x else None
    dgates = None
    if need_gates:
        dgates = torch.empty_like(gates) if per_token_gates else torch.empty(
            grids["rows"][0], e_pad, dtype=torch.float32, device=dev)
    dzg = torch.empty(M, RS + RK, dtype=torch.float32, device=dev) if need_a else None

    want_rows = (need_x or need_gates or need_a) and M > 0
    dsa = dsb = dta = dtb = None
    if need_a:
        dsa, dta = torch.empty_like(shared_a), torch.empty_like(task_a)
    if need_b:
        dsb, dtb = torch.empty_like(shared_b), torch.empty_like(task_b)
    n_slots = grids["dA"][0]
    f32 = dict(dtype=torch.float32, device=dev)
    has_experts = RS + RK > 0
    psa = torch.empty(n_slots, RS, d_in, **f32) if need_a and has_experts else z
    pta = torch.empty(n_slots, RK, d_in, **f32) if need_a and has_experts else z
    psb = torch.empty(n_slots, d_out, RS, **f32) if need_b and has_experts else z
    ptb = torch.empty(n_slots, d_out, RK, **f32) if need_b and has_experts else z
    as3 = lambda t: t.stride() if t.dim() == 3 else (0, 0, 0)  # noqa: E731
    # Unwanted outputs point at a wanted one of the same dtype; their branch never runs.
    dsa_t = dsa if dsa is not None else shared_a
    dta_t = dta if dta is not None else task_a
    dsb_t = dsb if dsb is not None else shared_b
    dtb_t = dtb if dtb is not None else task_b
    dzg_t = dzg if dzg is not None else z
    weight_args = lambda dzp: (  # noqa: E731
        x, *x.stride(), dy, *dy.stride(), z, *z.stride(), dzg_t, *dzg_t.stride(),
        shared_b, *shared_b.stride(), task_b, *task_b.stride(), dzp, *as3(dzp),
        gates, gates.stride(0), gates.stride(1), cl, order, counts, starts,
        psa, *as3(psa), psb, *as3(psb), pta, *as3(pta), ptb, *as3(ptb),
        dta_t, *dta_t.stride(), dtb_t, *dtb_t.stride(),
        keep, stride_keep, float(dropout_p), float(scaling), d_in, d_out, r, RS, RK, S, T, plan.chunk)
    cap = {"maxnreg": plan.maxnreg} if plan.maxnreg else {}  # a launch option, like num_warps
    weight_flags = dict(PER_TOKEN_GATES=per_token_gates, HAS_CLUSTER=task_cluster is not None,
                        HAS_DROPOUT=dropout_p > 0, BLOCK_R=plan.BLOCK_R,
                        BLOCK_K=plan.WBLOCK_K, BLOCK_N=plan.WBLOCK_N, **flags,
                        num_warps=plan.weight_warps, num_stages=plan.num_stages, **cap)

    # ---- launch 1: dB and (dz_parts) this d_out block's share of dz, one read of dy ----
    dz_parts = plan.dz_parts and want_rows
    # [M, n_parts, R] in memory (a row's parts side by side; int64 row offsets), seen as [n_parts, M, R].
    dzp = torch.empty(M, grids["dB"][1], RS + RK, **f32).permute(1, 0, 2) if dz_parts else z
    if (need_b or dz_parts) and has_experts and M > 0 and d_out > 0:
        _bwd_weight_kernel[grids["dB"]](*weight_args(dzp), DO_A=False, WANT_DB=need_b, WANT_DZP=dz_parts,
                                         **weight_flags)

    # ---- launch 2: dz (from the partials, or from dy), dgates, dzg, dx ----
    if want_rows:
        dxt = dx if dx is not None else x
        dgt = dgates if dgates is not None else z
        _bwd_rows_kernel[grids["rows"]](
            dy, *dy.stride(), dzp, *as3(dzp), shared_a, *shared_a.stride(), shared_b, *shared_b.stride(),
            task_a, *task_a.stride(), task_b, *task_b.stride(), gates, gates.stride(0), gates.stride(1),
            cl, order, tile_task, tile_start, tile_end, counts,
            z, *z.stride(), dzg_t, *dzg_t.stride(), dxt, *dxt.stride(), dgt, dgt.stride(0), dgt.stride(1),
            keep, stride_keep, float(dropout_p), float(scaling),
            M, d_in, d_out, r, RS, RK, S, E, T, tile_rows_n, plan.sub, grids["dB"][1],
            E_PAD=e_pad, PER_TOKEN_GATES=per_token_gates, HAS_CLUSTER=task_cluster is not None,
            HAS_DROPOUT=dropout_p > 0, WANT_DX=need_x, WANT_DGATE=need_gates, WANT_DZ=need_a,
            DZ_FROM_PARTS=dz_parts, BLOCK_M=plan.BLOCK_M, BLOCK_K=plan.BLOCK_K,
            BLOCK_N=plan.BLOCK_N, **flags, num_warps=plan.rows_warps, num_stages=plan.num_stages,
            **cap,
        )
    if need_gates and not per_token_gates:
        # Per-task sum of the per-program partials: a one-hot product in fp64, in a fixed order
        # (index_add on CUDA would use float atomics). [T, programs] @ [programs, E].
        if M == 0:
            dgates.zero_()
        prog_task = tile_task.to(torch.int64).repeat_interleave(plan.sub)
        onehot = prog_task[None, :] == torch.arange(T, device=dev)[:, None]
        dgates = (onehot.double() @ dgates[:, :E].double()).to(gates.dtype)


    # ---- launch 3: dA, one read of x; launch 4: partials reduced per cluster / multi-chunk task ----
    if need_a and has_experts and M > 0 and d_in > 0:
        _bwd_weight_kernel[grids["dA"]](*weight_args(dzp), DO_A=True, WANT_DB=False, WANT_DZP=False,
                                         **weight_flags)
    n_ra = triton.cdiv(d_in, plan.RBLOCK) if need_a else 0
    n_rb = triton.cdiv(d_out, plan.RBLOCK) if need_b else 0
    if has_experts and n_ra + n_rb > 0:
        _bwd_reduce_kernel[(C + T, n_ra + n_rb)](
            psa, *as3(psa), psb, *as3(psb), pta, *as3(pta), ptb, *as3(ptb),
            dsa_t, *dsa_t.stride(), dsb_t, *dsb_t.stride(), dta_t, *dta_t.stride(), dtb_t, *dtb_t.stride(),
            cl, counts, d_in, d_out, RS, RK, C, T, n_ra, plan.chunk,
            HAS_SHARED=RS > 0, HAS_TASK=RK > 0, HAS_CLUSTER=task_cluster is not None,
            WANT_A=need_a, WANT_B=need_b, R_PAD=max(rs_pad, rk_pad), T_PAD=t_pad,
            BLOCK_K=plan.RBLOCK, BLOCK_N=plan.RBLOCK, num_warps=4, num_stages=1,
        )
    # A side with no experts (S = 0 or K = 0) has zero-size gradients: nothing to write.
    return dx, dgates, dsa, dsb, dta, dtb
