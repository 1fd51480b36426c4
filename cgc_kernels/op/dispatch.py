"""The public op `cgc_lora`: validates, picks a backend, and hands the call to autograd.py.

Backends: "torch" (the fast PyTorch backend, torch_backend.py: the CPU path), "triton" (fused
kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1) and "reference" (the readable spec,
autograd through plain PyTorch; tests and benchmarks). `backend=None` picks Triton for CUDA
tensors in fp16, bf16 or fp32 (stacked rank per side within the kernels' budget) and "torch"
otherwise.

Every backend runs with autocast disabled: the caller (CGCLoRALinear) has already chosen the
compute dtype the way nn.Linear does under autocast, and the op's own casts must not be redone.

Validation runs on every call, except that a call with a TaskRouting whose signature (shapes,
dtypes, devices, arguments) passed before skips it (`_CHECKED`): a model calls each layer with
the same signature every step. A plain id tensor is range-checked once per tensor, and the Triton
path builds its routing once per tensor (`routing.tensor_cache`): no host sync per layer. A
routing on another device than x (layers split over devices) is copied there once and cached.
"""

from __future__ import annotations

import functools

import torch

from . import autograd, reference
from .routing import TaskRouting, build_routing, tensor_cache
from .triton import common
from .validation import CGCShapes, check_cgc_lora_args

BACKENDS = ("torch", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend a call on `x` runs: the one asked for, or the device's default."""
    if backend is None:
        return "triton" if x.is_cuda and x.dtype in TRITON_DTYPES else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def _rank_too_large(shared_a: torch.Tensor, task_a: torch.Tensor) -> bool:
    """Beyond the kernels' register budget: a side's padded stacked rank over MAX_RANK_PAD, or both
    sides' together over the largest tier of this dtype and Triton version."""
    return _rank_too_large_for(shared_a.shape[1], task_a.shape[1], shared_a.dtype)


@functools.lru_cache(maxsize=256)  # per call otherwise: an import and a dict merge on the hot path
def _rank_too_large_for(rs: int, rk: int, dtype: torch.dtype) -> bool:
    pads = [common.rank_pad(n) for n in (rs, rk) if n > 0]
    if max(pads, default=0) > common.MAX_RANK_PAD:
        return True
    from .triton import backward_grid

    return sum(pads) > backward_grid.max_rank_size(dtype)


# ---- public op -------------------------------------------------------------------------------

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
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """CGC-LoRA delta for a mixed-task batch; see `cgc_kernels.reference.cgc_lora` for the math.

    backend: "torch" (the fast PyTorch path, the CPU default), "triton" (the CUDA default) or
    "reference" (the spec); None picks by device, dtype and rank.

    Shapes: x [M, d_in]; task_ids [M] in [-1, T) or a TaskRouting; gates [T, S+K] (or [M, S+K]
    with per_token_gates); shared_a [C, S*r, d_in]; shared_b [C, d_out, S*r]; task_a [T, K*r, d_in];
    task_b [T, d_out, K*r]; task_cluster [T] or None. Returns [M, d_out] (or `out` += delta).

    base: [M, d_out] the base layer's output (not with `out`): returns base + delta as a new
    tensor, differentiable in base (its gradient is dy). The Triton kernels write it in one pass
    (no zero-fill, no add after), which is what a training step wants; `out=` adds in place.

    A TaskRouting skips the id check (no host sync) and is reused across layers; on the Triton
    path a plain id tensor is checked, then routed per call. The kernels need only the routing's
    per-task segments, so a routing built with or without `task_cluster` gives the same result.
    """
    args = (x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
            dropout_p, out, backend, base)
    device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return _dispatch(*args)
    with torch.autocast(device, enabled=False):
        return _dispatch(*args)


def _dispatch(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
              dropout_p, out, backend, base):
    if isinstance(task_ids, TaskRouting) and isinstance(x, torch.Tensor) and task_ids.device != x.device:
        task_ids = task_ids.on(x.device)  # layers split over devices: one copy per device, cached
    chosen = resolve_backend(x, backend)
    if backend is None and chosen == "triton" and _rank_too_large(shared_a, task_a):
        chosen = "torch"  # beyond the kernels' register budget
    if chosen == "reference":
        if base is not None:
            _check_base(base, out, x, task_b)
        delta = reference.cgc_lora(
            x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
            task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, out=out,
        )
        return delta if base is None else base + delta.to(base.dtype)
    # Under torch.compile the checks run once, at trace time; the cache is for eager calls.
    key = None if torch.compiler.is_compiling() else _call_key(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
        dropout_p, out, base)
    if key is not None:
        key = (chosen, key)
    shp = _CHECKED.get(key) if key is not None else None
    if shp is None:  # not this call signature's first pass through every check below
        shp = _check_call(chosen, x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
                          per_token_gates, dropout_p, out, base)
        if key is not None:
            if len(_CHECKED) >= 1024:  # bounded: a server seeing many batch sizes
                _CHECKED.clear()
            _CHECKED[key] = shp
    if chosen == "torch":
        return autograd.run_torch(
            x, task_ids, gates.to(x.device), shared_a, shared_b, task_a, task_b, scaling, shp,
            task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, base=base, out=out,
        )
    routing = task_ids if isinstance(task_ids, TaskRouting) else _routing_of(task_ids, shp, task_cluster)
    return autograd.run_triton(x, routing, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
                               per_token_gates, dropout_p, out, base)


def _routing_of(task_ids: torch.Tensor, shp: CGCShapes, task_cluster: torch.Tensor | None) -> TaskRouting:
    """The routing of a checked plain id tensor, built once per tensor (every layer it is passed
    to reuses it); under torch.compile, built in the graph."""
    if torch.compiler.is_compiling():
        return build_routing(task_ids, shp.T, task_cluster, validate=False)
    cache = tensor_cache(task_ids)
    key = ("routing", id(task_cluster))
    entry = cache.get(key)
    if entry is None or entry[0] is not task_cluster:
        entry = cache[key] = (task_cluster, build_routing(task_ids, shp.T, task_cluster, validate=False))
    return entry[1]


def _check_call(chosen, x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
                per_token_gates, dropout_p, out, base) -> CGCShapes:
    """Every check of a call to the torch or triton backend; ValueError naming the problem."""
    if base is not None:
        _check_base(base, out, x, task_b)
    shp = check_cgc_lora_args(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
        task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, out=out,
    )
    if chosen == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise ValueError(f"x must be float16, bfloat16 or float32 for the Triton backend, got {x.dtype}")
        if not x.is_cuda and not common.INTERPRET:
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before cgc_kernels "
                             "is imported (Triton's interpreter); use a CUDA device or backend='torch'")
        if _rank_too_large(shared_a, task_a):
            raise ValueError(f"shared_a / task_a: stacked rank S*r = {shp.S * shp.r} or K*r = {shp.K * shp.r} "
                             f"exceeds the fused kernels' limit ({common.MAX_RANK_PAD} per side, padded to "
                             f"powers of two); use backend='torch'")
    if isinstance(task_ids, TaskRouting) and task_ids.device != x.device:
        raise ValueError(f"task_ids (routing) is on {task_ids.device} but x is on {x.device}")
    return shp


# Call signatures (every tensor's shape, dtype and device, and the other arguments) that passed
# validation with a TaskRouting, whose ids were checked when it was built: a model calls each
# layer with the same signature every step, so the checks run once per signature, not per call.
_CHECKED: dict[tuple, CGCShapes] = {}


def _meta(t):
    return None if t is None else (t.shape, t.dtype, t.device)


def _call_key(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
              dropout_p, out, base=None) -> tuple | None:
    """Hashable signature of a call with a TaskRouting (None: always check fully)."""
    tensors = (x, gates, shared_a, shared_b, task_a, task_b)
    if not isinstance(task_ids, TaskRouting) or not all(isinstance(t, torch.Tensor) for t in tensors) or not (
            isinstance(task_cluster, (torch.Tensor, type(None))) and isinstance(out, (torch.Tensor, type(None)))):
        return None
    return (tuple(_meta(t) for t in tensors), _meta(task_cluster), _meta(out), _meta(base), task_ids.num_rows,
            task_ids.num_tasks, task_ids.device, bool(per_token_gates), type(scaling), dropout_p)


def _check_base(base, out, x, task_b) -> None:
    if out is not None:
        raise ValueError("pass base= (returns base + delta) or out= (adds into out in place), not both")
    if not isinstance(base, torch.Tensor) or base.dim() != 2:
        raise ValueError(f"base must be a 2-D tensor [M, d_out], got {getattr(base, 'shape', type(base))}")
    want = (x.shape[0], task_b.shape[1]) if x.dim() == 2 and task_b.dim() == 3 else None
    if want is not None and tuple(base.shape) != want:
        raise ValueError(f"base must be [M, d_out] = {want}, got {tuple(base.shape)}")
    if not base.dtype.is_floating_point:
        raise ValueError(f"base must be a floating tensor, got {base.dtype}")
    if base.device != x.device:
        raise ValueError(f"base is on {base.device} but x is on {x.device}; all tensors must share a device")

