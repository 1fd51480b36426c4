"""What the op tests share: the random inputs and tolerances (from benchmarks/op_inputs.py, which the
benchmarks import too), which backends can run here, and where their tensors live."""

from __future__ import annotations

import os

import pytest
import torch

import cgc_kernels
from benchmarks.op_inputs import DIFF, TOLERANCES, Case, make_inputs

__all__ = ["DIFF", "TOLERANCES", "Case", "make_inputs", "BACKENDS", "INTERPRET", "TRITON_DEVICES", "TRITON_SKIP",
           "device_of"]


def _triton_skip_reason() -> str | None:
    """Why backend="triton" cannot run here (None when it can): CPU tensors need TRITON_INTERPRET=1,
    CUDA tensors a GPU."""
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
    try:
        cgc_kernels.cgc_lora(**make_inputs(Case(M=2, d_in=4, d_out=4, T=1, S=1, K=1, r=1), torch.float32,
                                           device=device), backend="triton")
    except ValueError as e:
        return f"backend='triton' cannot run here: {e}"
    return None


TRITON_SKIP = _triton_skip_reason()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Devices the Triton backend's tests take: CPU tensors in the interpreter (TRITON_INTERPRET=1, the
# CPU CI), CUDA when a GPU is present and the kernels run compiled (benchmarks/gpu_check.py).
TRITON_DEVICES = ["cpu"] if INTERPRET else (["cuda"] if torch.cuda.is_available() else [])


def device_of(backend: str) -> str:
    """Where a test of `backend` builds its tensors: the Triton backend on CUDA when the kernels
    run compiled, everything else (and the interpreter) on CPU."""
    return "cuda" if backend == "triton" and not INTERPRET and torch.cuda.is_available() else "cpu"

# Parametrise a test over the backends of the dispatched op.
BACKENDS = [
    pytest.param("reference"),
    pytest.param("torch"),
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))),
]

# Small problems over every layout the op accepts, for the references checked against the loop
# oracle (test_reference.py, test_csrc_ref.py).
SMALL_CASES = [
    Case(M=7, d_in=5, d_out=6, T=1, S=0, K=1, r=3),  # plain LoRA
    Case(M=9, d_in=8, d_out=4, T=3, S=0, K=1, r=2),  # multi-LoRA / Punica
    Case(M=9, d_in=8, d_out=4, T=3, S=4, K=0, r=2),  # MOELoRA: shared experts only
    Case(M=11, d_in=6, d_out=7, T=3, S=2, K=1, r=2),  # CGC-LoRA
    Case(M=13, d_in=6, d_out=5, T=4, S=2, K=2, r=1, C=2),  # two clusters, r = 1
    Case(M=12, d_in=5, d_out=3, T=3, S=1, K=1, r=2, ids="with_unrouted"),  # task -1 rows
    Case(M=10, d_in=7, d_out=9, T=3, S=2, K=1, r=2, per_token_gates=True),  # per-token gates
    Case(M=8, d_in=33, d_out=65, T=2, S=1, K=2, r=3),  # odd dimensions
    Case(M=1, d_in=4, d_out=3, T=2, S=1, K=1, r=2),  # a single token
    Case(M=0, d_in=4, d_out=3, T=2, S=1, K=1, r=2),  # empty batch
    Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2, ids="skip_task"),  # a task with no tokens
    Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2, ids="all_unrouted"),  # nothing routed
]
