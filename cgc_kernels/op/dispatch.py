"""The public op `cgc_lora`: validates, then dispatches to a backend.

Backends: "torch" (the fast PyTorch backend, torch_backend.py: the CPU path), "triton" (fused
kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1) and "reference" (the readable spec,
autograd through plain PyTorch; tests and benchmarks). `backend=None` picks Triton for CUDA
tensors in fp16, bf16 or fp32 (stacked rank per side <= 128) and "torch" otherwise.

Every backend runs with autocast disabled: the caller (CGCLoRALinear) has already chosen the
compute dtype the way nn.Linear does under autocast, and the op's own casts must not be redone.

The Triton path reaches the kernel launchers two ways, with the same launches:

* eager (the common case): `_FusedCGCLoRA`, an autograd Function calling the launchers directly,
  or the forward launcher alone when no gradient is needed. Tens of microseconds of host time.
* under torch.compile (`torch.compiler.is_compiling()`): three `torch.library` custom ops, so
  `torch.compile(fullgraph=True)` traces through them (the dispatcher's per-call schema work is
  paid once, at trace time):

    cgc_kernels::lora_fwd          functional: (base + delta [M, d_out], z [M, (S+K) r] fp32)
    cgc_kernels::lora_fwd_inplace  out += delta in place; used when no gradient is needed
    cgc_kernels::lora_bwd          the gradients, from dy and the saved z (registered as lora_fwd's
                                   backward through `register_autograd`)

The kernels (op/triton/forward.py, backward.py) write every output row themselves:
with `base=` the functional op returns base + delta in one pass (nothing zero-filled before,
nothing added after; base's gradient is dy itself). Routing tensors are passed individually (a
custom op cannot take a dataclass), with the routing's tile size. With `out=` under autograd, the
delta is added into `out` by `out.add_`, so autograd passes the gradient of `out`'s producer
through unchanged; without autograd the kernel adds into `out` itself.

Validation runs on every call, except that a call with a TaskRouting whose signature (shapes,
dtypes, devices, arguments) passed before skips it (`_CHECKED`): a model calls each layer with
the same signature every step.

Dropout: the seed is a [1] int64 tensor drawn on x's device before the launch (an input of the
ops, saved for the backward, which regenerates the same mask); none is drawn at dropout_p == 0.
Every launch runs under x's device (`common.device_guard`).
"""

from __future__ import annotations

import functools

import torch

from . import reference, torch_backend
from .routing import TaskRouting, build_routing
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
    from .triton import backward

    return sum(pads) > backward.max_rank_size(dtype)


# ---- launches (shared by the eager path and the custom ops) ------------------------------------

Tensor = torch.Tensor


def _launch_forward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
                    tile_end, counts, tile_rows, seed, scaling, per_token_gates, dropout_p, *, base=None,
                    out=None):
    """Functional (out None): (base + delta, or the delta, [M, d_out]; z fp32), every row written
    by the kernels. In place: out += delta, returns (out, None)."""
    from .triton import forward

    with common.device_guard(x):
        if out is not None:
            return forward.cgc_lora_forward(
                x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
                tile_end, counts, tile_rows, scaling, per_token_gates, dropout_p, seed, base=out, out=out,
                save_z=False,
            )
        return forward.cgc_lora_forward(
            x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
            counts, tile_rows, scaling, per_token_gates, dropout_p, seed, base=base,
        )


def _launch_backward(dy, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                     tile_start, tile_end, counts, starts, z, seed, tile_rows, scaling, per_token_gates,
                     dropout_p, needs):
    """(dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b), None where not needed.
    needs = [x, gates, A (both sides), B (both sides)]."""
    from .triton import backward

    need_x, need_g, need_a, need_b = needs
    with common.device_guard(x):
        return backward.cgc_lora_backward(
            dy.contiguous(), x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
            tile_start, tile_end, counts, starts, tile_rows, z, scaling, per_token_gates, dropout_p, seed,
            need_x, need_g, need_a, need_b,
        )


def _needs(ctx) -> list[bool]:
    n_x, n_g, n_sa, n_sb, n_ta, n_tb = ctx.needs_input_grad[:6]
    return [n_x, n_g, n_sa or n_ta, n_sb or n_tb]


def _pick_grads(ctx, grads) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6], strict=True))


def _tail(ctx, dy) -> tuple:
    """Gradients of the inputs after the six differentiable ones: task_cluster, the six routing
    tensors, tile_rows, base (y = base + delta: its gradient is dy itself, no copy), seed,
    scaling, per_token_gates, dropout_p."""
    return (None,) * 8 + (dy if ctx.needs_input_grad[14] else None,) + (None,) * 4


# ---- eager path ------------------------------------------------------------------------------

class _FusedCGCLoRA(torch.autograd.Function):
    """The Triton path outside torch.compile: the launchers called directly (no dispatcher)."""

    @staticmethod
    def forward(ctx, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
                tile_end, counts, starts, tile_rows, base, seed, scaling, per_token_gates, dropout_p):
        y, z = _launch_forward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                               tile_start, tile_end, counts, tile_rows, seed, scaling, per_token_gates,
                               dropout_p, base=base)
        ctx.save_for_backward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                              tile_start, tile_end, counts, starts, z, seed)
        ctx.tile_rows, ctx.scaling = tile_rows, scaling
        ctx.per_token_gates, ctx.dropout_p = per_token_gates, dropout_p
        ctx.mark_non_differentiable(z)
        return y, z

    @staticmethod
    def backward(ctx, dy, _dz):
        needs = _needs(ctx)
        if not any(needs):
            return (None,) * 6 + _tail(ctx, dy)
        grads = _launch_backward(dy, *ctx.saved_tensors, ctx.tile_rows, ctx.scaling, ctx.per_token_gates,
                                 ctx.dropout_p, needs)
        return _pick_grads(ctx, grads) + _tail(ctx, dy)


# ---- custom ops (torch.compile) --------------------------------------------------------------

@torch.library.custom_op("cgc_kernels::lora_fwd", mutates_args=())
def _lora_fwd(
    x: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor, task_b: Tensor,
    task_cluster: Tensor | None, order: Tensor, tile_task: Tensor, tile_start: Tensor, tile_end: Tensor,
    counts: Tensor, starts: Tensor, tile_rows: int, base: Tensor | None, seed: Tensor | None, scaling: float,
    per_token_gates: bool, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    return _launch_forward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                           tile_start, tile_end, counts, tile_rows, seed, scaling, per_token_gates, dropout_p,
                           base=base)


@_lora_fwd.register_fake
def _(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
      counts, starts, tile_rows, base, seed, scaling, per_token_gates, dropout_p):
    M = x.shape[0]
    return (x.new_empty(M, task_b.shape[1], dtype=base.dtype if base is not None else x.dtype),
            x.new_empty(M, shared_a.shape[1] + task_a.shape[1], dtype=torch.float32))


@torch.library.custom_op("cgc_kernels::lora_fwd_inplace", mutates_args=("out",))
def _lora_fwd_inplace(
    out: Tensor, x: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor,
    task_b: Tensor, task_cluster: Tensor | None, order: Tensor, tile_task: Tensor, tile_start: Tensor,
    tile_end: Tensor, counts: Tensor, tile_rows: int, seed: Tensor | None, scaling: float, per_token_gates: bool,
    dropout_p: float,
) -> None:
    _launch_forward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
                    tile_end, counts, tile_rows, seed, scaling, per_token_gates, dropout_p, out=out)


@_lora_fwd_inplace.register_fake
def _(out, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
      tile_end, counts, tile_rows, seed, scaling, per_token_gates, dropout_p):
    return None


@torch.library.custom_op("cgc_kernels::lora_bwd", mutates_args=())
def _lora_bwd(
    dy: Tensor, x: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor,
    task_b: Tensor, task_cluster: Tensor | None, order: Tensor, tile_task: Tensor, tile_start: Tensor,
    tile_end: Tensor, counts: Tensor, starts: Tensor, z: Tensor, seed: Tensor | None, tile_rows: int,
    scaling: float, per_token_gates: bool, dropout_p: float, needs: list[bool],
) -> list[Tensor]:
    """[dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b]; an unneeded gradient is an empty tensor."""
    grads = _launch_backward(dy, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                             tile_start, tile_end, counts, starts, z, seed, tile_rows, scaling, per_token_gates,
                             dropout_p, needs)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_lora_bwd.register_fake
def _(dy, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
      tile_end, counts, starts, z, seed, tile_rows, scaling, per_token_gates, dropout_p, needs):
    need_x, need_g, need_a, need_b = needs
    like = lambda t, need: torch.empty_like(t) if need else x.new_empty(0)
    return [like(x, need_x), like(gates, need_g), like(shared_a, need_a), like(shared_b, need_b),
            like(task_a, need_a), like(task_b, need_b)]


def _setup_context(ctx, inputs, output):
    (x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
     counts, starts, tile_rows, base, seed, scaling, per_token_gates, dropout_p) = inputs
    _, z = output
    ctx.save_for_backward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                          tile_start, tile_end, counts, starts, z, seed)
    ctx.tile_rows, ctx.scaling = tile_rows, scaling
    ctx.per_token_gates, ctx.dropout_p = per_token_gates, dropout_p


def _backward(ctx, dy, _dz):
    needs = _needs(ctx)
    if not any(needs):
        return (None,) * 6 + _tail(ctx, dy)
    grads = torch.ops.cgc_kernels.lora_bwd(dy, *ctx.saved_tensors, ctx.tile_rows, ctx.scaling,
                                           ctx.per_token_gates, ctx.dropout_p, needs)
    return _pick_grads(ctx, grads) + _tail(ctx, dy)


_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


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
        return torch_backend.cgc_lora_torch(
            x, task_ids, gates.to(x.device), shared_a, shared_b, task_a, task_b, scaling,
            task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, base=base, out=out,
        )
    return _launch(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster,
                   per_token_gates, dropout_p, out, shp, base)


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


def _launch(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
            dropout_p, out, shp: CGCShapes, base: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of a checked call: eager launches, or the custom ops under torch.compile."""
    if isinstance(task_ids, TaskRouting):
        routing = task_ids
    else:
        routing = build_routing(task_ids, shp.T, task_cluster, validate=False)
    rt = (routing.order, routing.tile_task, routing.tile_start, routing.tile_end)
    seed = common.new_dropout_seed(x.device) if dropout_p > 0 else None
    args = (float(scaling), bool(per_token_gates), float(dropout_p))

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gates, shared_a, shared_b, task_a, task_b, out, base) if t is not None)
    compiling = torch.compiler.is_compiling()
    if not needs_grad and out is not None:
        if compiling:
            torch.ops.cgc_kernels.lora_fwd_inplace(
                out, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, *rt, routing.counts,
                routing.block_m, seed, *args)
        else:
            _launch_forward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, *rt, routing.counts,
                            routing.block_m, seed, *args, out=out)
        return out
    # The functional op writes every row of a new tensor: base + delta, or the delta alone.
    fn = torch.ops.cgc_kernels.lora_fwd if compiling else _FusedCGCLoRA.apply
    y, _ = fn(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, *rt, routing.counts, routing.starts,
              routing.block_m, base, seed, *args)
    if out is None:
        return y
    return out.add_(y)


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

