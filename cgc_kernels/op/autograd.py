"""Autograd and torch.library registration of `cgc_lora`'s two fast backends; the math lives in
op/triton/ (the fused kernels' launchers) and torch_backend.py, backend choice and validation in
dispatch.py.

Each backend reaches its math two ways, with the same launches:

* eager (the common case): an autograd Function calling the math directly, or the forward alone
  when no gradient is needed. Tens of microseconds of host time per layer call.
* under torch.compile (`torch.compiler.is_compiling()`): `torch.library` custom ops, so
  `torch.compile(fullgraph=True)` traces through them (the dispatcher's per-call schema work is paid
  once, at trace time):

    cgc_kernels::lora_fwd          Triton, functional: (base + delta [M, d_out], z [M, (S+K) r] fp32)
    cgc_kernels::lora_fwd_inplace  Triton, out += delta in place; used when no gradient is needed
    cgc_kernels::lora_bwd          Triton, the gradients from dy and the saved z (lora_fwd's backward)
    cgc_kernels::torch_fwd         PyTorch backend: (y, dropout keep-mask); opaque to the compiler, so
                                   the graph has fixed shapes whatever the task mix
    cgc_kernels::torch_bwd         PyTorch backend: the gradients (recomputes the forward from x and
                                   the mask: the compiled graph saves only its inputs)

The Triton kernels take the routing's tensors one by one (a custom op cannot take a dataclass):
`KernelArgs` names them, `kernel_args` builds them from a TaskRouting in one place, and the ops'
schemas are written from its fields. With `base=` the functional op returns base + delta in one
pass (base's gradient is dy itself). Dropout: the seed is a [1] int64 tensor drawn on x's device
before the launch (an input of the ops, saved for the backward, which regenerates the same mask).
Every launch runs under x's device (`common.device_guard`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, get_type_hints

import torch

from . import torch_backend
from .routing import TaskRouting, host_list
from .torch_backend import RowPlan
from .triton import common
from .validation import CGCCall, CGCShapes, shapes_of

Tensor = torch.Tensor

# The differentiable inputs, in the order of the gradients the backward math returns.
DIFF = ("x", "gates", "shared_a", "shared_b", "task_a", "task_b")


class KernelArgs(NamedTuple):
    """Everything a fused launch takes but dy / z / base / out: the inputs, the routing's tensors
    and tile size, the dropout seed and the call's scalars."""

    x: Tensor
    gates: Tensor
    shared_a: Tensor
    shared_b: Tensor
    task_a: Tensor
    task_b: Tensor
    task_cluster: Optional[Tensor]  # noqa: UP045 (typing.get_type_hints reads it for the op schema)
    order: Tensor
    tile_task: Tensor
    tile_start: Tensor
    tile_end: Tensor
    counts: Tensor
    starts: Tensor
    tile_rows: int
    seed: Optional[Tensor]  # noqa: UP045
    scaling: float
    per_token_gates: bool
    dropout_p: float


def kernel_args(call: CGCCall, routing: TaskRouting, seed: Tensor | None) -> KernelArgs:
    """A call's KernelArgs from its routing (the one place a routing is unpacked for the kernels)."""
    return KernelArgs(call.x, call.gates, call.shared_a, call.shared_b, call.task_a, call.task_b, call.task_cluster,
                      routing.order, routing.tile_task, routing.tile_start, routing.tile_end, routing.counts,
                      routing.starts, routing.tile_rows, seed, float(call.scaling), bool(call.per_token_gates),
                      float(call.dropout_p))


_SCHEMA_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", int: "SymInt", float: "float", bool: "bool"}  # noqa: UP045
KERNEL_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[t]} {name}" for name, t in get_type_hints(KernelArgs).items())
N_KERNEL = len(KernelArgs._fields)
# lora_fwd's inputs and the Function's: the kernel arguments, then base.
FWD_INPUTS = (*KernelArgs._fields, "base")
_CONSTS = ("tile_rows", "scaling", "per_token_gates", "dropout_p")
_TENSORS = tuple(f for f in KernelArgs._fields if f not in _CONSTS)


# ---- Triton launches (shared by the eager path and the custom ops) -----------------------------

def launch_forward(a: KernelArgs, *, base: Tensor | None = None, out: Tensor | None = None):
    """Functional (out None): (base + delta, or the delta, [M, d_out]; z fp32), every row written
    by the kernels. In place: out += delta, returns (out, None)."""
    from .triton import forward

    with common.device_guard(a.x):
        return forward.cgc_lora_forward(
            a.x, a.gates, a.shared_a, a.shared_b, a.task_a, a.task_b, a.task_cluster, a.order, a.tile_task,
            a.tile_start, a.tile_end, a.counts, a.tile_rows, a.scaling, a.per_token_gates, a.dropout_p, a.seed,
            base=out if out is not None else base, out=out, save_z=out is None,
        )


def launch_backward(dy: Tensor, a: KernelArgs, z: Tensor, needs: list[bool]):
    """(dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b), None where not needed.
    needs = [x, gates, A (both sides), B (both sides)]."""
    from .triton import backward

    with common.device_guard(a.x):
        return backward.cgc_lora_backward(
            dy.contiguous(), a.x, a.gates, a.shared_a, a.shared_b, a.task_a, a.task_b, a.task_cluster, a.order,
            a.tile_task, a.tile_start, a.tile_end, a.counts, a.starts, a.tile_rows, z, a.scaling,
            a.per_token_gates, a.dropout_p, a.seed, *needs,
        )


def _save(ctx, a: KernelArgs, z: Tensor) -> None:
    ctx.save_for_backward(*(getattr(a, f) for f in _TENSORS), z)
    ctx.consts = {f: getattr(a, f) for f in _CONSTS}


def _saved(ctx) -> tuple[KernelArgs, Tensor]:
    *tensors, z = ctx.saved_tensors
    return KernelArgs(**dict(zip(_TENSORS, tensors, strict=True)), **ctx.consts), z


def _weight_needs(need: dict) -> list[bool]:
    """[x, gates, A (both sides), B (both sides)]: what the backward math computes."""
    return [need["x"], need["gates"], need["shared_a"] or need["task_a"], need["shared_b"] or need["task_b"]]


def _fused_backward(ctx, dy: Tensor, launch) -> tuple:
    """Gradients of FWD_INPUTS: the six from `launch(dy, args, z, needs)`, base's is dy itself."""
    need = dict(zip(FWD_INPUTS, ctx.needs_input_grad, strict=True))
    grads = {"base": dy}
    needs = _weight_needs(need)
    if any(needs):
        a, z = _saved(ctx)
        grads.update(zip(DIFF, launch(dy, a, z, needs), strict=True))
    return tuple(grads.get(name) if need[name] else None for name in FWD_INPUTS)


class FusedCGCLoRA(torch.autograd.Function):
    """The Triton path outside torch.compile: the launchers called directly (no dispatcher).
    apply(*KernelArgs, base) -> (y, z)."""

    @staticmethod
    def forward(ctx, *inputs):
        a, base = KernelArgs(*inputs[:N_KERNEL]), inputs[N_KERNEL]
        y, z = launch_forward(a, base=base)
        _save(ctx, a, z)
        ctx.mark_non_differentiable(z)
        return y, z

    @staticmethod
    def backward(ctx, dy, _dz):
        return _fused_backward(ctx, dy, launch_backward)


# ---- Triton custom ops (torch.compile) ---------------------------------------------------------

@torch.library.custom_op("cgc_kernels::lora_fwd", mutates_args=(),
                         schema=f"({KERNEL_SCHEMA}, Tensor? base) -> (Tensor, Tensor)")
def _lora_fwd(*inputs):
    return launch_forward(KernelArgs(*inputs[:N_KERNEL]), base=inputs[N_KERNEL])


@_lora_fwd.register_fake
def _(*inputs):
    a = KernelArgs(*inputs[:N_KERNEL])
    M = a.x.shape[0]
    return (a.x.new_empty(M, a.task_b.shape[1]),  # x's dtype, as the kernel writes base + delta
            a.x.new_empty(M, a.shared_a.shape[1] + a.task_a.shape[1], dtype=torch.float32))


@torch.library.custom_op("cgc_kernels::lora_fwd_inplace", mutates_args=("out",),
                         schema=f"(Tensor(a!) out, {KERNEL_SCHEMA}) -> ()")
def _lora_fwd_inplace(out, *inputs):
    launch_forward(KernelArgs(*inputs), out=out)


@_lora_fwd_inplace.register_fake
def _(out, *inputs):
    return None


@torch.library.custom_op("cgc_kernels::lora_bwd", mutates_args=(),
                         schema=f"(Tensor dy, {KERNEL_SCHEMA}, Tensor z, bool[] needs) -> Tensor[]")
def _lora_bwd(dy, *inputs):
    """[dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b]; an unneeded gradient is an empty tensor."""
    a, z, needs = KernelArgs(*inputs[:N_KERNEL]), inputs[N_KERNEL], inputs[N_KERNEL + 1]
    grads = launch_backward(dy, a, z, needs)
    return [g if g is not None else a.x.new_empty(0) for g in grads]


def _empty_grads(like: tuple[Tensor, ...], needs) -> list[Tensor]:
    """Fake gradients of DIFF's tensors `like`: shaped like each where needed, else empty."""
    need_x, need_g, need_a, need_b = needs
    return [torch.empty_like(t) if need else like[0].new_empty(0)
            for t, need in zip(like, (need_x, need_g, need_a, need_b, need_a, need_b), strict=True)]


@_lora_bwd.register_fake
def _(dy, *inputs):
    return _empty_grads(inputs[:6], inputs[N_KERNEL + 1])


def _lora_setup_context(ctx, inputs, output):
    _save(ctx, KernelArgs(*inputs[:N_KERNEL]), output[1])


def _lora_backward(ctx, dy, _dz):
    return _fused_backward(ctx, dy, lambda dy, a, z, needs: torch.ops.cgc_kernels.lora_bwd(dy, *a, z, needs))


_lora_fwd.register_autograd(_lora_backward, setup_context=_lora_setup_context)


def run_triton(call: CGCCall, routing: TaskRouting) -> Tensor:
    """The Triton path of a checked call: eager launches, or the custom ops under torch.compile."""
    x, out, base = call.x, call.out, call.base
    seed = common.new_dropout_seed(x.device) if call.dropout_p > 0 else None
    a = kernel_args(call, routing, seed)
    needs_grad = _needs_grad(call)
    compiling = torch.compiler.is_compiling()
    if not needs_grad and out is not None:
        if compiling:
            torch.ops.cgc_kernels.lora_fwd_inplace(out, *a)
        else:
            launch_forward(a, out=out)
        return out
    # The functional op writes every row of a new tensor: base + delta, or the delta alone.
    fn = torch.ops.cgc_kernels.lora_fwd if compiling else FusedCGCLoRA.apply
    y, _ = fn(*a, base)
    return y if out is None else out.add_(y)


# ---- the PyTorch backend ----------------------------------------------------------------------

# TorchCGCLoRA's inputs, in apply's order.
TORCH_INPUTS = (*DIFF, "base", "plan", "shapes", "scaling", "per_token", "dropout_p")


class TorchCGCLoRA(torch.autograd.Function):
    """Eager autograd for the PyTorch backend: forward_call (base + delta when a base is given), and
    backward_call as its hand-written backward."""

    @staticmethod
    def forward(ctx, x, gates, shared_a, shared_b, task_a, task_b, base, plan: RowPlan, shp: CGCShapes, scaling,
                per_token, dropout_p):
        y, saved = torch_backend.forward_call(x, plan, shp, gates, shared_a, shared_b, task_a, task_b, scaling,
                                              per_token, dropout_p, base=base)
        ctx.plan, ctx.shp, ctx.scaling, ctx.per_token, ctx.dropout_p = plan, shp, scaling, per_token, dropout_p
        ctx.dense = saved.dense
        tensors = saved[:-1]
        ctx.has = [t is not None for t in tensors]
        ctx.save_for_backward(gates, *[t for t in tensors if t is not None])
        return y

    @staticmethod
    def backward(ctx, dy):
        gates, *rest = ctx.saved_tensors
        it = iter(rest)
        saved = torch_backend.SavedForward(*[next(it) if has else None for has in ctx.has], ctx.dense)
        need = dict(zip(TORCH_INPUTS, ctx.needs_input_grad, strict=True))
        grads = dict(zip(DIFF, torch_backend.backward_call(dy, ctx.plan, ctx.shp, saved, gates, ctx.scaling,
                                                            ctx.per_token, ctx.dropout_p, _weight_needs(need)),
                         strict=True), base=dy)
        return tuple(grads.get(name) if need[name] else None for name in TORCH_INPUTS)


def _op_plan(ids: Tensor, task_cluster: Tensor | None) -> RowPlan:
    return torch_backend.plan_rows(ids, None, None if task_cluster is None else host_list(task_cluster))


@torch.library.custom_op("cgc_kernels::torch_fwd", mutates_args=())
def _torch_fwd(x: Tensor, ids: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor,
               task_b: Tensor, task_cluster: Tensor | None, scaling: float, per_token_gates: bool,
               dropout_p: float) -> tuple[Tensor, Tensor]:
    """(y [M, d_out], keep-mask [M, d_in] bool, empty without dropout)."""
    y, saved = torch_backend.forward_call(x, _op_plan(ids, task_cluster), shapes_of(x, gates, shared_a, task_a, task_b),
                                          gates, shared_a, shared_b, task_a, task_b, scaling, per_token_gates,
                                          dropout_p)
    return y, saved.mask if saved.mask is not None else x.new_empty(0, dtype=torch.bool)


@_torch_fwd.register_fake
def _(x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, scaling, per_token_gates, dropout_p):
    mask = x.new_empty(x.shape, dtype=torch.bool) if dropout_p > 0 else x.new_empty(0, dtype=torch.bool)
    return x.new_empty(x.shape[0], task_b.shape[1]), mask


@torch.library.custom_op("cgc_kernels::torch_bwd", mutates_args=())
def _torch_bwd(dy: Tensor, x: Tensor, ids: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor,
               task_a: Tensor, task_b: Tensor, task_cluster: Tensor | None, mask: Tensor, scaling: float,
               per_token_gates: bool, dropout_p: float, needs: list[bool]) -> list[Tensor]:
    """[dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b]; an unneeded one is an empty tensor.
    The forward is recomputed from x and the mask (the compiled graph saves only its inputs)."""
    plan, shp = _op_plan(ids, task_cluster), shapes_of(x, gates, shared_a, task_a, task_b)
    _, saved = torch_backend.forward_call(x, plan, shp, gates, shared_a, shared_b, task_a, task_b, scaling,
                                          per_token_gates, dropout_p, mask=mask if dropout_p > 0 else None)
    grads = torch_backend.backward_call(dy, plan, shp, saved, gates, scaling, per_token_gates, dropout_p, needs)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_torch_bwd.register_fake
def _(dy, x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, mask, scaling, per_token_gates,
      dropout_p, needs):
    return _empty_grads((x, gates, shared_a, shared_b, task_a, task_b), needs)


# torch_fwd's inputs, in order.
TORCH_OP_INPUTS = ("x", "ids", "gates", "shared_a", "shared_b", "task_a", "task_b", "task_cluster", "scaling",
                   "per_token_gates", "dropout_p")


def _torch_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], output[1])  # the tensors (through task_cluster), the mask
    ctx.scaling, ctx.per_token, ctx.dropout_p = inputs[8:]


def _torch_backward(ctx, dy, _dmask):
    *tensors, mask = ctx.saved_tensors
    need = dict(zip(TORCH_OP_INPUTS, ctx.needs_input_grad, strict=True))
    needs = _weight_needs(need)
    grads = {}
    if any(needs):
        grads = dict(zip(DIFF, torch.ops.cgc_kernels.torch_bwd(dy, *tensors, mask, ctx.scaling, ctx.per_token,
                                                               ctx.dropout_p, needs), strict=True))
    return tuple(grads.get(name) if need[name] else None for name in TORCH_OP_INPUTS)


_torch_fwd.register_autograd(_torch_backward, setup_context=_torch_setup_context)


def _needs_grad(call: CGCCall) -> bool:
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in (call.x, *call[2:7], call.out, call.base) if isinstance(t, Tensor))


def run_torch(call: CGCCall, shp: CGCShapes) -> Tensor:
    """The PyTorch backend on a checked call: the delta [M, d_out]; base + delta with `base`
    (differentiable in base), or `out` += delta in place (returns out)."""
    x, task_ids, gates, shared_a, shared_b, task_a, task_b, _, task_cluster, _, _, out, base = call
    ids = (task_ids.task_ids if isinstance(task_ids, TaskRouting) else task_ids).to(torch.int64)
    scalars = (float(call.scaling), bool(call.per_token_gates), float(call.dropout_p))
    if torch.compiler.is_compiling():
        y, _ = torch.ops.cgc_kernels.torch_fwd(x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster,
                                               *scalars)
        return torch_backend.add_to(y, base, out)
    plan = torch_backend.plan_for(task_ids, ids, task_cluster)
    if not _needs_grad(call._replace(out=None)):
        return torch_backend.forward_call(x, plan, shp, gates, shared_a, shared_b, task_a, task_b, *scalars,
                                          base=base, out=out)[0]
    experts = (x, gates, shared_a, shared_b, task_a, task_b)
    if out is not None:  # in place under autograd: the delta through the Function, then added
        return out.add_(TorchCGCLoRA.apply(*experts, None, plan, shp, *scalars).to(out.dtype))
    return TorchCGCLoRA.apply(*experts, base, plan, shp, *scalars)
