"""The public op `cgc_lora`: validates, then dispatches to a backend.

Backends: "reference" (pure PyTorch, autograd; the CPU path) and "triton" (fused kernels; CUDA,
or CPU tensors under TRITON_INTERPRET=1). `backend=None` picks Triton for CUDA tensors and the
reference otherwise.
"""

from __future__ import annotations

import torch

from .. import reference
from ..routing import TaskRouting

BACKENDS = ("reference", "triton")


def resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend a call on `x` runs: the one asked for, or the device's default."""
    if backend is None:
        return "triton" if x.is_cuda else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def cgc_lora(
    x: torch.Tensor,
    task_ids: torch.Tensor | TaskRouting,
    gates: torch.Tensor,
    shared_a: torch.Tensor,
    shared_b: torch.Tensor,
    task_a: torch.Tensor,
    task_b: torch.Tensor,
    scaling: float,
    *,
    task_cluster: torch.Tensor | None = None,
    per_token_gates: bool = False,
    dropout_p: float = 0.0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """CGC-LoRA delta for a mixed-task batch; see `cgc_kernels.reference.cgc_lora` for the math.

    Shapes: x [M, d_in]; task_ids [M] in [-1, T) or a TaskRouting; gates [T, S+K] (or [M, S+K]
    with per_token_gates); shared_a [C, S*r, d_in]; shared_b [C, d_out, S*r]; task_a [T, K*r, d_in];
    task_b [T, d_out, K*r]; task_cluster [T] or None. Returns [M, d_out] (or `out` += delta).
    """
    chosen = resolve_backend(x, backend)
    if chosen == "triton":
        raise NotImplementedError("the Triton backend is not built yet")
    return reference.cgc_lora(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
        task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, out=out,
    )
