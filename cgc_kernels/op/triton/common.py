"""What every kernel launcher shares: interpreter detection, config pinning, rank padding, dot precision.

No kernels here. Importing this module does not import Triton.
"""

from __future__ import annotations

import contextlib
import os

import torch

# Triton decides at `@triton.jit` time whether a kernel runs in its interpreter, so the value the
# environment had when the kernel modules were imported is the one that counts.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Largest stacked rank per side (S*r or K*r, padded to a power of two) the fused kernels accept:
# z for one row block lives in registers, and larger ranks spill (checked ahead of time). Larger
# problems go to the reference path.
MAX_RANK_PAD = 128

_pinned = os.environ.get("CGC_KERNELS_PIN_CONFIG", "0") not in ("", "0")
# CGC_KERNELS_GPU_CONFIGS=1: the interpreter runs the GPU block configs instead of the pinned ones,
# so the configs a GPU will use are proven correct on CPU (slower: smaller blocks, more programs).
GPU_CONFIGS_IN_INTERPRETER = os.environ.get("CGC_KERNELS_GPU_CONFIGS", "0") not in ("", "0")


def pin_configs(pinned: bool = True) -> None:
    """Make every config function return its single pinned config (tests, interpreter, benchmarks)."""
    global _pinned
    _pinned = bool(pinned)


def configs_pinned() -> bool:
    """True when launchers must use the pinned config (explicitly pinned, or in the interpreter
    unless CGC_KERNELS_GPU_CONFIGS=1)."""
    return _pinned or (INTERPRET and not GPU_CONFIGS_IN_INTERPRETER)


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n and >= minimum (itself a power of two)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def rank_pad(rank: int) -> int:
    """Padded rank block for `rank` stacked rank columns: a power of two >= 16 (tl.dot's minimum).

    rank 0 still gets 16: the kernel skips that side through a constexpr flag, but shapes must exist.
    """
    return next_pow2(rank, 16)


def rank_size(rs: int, rk: int) -> int:
    """The padded rank both sides hold in registers (the tier key): a side without experts adds 0."""
    return (rank_pad(rs) if rs else 0) + (rank_pad(rk) if rk else 0)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: "ieee" for fp32 inputs (a GPU would round them to tf32 otherwise and
    miss fp32 tolerances); irrelevant for fp16/bf16, which use tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_operands() -> bool:
    """Cast tl.dot operands to fp32 in the interpreter: its bf16 dot is wrong. On a GPU the
    operands stay fp16/bf16 so the dot runs on tensor cores (accumulating in fp32 either way)."""
    return INTERPRET


def triton_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def tier_kind(dtype: torch.dtype) -> str:
    """Config tables are keyed by "half" (fp16 / bf16: tensor-core operands) or "fp32"."""
    return "fp32" if dtype == torch.float32 else "half"


def pick_tier(tiers: list[tuple[int, dict]], size: int) -> dict:
    """A copy of the config of the first (limit, config) tier whose limit covers `size` (a padded
    rank). Every kernel's tier table has this format: limits ascending, each tier compiled ahead of
    time at its limit (tests/op/aot_compile_kernels.py)."""
    for limit, cfg in tiers:
        if size <= limit:
            return dict(cfg)
    largest = tiers[-1][0] if tiers else 0
    raise ValueError(f"padded rank {size} exceeds the largest kernel tier ({largest})")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `t`'s CUDA device current for a launch (Triton launches on the current device, and a
    model spread over GPUs, e.g. device_map="auto", has tensors on devices that are not)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def new_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A [1] int64 dropout seed drawn on `device` from its default generator (see dropout.py):
    reproducible under torch.manual_seed, restored by activation checkpointing (which stashes the
    inputs' devices' RNG states), CUDA-graph safe (a captured draw draws anew on each replay), and
    no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def seed_tensor(seed: torch.Tensor | int | None, device: torch.device, unused: torch.Tensor) -> torch.Tensor:
    """The dropout seed as the [1] int64 device tensor the kernels read (no host sync, and a CUDA
    graph replays a seed drawn inside it instead of baking a Python int in). None (no dropout):
    `unused`, an int64 tensor already on the device, stands in; the kernels never read it."""
    if seed is None:
        return unused
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)
