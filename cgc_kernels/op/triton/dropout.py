"""Dropout on the LoRA input, generated inside the kernels from a seed (no mask is ever stored).

The keep decision for element (m, k) of x [M, d_in] is `tl.rand(seed, m * d_in + k) >= p`, with m the
ORIGINAL row index (not the routed position), so the forward, the backward and `dropout_keep_mask`
agree whatever the routing. Kept values are scaled by 1 / (1 - p).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, rows, cols, d_in, p):
    """[R, C] bool keep-mask for original rows `rows` [R] (int64) and columns `cols` [C]."""
    offs = rows[:, None] * d_in + cols[None, :]  # int64: row * d_in exceeds 2^31 for big batches
    return tl.rand(seed, offs) >= p


@triton.jit
def _keep_mask_kernel(
    mask_ptr,  # [M, d_in] int8 out
    seed, p, M, d_in,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rows, cols, d_in, p)
    io = (rows[:, None] < M) & (cols[None, :] < d_in)
    tl.store(mask_ptr + rows[:, None] * d_in + cols[None, :], keep.to(tl.int8), mask=io)


def new_seed() -> int:
    """A dropout seed from torch's CPU generator: reproducible under torch.manual_seed, restored by
    activation checkpointing (which stashes the CPU RNG state), and no GPU sync."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def dropout_keep_mask(seed: int, M: int, d_in: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The [M, d_in] bool keep-mask the kernels use for `seed` and drop probability `p`.

    For tests: `reference.cgc_lora(..., dropout_p=p, dropout_mask=dropout_keep_mask(seed, ...))`
    equals the kernels' output with that seed.
    """
    mask = torch.empty(M, d_in, dtype=torch.int8, device=device)
    if M == 0 or d_in == 0:
        return mask.bool()
    bm, bk = 64, 64
    grid = (triton.cdiv(M, bm), triton.cdiv(d_in, bk))
    _keep_mask_kernel[grid](mask, seed, float(p), M, d_in, BLOCK_M=bm, BLOCK_K=bk)
    return mask.bool()
