"""Dropout on the LoRA input: one launch draws a bit-packed keep-mask from a seed, every kernel reads bits.

One Philox call (`tl.randint4x`: 10 rounds, four 32-bit words) decides the 8 elements of a group:
element (m, k) of x [M, d_in] belongs to group g = m * cdiv(d_in, 8) + k // 8, and lane k % 8
reads 16 bits of its group's words (lane j: word j // 2, low half for even j). It is kept when
those 16 bits are >= round(p * 2^16), so the drop probability is p to within 2^-17. Kept values are
scaled by 1 / (1 - p). m is the ORIGINAL row index (not the routed position), so the mask is a
function of (seed, m, k) alone, whatever the routing and the block sizes.

`keep_bits` runs `_keep_bits_kernel` once per forward and once per backward: it writes group g's 8
decisions as one byte (bit j: lane j) of bits [M, cdiv(d_in, 8)] uint8, in tiles large enough that
every thread makes several calls, each deciding 8 elements (2.5 Philox multiplies per element in
the PTX). The matmul kernels then read one bit per element (`load_keep`): no generator in their
loops, whose tiles are too small at large ranks for a thread to use a call's 8 decisions. The
backward regenerates the bits from the saved seed rather than keeping [M, d_in / 8] bytes alive
between the passes.

The seed is a [1] int64 tensor on the inputs' device, drawn from that device's generator and read
by the mask kernel through a pointer: no host sync, no CPU tensor in the op's outputs, and a CUDA
graph that captured the draw draws a new seed (so a new mask) on every replay. A seed passed as a
Python int would be baked into a captured graph, and Triton would specialize on its value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common


@triton.jit
def _lane_bits(w, lane: tl.constexpr, threshold):
    """Keep-bits of the two lanes (2 * (lane // 2) + 0 / 1) one Philox word decides, at their bit
    positions of the group's byte."""
    lo = ((w & 0xFFFF) >= threshold).to(tl.int32) << lane
    hi = ((w >> 16) >= threshold).to(tl.int32) << (lane + 1)
    return lo | hi


# M changes from call to call: not specialized (no recompile when it becomes a multiple of 16).
@triton.jit(do_not_specialize=["M"])
def _keep_bits_kernel(
    bits_ptr,  # [M, n_groups] uint8 out: bit j of byte (m, g) keeps element (m, 8 g + j)
    seed_ptr,  # [1] int64
    p, M, n_groups,  # n_groups = cdiv(d_in, 8)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # a tile of BLOCK_M rows x BLOCK_K columns of x
):
    G: tl.constexpr = BLOCK_K // 8
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    threshold = tl.cast(p * 65536.0 + 0.5, tl.uint32)
    w0, w1, w2, w3 = tl.randint4x(seed, rows[:, None] * n_groups + grp[None, :])  # [BLOCK_M, G] each
    byte = (_lane_bits(w0, 0, threshold) | _lane_bits(w1, 2, threshold) | _lane_bits(w2, 4, threshold)
            | _lane_bits(w3, 6, threshold))
    io = (rows[:, None] < M) & (grp[None, :] < n_groups)
    tl.store(bits_ptr + rows[:, None] * n_groups + grp[None, :], byte.to(tl.uint8), mask=io)


@triton.jit
def load_keep(bits_ptr, stride_bits, rows, row_ok, k0, BLOCK_K: tl.constexpr):
    """[len(rows), BLOCK_K] bool keep-mask of original rows `rows` (int64) and columns
    [k0, k0 + BLOCK_K) (k0 a multiple of 8), read from the bits `keep_bits` wrote (row stride
    `stride_bits` = cdiv(d_in, 8)); False for masked rows. One byte load per 8 columns, unpacked in
    registers: a load per column would hold a 64-bit address per element."""
    G: tl.constexpr = BLOCK_K // 8
    grp = k0 // 8 + tl.arange(0, G)
    byte = tl.load(bits_ptr + rows[:, None] * stride_bits + grp[None, :],
                   mask=row_ok[:, None] & (grp < stride_bits)[None, :], other=0)
    bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # [R, G, 8]
    return tl.reshape(bits, [rows.shape[0], BLOCK_K]) != 0


# The mask kernel's tile: 64 x 128 elements over 4 warps is 16 Philox calls per thread.
_BITS_BLOCK_M, _BITS_BLOCK_K, _BITS_WARPS = 64, 128, 4


def keep_bits(seed: torch.Tensor | int, M: int, d_in: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The [M, cdiv(d_in, 8)] uint8 keep-bits for `seed` (a [1] int64 tensor, or an int) and drop
    probability `p`: bit j of byte (m, g) keeps element (m, 8 g + j) (bits past d_in are drawn
    and never read)."""
    n_groups = triton.cdiv(d_in, 8)
    bits = torch.empty(M, n_groups, dtype=torch.uint8, device=device)
    if M == 0 or n_groups == 0:
        return bits
    seed = common.seed_tensor(seed, bits.device, bits)
    grid = (triton.cdiv(M, _BITS_BLOCK_M), triton.cdiv(d_in, _BITS_BLOCK_K))
    with common.device_guard(bits):
        _keep_bits_kernel[grid](bits, seed, float(p), M, n_groups, BLOCK_M=_BITS_BLOCK_M, BLOCK_K=_BITS_BLOCK_K,
                                num_warps=_BITS_WARPS)
    return bits


def kernel_keep_bits(seed: torch.Tensor | int | None, M: int, d_in: int, p: float,
                     unused: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(bits, row stride) the matmul kernels read: `keep_bits` when dropout is on (p > 0 and a
    seed), else `unused` (a tensor already on the device, never read: HAS_DROPOUT is off) and 0.
    One launch of the mask kernel; the forward and the backward each call it with the same seed."""
    if p <= 0 or M == 0:
        return unused, 0
    if seed is None:
        raise ValueError(f"dropout_p={p} needs a dropout seed")
    bits = keep_bits(seed, M, d_in, p, unused.device)
    return bits, bits.stride(0)


def new_seed(device: torch.device | str) -> torch.Tensor:
    """The [1] int64 seed a dropout call of the op draws on `device` (common.new_dropout_seed)."""
    return common.new_dropout_seed(device)


def dropout_keep_mask(seed: torch.Tensor | int, M: int, d_in: int, p: float,
                      device: torch.device | str) -> torch.Tensor:
    """The [M, d_in] bool keep-mask the kernels use for `seed` (a [1] int64 tensor, or an int) and
    drop probability `p`: `keep_bits` unpacked.

    For tests: `reference.cgc_lora(..., dropout_p=p, dropout_mask=dropout_keep_mask(seed, ...))`
    equals the kernels' output with that seed.
    """
    bits = keep_bits(seed, M, d_in, p, device)
    lanes = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[:, :, None] >> lanes) & 1).bool().reshape(M, bits.shape[1] * 8)[:, :d_in]
