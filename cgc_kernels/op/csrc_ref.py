"""The C++ reference of the CGC-LoRA op: build on first use, load, and call it like the reference.

A second implementation of `cgc_kernels.reference.cgc_lora` written as plain loops (CPU, OpenMP,
float64 accumulation) with its own backward, plus a hand-written CUDA forward: the Python
reference and the Triton kernels are each checked against it, and GPU benchmarks use the CUDA
forward as a straightforward baseline. Sources live in `csrc_ref/` at the repository root (next to
the package's directory); an installed wheel does not carry them, and `load()` says so.

    load()                              -> the compiled module (built once, then cached on disk)
    forward(x, task_ids, gates, ...)    -> delta [M, d_out]          (CPU, or CUDA tensors)
    backward(dy, x, task_ids, ...)      -> CGCLoRAGrads (dx, dgates, d-experts; CPU tensors)

Build directory: $CGC_KERNELS_BUILD_DIR, else $TORCH_EXTENSIONS_DIR/cgc_kernels, else
~/.cache/cgc_kernels, in a subdirectory per Python and torch version. Sources elsewhere:
$CGC_KERNELS_CSRC_DIR.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from .routing import TaskRouting
from .validation import check_cgc_lora_args

SOURCES = ("cgc_lora_ref.cpp", "cgc_lora_ref.cu")
_lock = threading.Lock()
_module = None


def source_dir() -> Path:
    """The directory holding csrc_ref's sources; RuntimeError when they are absent (a wheel install)."""
    env = os.environ.get("CGC_KERNELS_CSRC_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "csrc_ref"
    if not (path / SOURCES[0]).is_file():
        raise RuntimeError(
            f"the C++ reference sources are not at {path} (csrc_ref/ ships with the repository, not "
            f"the wheel): run from a source checkout or set CGC_KERNELS_CSRC_DIR"
        )
    return path


def build_dir() -> Path:
    """Where the compiled module is cached: one subdirectory per Python and torch version."""
    if os.environ.get("CGC_KERNELS_BUILD_DIR"):
        base = Path(os.environ["CGC_KERNELS_BUILD_DIR"])
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "cgc_kernels"
    else:
        base = Path.home() / ".cache" / "cgc_kernels"
    version = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
    tag = re.sub(r"[^A-Za-z0-9_.]", "_", version)
    return base / tag


def _cuda_wanted() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _ensure_tools() -> None:
    """A C++ compiler and ninja (torch's JIT builder needs both), or a RuntimeError saying which."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"the C++ reference needs a C++ compiler: {cxx!r} is not on PATH (set CXX)")
    if shutil.which("ninja") is None:
        try:  # the `ninja` PyPI package (dev extra) puts the binary in its own directory
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            raise RuntimeError("the C++ reference needs ninja: `pip install ninja`") from None


def load(verbose: bool = False):
    """The compiled module, built on first use (a few seconds; later processes reuse the cache).

    With a CUDA build of torch, a visible GPU and the CUDA toolkit, the module also holds the CUDA
    forward (`has_cuda`). Raises RuntimeError when the sources, a compiler or ninja are missing,
    or when the build fails.
    """
    global _module
    with _lock:
        if _module is not None:
            return _module
        src = source_dir()
        _ensure_tools()
        from torch.utils import cpp_extension

        with_cuda = _cuda_wanted()
        name = "cgc_lora_ref_cuda" if with_cuda else "cgc_lora_ref_cpu"
        directory = build_dir() / name
        directory.mkdir(parents=True, exist_ok=True)
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        sources = [str(src / SOURCES[0])] + ([str(src / SOURCES[1])] if with_cuda else [])
        try:
            _module = cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=["-O2", *openmp] + (["-DCGC_REF_WITH_CUDA"] if with_cuda else []),
                extra_ldflags=openmp,
                extra_cuda_cflags=["-O2"],
                build_directory=str(directory),
                with_cuda=with_cuda,
                verbose=verbose,
            )
        except Exception as err:  # compiler errors, a missing toolchain piece, a failed import
            raise RuntimeError(f"building the C++ reference in {directory} failed: {err}") from err
        return _module


class CGCLoRAGrads(NamedTuple):
    """Gradients of the op, each shaped and typed like its input."""

    x: torch.Tensor  # [M, d_in]
    gates: torch.Tensor  # [T, S+K] or [M, S+K]
    shared_a: torch.Tensor  # [C, S*r, d_in]
    shared_b: torch.Tensor  # [C, d_out, S*r]
    task_a: torch.Tensor  # [T, K*r, d_in]
    task_b: torch.Tensor  # [T, d_out, K*r]


def _prepare(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
             per_token_gates, dropout_p, dropout_mask):
    """Validate like the reference, then make every tensor what the C++ side expects."""
    check_cgc_lora_args(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
        task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p,
    )
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x: the C++ reference takes float32 or float64, got {x.dtype}")
    keep = None
    if dropout_mask is not None:
        if tuple(dropout_mask.shape) != tuple(x.shape) or dropout_mask.device != x.device:
            raise ValueError(f"dropout_mask must be [M, d_in] = {tuple(x.shape)} on x's device, "
                             f"got {tuple(dropout_mask.shape)} on {dropout_mask.device}")
        keep = dropout_mask.to(torch.bool).to(torch.uint8).contiguous()
    elif dropout_p > 0:
        raise ValueError("dropout_p > 0 needs dropout_mask: the C++ reference draws no random mask")
    ids = task_ids.task_ids if isinstance(task_ids, TaskRouting) else task_ids
    cluster = None if task_cluster is None else task_cluster.to(torch.int64).contiguous()
    tensors = [t.contiguous() for t in (x, gates.to(x.dtype), shared_a, shared_b, task_a, task_b)]
    return tensors, ids.to(torch.int64).contiguous(), cluster, keep


def forward(x: torch.Tensor, task_ids: torch.Tensor | TaskRouting, gates: torch.Tensor, shared_a: torch.Tensor,
            shared_b: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor, scaling: float, *,
            task_cluster: torch.Tensor | None = None, per_token_gates: bool = False, dropout_p: float = 0.0,
            dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The op's delta [M, d_out] in x's dtype, computed by the C++ (CPU) or CUDA code.

    Arguments as `cgc_kernels.reference.cgc_lora`: x [M, d_in] float32/float64; task_ids [M] in
    [-1, T) or a TaskRouting; gates [T, S+K] (or [M, S+K] with per_token_gates; cast to x's dtype);
    shared_a [C, S*r, d_in]; shared_b [C, d_out, S*r]; task_a [T, K*r, d_in]; task_b [T, d_out, K*r];
    task_cluster [T] or None. Dropout only through an explicit keep-mask `dropout_mask` [M, d_in]
    (kept entries scaled by 1 / (1 - dropout_p)). No autograd: see `backward`.
    """
    (x, gates, sa, sb, ta, tb), ids, cluster, keep = _prepare(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
        per_token_gates, dropout_p, dropout_mask)
    module = load()
    args = (x, ids, gates, sa, sb, ta, tb, float(scaling), cluster, per_token_gates, keep, float(dropout_p))
    if x.is_cuda:
        if not module.has_cuda:
            raise RuntimeError("the C++ reference was built without CUDA (torch, a GPU or nvcc is missing)")
        with torch.cuda.device(x.device):
            return module.forward_cuda(*args, torch.cuda.current_stream(x.device).cuda_stream)
    return module.forward_cpu(*args, torch.get_num_threads())


def backward(dy: torch.Tensor, x: torch.Tensor, task_ids: torch.Tensor | TaskRouting, gates: torch.Tensor,
             shared_a: torch.Tensor, shared_b: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor,
             scaling: float, *, task_cluster: torch.Tensor | None = None, per_token_gates: bool = False,
             dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None) -> CGCLoRAGrads:
    """Every gradient of the op for the upstream gradient dy [M, d_out] (CPU tensors only).

    Other arguments as `forward`. Returns CGCLoRAGrads(x, gates, shared_a, shared_b, task_a, task_b),
    each like its input (dgates in gates' dtype); rows of task -1 tokens get zero gradient.
    Deterministic: the same bits for any thread count.
    """
    if x.is_cuda:
        raise ValueError("x: the C++ reference backward runs on CPU tensors only")
    (x, gates_c, sa, sb, ta, tb), ids, cluster, keep = _prepare(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
        per_token_gates, dropout_p, dropout_mask)
    if not isinstance(dy, torch.Tensor) or tuple(dy.shape) != (x.shape[0], tb.shape[1]):
        raise ValueError(f"dy must be a [M, d_out] = {(x.shape[0], tb.shape[1])} tensor")
    grads = load().backward_cpu(
        dy.to(device=x.device, dtype=x.dtype).contiguous(), x, ids, gates_c, sa, sb, ta, tb,
        float(scaling), cluster, per_token_gates, keep, float(dropout_p), torch.get_num_threads())
    dx, dgates, *rest = grads
    return CGCLoRAGrads(dx, dgates.to(gates.dtype), *rest)
