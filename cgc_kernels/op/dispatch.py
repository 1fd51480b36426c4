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
import importlib.util

import torch

from . import autograd, reference
from .routing import TaskRouting, build_routing, tensor_cache
from .triton import common
from .validation import CGCCall, CGCShapes, check_call

BACKENDS = ("torch", "triton", "reference")
# Not a requirement of the package: torch's CUDA builds bring it; pip's [triton] extra on CPU.
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    """The backend a call on `x` runs: the one asked for, or the device's default."""
    if backend is None:
        return "triton" if x.is_cuda and x.dtype in TRITON_DTYPES and HAS_TRITON else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def _rank_too_large(shared_a: torch.Tensor, task_a: torch.Tensor) -> bool:
    """Beyond the kernels' register budget: a side's padded stacked rank over MAX_RANK_PAD, or both
    sides' together over the largest tier of this dtype (backward.max_rank_size)."""
    return _rank_too_large_for(shared_a.shape[1], task_a.shape[1], shared_a.dtype)


@functools.lru_cache(maxsize=256)  # per call otherwise: an import and a dict merge on the hot path
def _rank_too_large_for(rs: int, rk: int, dtype: torch.dtype) -> bool:
    pads = [common.rank_pad(n) for n in (rs, rk) if n > 0]
    if max(pads, default=0) > common.MAX_RANK_PAD:
        return True
    from .triton import backward

    return sum(pads) > backward.max_rank_size(dtype)


# ---- public op -------------------------------------------------------------------------------

def cgc_lora(x: torch.Tensor, task_ids: torch.Tensor | TaskRouting, gates: torch.Tensor, shared_a: torch.Tensor,
             shared_b: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor, scaling: float, *,
             task_cluster: torch.Tensor | None = None, per_token_gates: bool = False, dropout_p: float = 0.0,
             out: torch.Tensor | None = None, backend: str | None = None,
             base: torch.Tensor | None = None) -> torch.Tensor:
    """CGC-LoRA delta for a mixed-task batch; see `cgc_kernels.reference.cgc_lora` for the math.

    backend: "torch" (the fast PyTorch path, the CPU default), "triton" (the CUDA default) or
    "reference" (the spec); None picks by device, dtype and rank.

    Shapes: x [M, d_in]; task_ids [M] in [-1, T) or a TaskRouting; gates [T, S+K] (or [M, S+K]
    with per_token_gates); shared_a [C, S*r, d_in]; shared_b [C, d_out, S*r]; task_a [T, K*r, d_in];
    task_b [T, d_out, K*r]; task_cluster [T] or None. Returns [M, d_out] (or `out` += delta).

    base: [M, d_out] the base layer's output (not with `out`): returns base + delta as a new
    tensor, differentiable in base (its gradient is dy). The Triton kernels write it in one pass
    (no zero-fill, no add after), which is what a training step wants; `out=` adds in place.

    A TaskRouting skips the id check (no host sync) and is reused across layers; a plain id tensor
    is checked (and, on the Triton path, routed) once per tensor, on its first call. The kernels need only the routing's
    per-task segments, so a routing built with or without `task_cluster` gives the same result.
    """
    call = CGCCall(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
                   dropout_p, out, base)
    device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return _dispatch(call, backend)
    with torch.autocast(device, enabled=False):
        return _dispatch(call, backend)


def _dispatch(call: CGCCall, backend: str | None) -> torch.Tensor:
    x, task_ids = call.x, call.task_ids
    if isinstance(task_ids, TaskRouting) and isinstance(x, torch.Tensor) and task_ids.device != x.device:
        call = call._replace(task_ids=task_ids.on(x.device))  # layers split over devices: a copy per device
    chosen = resolve_backend(x, backend)
    if backend is None and chosen == "triton" and _rank_too_large(call.shared_a, call.task_a):
        chosen = "torch"  # beyond the kernels' register budget
    if chosen == "reference":
        if call.base is not None:
            _check_base(call)
        delta = reference.cgc_lora(*call[:8], task_cluster=call.task_cluster, per_token_gates=call.per_token_gates,
                                   dropout_p=call.dropout_p, out=call.out)
        return delta if call.base is None else call.base + delta.to(call.base.dtype)
    # Under torch.compile the checks run once, at trace time; the cache is for eager calls.
    key = None if torch.compiler.is_compiling() else _call_key(call)
    if key is not None:
        key = (chosen, key)
    shp = _CHECKED.get(key) if key is not None else None
    if shp is None:  # not this call signature's first pass through every check below
        shp = _check_call(chosen, call)
        if key is not None:
            if len(_CHECKED) >= 1024:  # bounded: a server seeing many batch sizes
                _CHECKED.clear()
            _CHECKED[key] = shp
    if chosen == "torch":
        return autograd.run_torch(call._replace(gates=call.gates.to(x.device)), shp)
    task_ids = call.task_ids
    routing = task_ids if isinstance(task_ids, TaskRouting) else _routing_of(task_ids, shp, call.task_cluster)
    return autograd.run_triton(call, routing)


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


def _check_call(chosen: str, call: CGCCall) -> CGCShapes:
    """Every check of a call to the torch or triton backend; ValueError naming the problem."""
    x = call.x
    if call.base is not None:
        _check_base(call)
    shp = check_call(call)
    if chosen == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package: pip install 'cgc_kernels[triton]' "
                             "(torch's CUDA builds bring it), or use backend='torch'")
        if x.dtype not in TRITON_DTYPES:
            raise ValueError(f"x must be float16, bfloat16 or float32 for the Triton backend, got {x.dtype}")
        if not x.is_cuda and not common.INTERPRET:
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before cgc_kernels "
                             "is imported (Triton's interpreter); use a CUDA device or backend='torch'")
        if _rank_too_large(call.shared_a, call.task_a):
            from .triton import backward

            raise ValueError(f"shared_a / task_a: stacked rank S*r = {shp.S * shp.r} or K*r = {shp.K * shp.r} "
                             f"exceeds the fused kernels' limit ({common.MAX_RANK_PAD} per side and "
                             f"{backward.max_rank_size(x.dtype)} for both sides in {x.dtype}, each side padded "
                             f"to a power of two); use backend='torch'")
    if isinstance(call.task_ids, TaskRouting) and call.task_ids.device != x.device:
        raise ValueError(f"task_ids (routing) is on {call.task_ids.device} but x is on {x.device}")
    return shp


# Call signatures (every tensor's shape, dtype and device, and the other arguments) that passed
# validation with a TaskRouting, whose ids were checked when it was built: a model calls each
# layer with the same signature every step, so the checks run once per signature, not per call.
_CHECKED: dict[tuple, CGCShapes] = {}


def _meta(t):
    return None if t is None else (t.shape, t.dtype, t.device)


def _call_key(call: CGCCall) -> tuple | None:
    """Hashable signature of a call with a TaskRouting (None: always check fully)."""
    tensors = (call.x, call.gates, call.shared_a, call.shared_b, call.task_a, call.task_b)
    if not isinstance(call.task_ids, TaskRouting) or not all(isinstance(t, torch.Tensor) for t in tensors) or not (
            isinstance(call.task_cluster, (torch.Tensor, type(None)))
            and isinstance(call.out, (torch.Tensor, type(None)))):
        return None
    rt = call.task_ids
    return (tuple(_meta(t) for t in tensors), _meta(call.task_cluster), _meta(call.out), _meta(call.base),
            rt.num_rows, rt.num_tasks, rt.device, bool(call.per_token_gates), type(call.scaling), call.dropout_p)


def _check_base(call: CGCCall) -> None:
    base, x, task_b = call.base, call.x, call.task_b
    if call.out is not None:
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
