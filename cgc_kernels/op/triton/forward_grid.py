"""CGC-LoRA forward that fills the GPU at every M: one launch at training shapes, shrink + expand at decode.

Two plans over the routing's tile table (tiles of same-task rows; the unused slots take the
task -1 rows, see slots.py), chosen per shape by `forward_plan`:

    "fused" (many tiles), ONE launch, grid (tile x SUB row parts, N_SPLIT d_out groups):
        h      = drop(x[rows])                                  [BLOCK_M, d_in], mask from the seed
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
across programs, so no atomics. The backward (backward_grid.py) reads the saved z.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import common
from .dropout import keep_mask
from .forward import load_rank_gates
from .slots import tile_rows


@triton.jit
def _gated_lora_out(zg_s, zg_t, rows, row_ok, n_lo, n_hi,
                    sb_ptr, stride_sbc, stride_sbn, stride_sbr, tb_ptr, stride_tbt, stride_tbn, stride_tbr,
                    c64, t64, rs, rs_ok, rk, rk_ok, d_out,
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


@triton.jit
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
    seed_ptr, p_drop, scaling,  # seed_ptr: [1] int64 dropout seed (read if HAS_DROPOUT)
    M, d_in, d_out, r, RS, RK, S, T, tile_rows_n, k_split, n_per_prog,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    T_PAD: tl.constexpr, PER_TOKEN_GATES: tl.constexpr, HAS_CLUSTER: tl.constexpr,
    HAS_BASE: tl.constexpr, IN_PLACE: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_Z: tl.constexpr,
    Z_FROM_PARTS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    t, lo, hi = tile_rows(pid // SUB, pid % SUB, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,
                          M, T, tile_rows_n, SUB, T_PAD)
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
                        zero_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
                        zero_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
                        tl.store(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr, zero_s,
                                 mask=row_ok[:, None] & rs_ok[None, :])
                        tl.store(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr, zero_t,
                                 mask=row_ok[:, None] & rk_ok[None, :])
    else:
        t64 = t.to(tl.int64)  # int64: t * stride overflows int32 for large T * r * d
        if HAS_CLUSTER:
            c64 = tl.load(cluster_ptr + t).to(tl.int64)
        else:
            c64 = t64 * 0
        in_dtype = x_ptr.dtype.element_ty
        op_dtype = tl.float32 if UPCAST else in_dtype  # interpreter: its bf16 dot is wrong
        inv_keep = 1.0 / (1.0 - p_drop)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        for m0 in range(lo, hi, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_ok = pos < hi
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            z_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
            z_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
            if Z_FROM_PARTS:
                # The shrink's partial sums, added in a fixed order (bitwise reproducible).
                for ks in range(0, k_split):
                    if HAS_SHARED:
                        z_s += tl.load(zp_ptr + ks * stride_zps + rows[:, None] * stride_zpm
                                       + rs[None, :] * stride_zpr, mask=row_ok[:, None] & rs_ok[None, :],
                                       other=0.0)
                    if HAS_TASK:
                        z_t += tl.load(zp_ptr + ks * stride_zps + rows[:, None] * stride_zpm
                                       + (RS + rk)[None, :] * stride_zpr, mask=row_ok[:, None] & rk_ok[None, :],
                                       other=0.0)
            else:
                # z = drop(x) @ A^T, one pass over d_in for both sides.
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
            zg_s = z_s.to(op_dtype)
            zg_t = z_t.to(op_dtype)
            if HAS_SHARED:
                if SAVE_Z:
                    if pid_n == 0:
                        tl.store(z_ptr + rows[:, None] * stride_zm + rs[None, :] * stride_zr, z_s,
                                 mask=row_ok[:, None] & rs_ok[None, :])
                g_s = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, rs // r, rs_ok,
                                      PER_TOKEN_GATES)
                zg_s = (z_s * g_s * scaling).to(op_dtype)
            if HAS_TASK:
                if SAVE_Z:
                    if pid_n == 0:
                        tl.store(z_ptr + rows[:, None] * stride_zm + (RS + rk)[None, :] * stride_zr, z_t,
                                 mask=row_ok[:, None] & rk_ok[None, :])
                g_t = load_rank_gates(g_ptr, stride_gm, stride_ge, t64, rows, row_ok, S + rk // r, rk_ok,
                                      PER_TOKEN_GATES)
                zg_t = (z_t * g_t * scaling).to(op_dtype)
            _gated_lora_out(zg_s, zg_t, rows, row_ok, n_lo, n_hi,
                            sb_ptr, stride_sbc, stride_sbn, stride_sbr, tb_ptr, stride_tbt, stride_tbn, stride_tbr,
                            c64, t64, rs, rs_ok, rk, rk_ok, d_out,
                            base_ptr, stride_bm, stride_bn, y_ptr, stride_ym, stride_yn,
                            HAS_SHARED, HAS_TASK, HAS_BASE, op_dtype, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _shrink_kernel(
    x_ptr, stride_xm, stride_xk,  # [M, d_in]
    sa_ptr, stride_sac, stride_sar, stride_sak,  # shared_a [C, S*r, d_in]
    ta_ptr, stride_tat, stride_tar, stride_tak,  # task_a [T, K*r, d_in]
    cluster_ptr,  # [T] (HAS_CLUSTER)
    order_ptr, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,  # routing
    zp_ptr, stride_zps, stride_zpm, stride_zpr,  # [K_SPLIT, M, S*r + K*r] fp32 out
    seed_ptr, p_drop,  # seed_ptr: [1] int64 dropout seed (read if HAS_DROPOUT)
    M, d_in, RS, RK, T, tile_rows_n, k_per_prog,
    HAS_SHARED: tl.constexpr, HAS_TASK: tl.constexpr, RS_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    T_PAD: tl.constexpr, HAS_CLUSTER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    t, lo, hi = tile_rows(pid // SUB, pid % SUB, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,
                          M, T, tile_rows_n, SUB, T_PAD)
    if t >= 0:  # task -1 rows have no z; the expand writes their output
        t64 = t.to(tl.int64)
        if HAS_CLUSTER:
            c64 = tl.load(cluster_ptr + t).to(tl.int64)
        else:
            c64 = t64 * 0
        in_dtype = x_ptr.dtype.element_ty
        op_dtype = tl.float32 if UPCAST else in_dtype
        inv_keep = 1.0 / (1.0 - p_drop)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
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
            z_s = tl.zeros([BLOCK_M, RS_PAD], dtype=tl.float32)
            z_t = tl.zeros([BLOCK_M, RK_PAD], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < k_hi
                h = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_DROPOUT:
                    keep = keep_mask(seed, rows, kk, d_in, p_drop)
                    h = tl.where(keep, h.to(tl.float32) * inv_keep, 0.0).to(in_dtype)
                h = h.to(op_dtype)
                if HAS_SHARED:
                    a = tl.load(sa_ptr + c64 * stride_sac + rs[None, :] * stride_sar + kk[:, None] * stride_sak,
                                mask=rs_ok[None, :] & k_ok[:, None], other=0.0)
                    z_s = tl.dot(h, a.to(op_dtype), z_s, input_precision=DOT_PRECISION)
                if HAS_TASK:
                    a = tl.load(ta_ptr + t64 * stride_tat + rk[None, :] * stride_tar + kk[:, None] * stride_tak,
                                mask=rk_ok[None, :] & k_ok[:, None], other=0.0)
                    z_t = tl.dot(h, a.to(op_dtype), z_t, input_precision=DOT_PRECISION)
            base = zp_ptr + ks * stride_zps + rows[:, None] * stride_zpm
            if HAS_SHARED:
                tl.store(base + rs[None, :] * stride_zpr, z_s, mask=row_ok[:, None] & rs_ok[None, :])
            if HAS_TASK:
                tl.store(base + (RS + rk)[None, :] * stride_zpr, z_t, mask=row_ok[:, None] & rk_ok[None, :])


# ---- block configuration ---------------------------------------------------------------------

WAVE_PROGRAMS = 264  # two waves of an H200's 132 SMs: the least any launch should offer


@dataclass(frozen=True)
class ForwardPlan:
    """How one forward call is launched. kind "fused": one launch, grid (tiles * SUB, n_split);
    kind "split": shrink grid (tiles * SUB, k_split) then expand grid (tiles * SUB, n_split)."""

    kind: str
    SUB: int  # programs per routing tile (row parts)
    BLOCK_M: int
    BLOCK_K: int
    BLOCK_N: int
    n_split: int  # d_out groups (programs along axis 1 of the fused / expand launch)
    k_split: int  # d_in parts of the shrink (1 for "fused")
    num_warps: int
    num_stages: int

    def grids(self, max_tiles: int) -> list[tuple[int, int]]:
        rows = max_tiles * self.SUB
        if self.kind == "fused":
            return [(rows, self.n_split)]
        return [(rows, self.k_split), (rows, self.n_split)]


# Blocks by padded rank (shared + task side, both in registers) and dtype kind; checked ahead of
# time (tests/aot_compile_kernels.py) at the largest rank of each tier, spill-free on sm_80/sm_90.
FORWARD_BLOCKS = {
    "half": [(64, dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3)),
             (2 * common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=64, num_warps=8, num_stages=2))],
    # fp32 runs its dots on FMA units (no tensor cores): one small tier for every rank.
    "fp32": [(2 * common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=32, num_warps=8, num_stages=2))],
}
# Decode / small M: shrink blocks of 16 rows (tl.dot's minimum) and d_in parts of several BLOCK_K.
# No fp32 tier (its shrink spills at every block size tried): fp32 takes the fused plan.
SPLIT_BLOCKS = {
    "half": [(64, dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3)),
             (2 * common.MAX_RANK_PAD, dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=64, num_warps=8, num_stages=2))],
    "fp32": [],
}
# The interpreter's config: few, large programs (it pays per program and per loop iteration).
PINNED = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _pick(table: list, rank_size: int) -> dict:
    for limit, cfg in table:
        if rank_size <= limit:
            return dict(cfg)
    largest = table[-1][0] if table else 0
    raise ValueError(f"padded rank {rank_size} exceeds the largest kernel tier of this plan ({largest})")


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
    fused_cfg = dict(PINNED) if pinned else _pick(FORWARD_BLOCKS[kt], rank_size)
    sub = max(1, min(tile_rows // fused_cfg["BLOCK_M"], 2))
    split_tiers = SPLIT_BLOCKS[kt]
    if kind is None:
        splittable = pinned or bool(split_tiers) and rank_size <= split_tiers[-1][0]
        kind = "fused" if max_tiles * sub >= WAVE_PROGRAMS or not splittable else "split"
    if kind == "fused":
        return ForwardPlan("fused", sub, n_split=1, k_split=1, **fused_cfg)
    if kind != "split":
        raise ValueError(f"forward plan kind must be 'fused' or 'split', got {kind!r}")
    cfg = dict(PINNED) if pinned else _pick(split_tiers, rank_size)
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


def forward_config_space(dtype_name: str) -> list[tuple[str, str, dict, int, int]]:
    """(kernel, config name, constexprs, num_warps, num_stages) of every GPU config, each at the
    largest rank it serves with the heaviest flags (ahead-of-time spill checks)."""
    kind = "fp32" if dtype_name == "fp32" else "half"
    prec = "ieee" if kind == "fp32" else "tf32"
    out = []
    for table, name in ((FORWARD_BLOCKS, "fused"), (SPLIT_BLOCKS, "split")):
        for limit, cfg in table[kind]:
            cfg = dict(cfg)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            common_flags = dict(HAS_SHARED=True, HAS_TASK=True, RS_PAD=limit // 2, RK_PAD=limit // 2,
                                T_PAD=64, HAS_CLUSTER=True, HAS_DROPOUT=True, UPCAST=False,
                                DOT_PRECISION=prec, SUB=2, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"])
            fwd = dict(common_flags, PER_TOKEN_GATES=True, HAS_BASE=True, IN_PLACE=False, SAVE_Z=True,
                       Z_FROM_PARTS=name == "split", BLOCK_N=cfg["BLOCK_N"])
            out.append(("fwd_grid", f"{name}-r{limit}", fwd, warps, stages))
            if name == "split":
                out.append(("shrink", f"split-r{limit}", common_flags, warps, stages))
    return out


# ---- launchers -------------------------------------------------------------------------------

def seed_tensor(seed: torch.Tensor | int | None, device: torch.device, unused: torch.Tensor) -> torch.Tensor:
    """The dropout seed as the [1] int64 device tensor the kernels read (no host sync, and a CUDA
    graph replays a seed drawn inside it instead of baking a Python int in). None (no dropout):
    `unused`, an int64 tensor already on the device, stands in; the kernels never read it."""
    if seed is None:
        return unused
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def cgc_lora_forward_grid(
    x: torch.Tensor,  # [M, d_in]
    gates: torch.Tensor,  # [T, S+K] or [M, S+K]
    shared_a: torch.Tensor, shared_b: torch.Tensor,  # [C, S*r, d_in], [C, d_out, S*r]
    task_a: torch.Tensor, task_b: torch.Tensor,  # [T, K*r, d_in], [T, d_out, K*r]
    task_cluster: torch.Tensor | None,  # [T] or None (one cluster)
    order: torch.Tensor, tile_task: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    counts: torch.Tensor, tile_rows_n: int,  # routing (counts [T]; tile_rows_n = routing.block_m)
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
    seed = seed_tensor(seed, x.device, counts)
    z = torch.empty(M, RS + RK, dtype=torch.float32, device=x.device) if save_z else None
    if M == 0:
        return y, z
    rs_pad, rk_pad = common.rank_pad(RS), common.rank_pad(RK)
    rank_size = (rs_pad if RS else 0) + (rk_pad if RK else 0)
    max_tiles = tile_task.shape[0]
    if not isinstance(plan, ForwardPlan):
        plan = forward_plan(M, T, d_in, d_out, rank_size, x.dtype, max_tiles, tile_rows_n, kind=plan)
    in_place = base is not None and base.data_ptr() == y.data_ptr()
    b = base if base is not None else y  # never read without HAS_BASE
    zt = z if z is not None else y  # never written without SAVE_Z
    cl = task_cluster if task_cluster is not None else counts  # never read without HAS_CLUSTER
    flags = dict(HAS_SHARED=RS > 0, HAS_TASK=RK > 0, RS_PAD=rs_pad, RK_PAD=rk_pad, T_PAD=common.next_pow2(T),
                 HAS_CLUSTER=task_cluster is not None, HAS_DROPOUT=dropout_p > 0,
                 UPCAST=common.upcast_operands(), DOT_PRECISION=common.dot_precision(x.dtype),
                 SUB=plan.SUB, BLOCK_M=plan.BLOCK_M, BLOCK_K=plan.BLOCK_K)
    launch = dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
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
            zp, *zp_strides, seed, float(dropout_p),
            M, d_in, RS, RK, T, tile_rows_n, k_per,
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
        seed, float(dropout_p), float(scaling),
        M, d_in, d_out, r, RS, RK, S, T, tile_rows_n, plan.k_split, n_per,
        PER_TOKEN_GATES=per_token_gates, HAS_BASE=base is not None, IN_PLACE=in_place, SAVE_Z=save_z,
        Z_FROM_PARTS=plan.kind == "split", BLOCK_N=plan.BLOCK_N, **flags, **launch,
    )
    return y, z

