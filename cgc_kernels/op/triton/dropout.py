"""Dropout on the LoRA input, generated inside the kernels from a seed (no mask is ever stored).

One Philox call (`tl.randint4x`: 10 rounds, four 32-bit words) decides 8 elements: element (m, k)
of x [M, d_in] belongs to group g = m * cdiv(d_in, 8) + k // 8, and lane k % 8 reads 16 bits of
its group's words (lane j: word j // 2, low half for even j). It is kept when those 16 bits are
>= round(p * 2^16), so the drop probability is p to within 2^-17. Kept values are scaled by
1 / (1 - p). m is the ORIGINAL row index (not the routed position) and the groups never straddle a
row, so the forward, the backward and `dropout_keep_mask` agree whatever the routing and the
block sizes (each kernel draws for column blocks that start at a multiple of 8).

The seed is a [1] int64 tensor on the inputs' device, drawn from that device's generator and read
by the kernels through a pointer: no host sync, no CPU tensor in the op's outputs, and a CUDA graph
that captured the draw draws a new seed (so a new mask) on every replay. A seed passed as a Python
int would be baked into a captured graph, and Triton would specialize on its value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common

# Tiles of at least this many elements draw one call per group; smaller tiles (where every thread
# holds under 8 elements) draw per element.
GROUPED_MIN_TILE = tl.constexpr(1024)


@triton.jit
def keep_mask(seed, rows, k0, d_in, p, BLOCK_K: tl.constexpr):
    """[R, BLOCK_K] bool keep-mask of original rows `rows` [R] (int64) and columns
    [k0, k0 + BLOCK_K) (k0 a multiple of 8); `seed` is the scalar loaded from the seed tensor."""
    G: tl.constexpr = BLOCK_K // 8
    per_row = (d_in + 7) // 8
    threshold = tl.cast(p * 65536.0 + 0.5, tl.uint32)
    if rows.shape[0] * BLOCK_K >= GROUPED_MIN_TILE:
        # One call per group of 8 columns, its 8 half-words spread over the group's columns.
        groups = rows[:, None] * per_row + (k0 // 8 + tl.arange(0, G))[None, :]  # int64
        w0, w1, w2, w3 = tl.randint4x(seed, groups)
        lo = 0xFFFF
        # tl.join appends the new axis last, so the outermost join picks lane bit 0: after the
        # reshape, column 8 g + j holds lane j of group g.
        v = tl.join(tl.join(tl.join(w0 & lo, w2 & lo), tl.join(w1 & lo, w3 & lo)),
                    tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16)))  # [R, G, 2, 2, 2]
        v = tl.reshape(v, [rows.shape[0], BLOCK_K])
    else:
        # A tile smaller than the threads' share of whole groups: every thread would run a call for
        # its one or two elements anyway, so each element draws its group's words itself (the same
        # values, without the join and reshape that would cost registers here).
        kk = k0 + tl.arange(0, BLOCK_K)
        w0, w1, w2, w3 = tl.randint4x(seed, rows[:, None] * per_row + (kk // 8)[None, :])
        lane = (kk % 8)[None, :]
        w = tl.where(lane < 4, tl.where(lane < 2, w0, w1), tl.where(lane < 6, w2, w3))
        v = tl.where(lane % 2 == 0, w & 0xFFFF, w >> 16)
    return v >= threshold


# M changes from call to call: not specialized (no recompile when it becomes a multiple of 16).
@triton.jit(do_not_specialize=["M"])
def _keep_mask_kernel(
    mask_ptr,  # [M, d_in] int8 out
    seed_ptr,  # [1] int64
    p, M, d_in,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rows, k0, d_in, p, BLOCK_K)
    io = (rows[:, None] < M) & (cols[None, :] < d_in)
    tl.store(mask_ptr + rows[:, None] * d_in + cols[None, :], keep.to(tl.int8), mask=io)


def new_seed(device: torch.device | str) -> torch.Tensor:
    """The [1] int64 seed a dropout call of the op draws on `device` (common.new_dropout_seed)."""
    return common.new_dropout_seed(device)


def dropout_keep_mask(seed: torch.Tensor | int, M: int, d_in: int, p: float,
                      device: torch.device | str) -> torch.Tensor:
    """The [M, d_in] bool keep-mask the kernels use for `seed` (a [1] int64 tensor, or an int) and
    drop probability `p`.

    For tests: `reference.cgc_lora(..., dropout_p=p, dropout_mask=dropout_keep_mask(seed, ...))`
    equals the kernels' output with that seed.
    """
    mask = torch.empty(M, d_in, dtype=torch.int8, device=device)
    if M == 0 or d_in == 0:
        return mask.bool()
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    bm, bk = 64, 64
    grid = (triton.cdiv(M, bm), triton.cdiv(d_in, bk))
    with common.device_guard(mask):
        _keep_mask_kernel[grid](mask, seed, float(p), M, d_in, BLOCK_M=bm, BLOCK_K=bk)
    return mask.bool()
