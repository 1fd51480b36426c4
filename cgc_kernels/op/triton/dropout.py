"""Dropout on the LoRA input, generated inside the kernels from a seed (no mask is ever stored).

The keep decision for element (m, k) of x [M, d_in] is `tl.rand(seed, m * d_in + k) >= p`, with m the
ORIGINAL row index (not the routed position), so the forward, the backward and `dropout_keep_mask`
agree whatever the routing. Kept values are scaled by 1 / (1 - p).

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


@triton.jit
def keep_mask(seed, rows, cols, d_in, p):
    """[R, C] bool keep-mask for original rows `rows` [R] (int64) and columns `cols` [C]; `seed` is
    the scalar loaded from the seed tensor."""
    offs = rows[:, None] * d_in + cols[None, :]  # int64: row * d_in exceeds 2^31 for big batches
    return tl.rand(seed, offs) >= p


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
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rows, cols, d_in, p)
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

