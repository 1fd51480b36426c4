"""The public op `cgc_lora`: validates, then dispatches to a backend.

Backends: "torch" (the fast PyTorch backend, torch_backend.py: the CPU path), "triton" (fused
kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1) and "reference" (the readable spec,
autograd through plain PyTorch; tests and benchmarks). `backend=None` picks Triton for CUDA
tensors in fp16, bf16 or fp32 (stacked rank per side <= 128) and "torch" otherwise.

Every backend runs with autocast disabled: the caller (CGCLoRALinear) has already chosen the
compute dtype the way nn.Linear does under autocast, and the op's own casts must not be redone.

The Triton path is three `torch.library` custom ops, so `torch.compile(fullgraph=True)` traces
through them:

    cgc_kernels::lora_fwd          functional: (delta [M, d_out], z [M, (S+K) r] fp32, seed [1] cpu)
    cgc_kernels::lora_fwd_inplace  out += delta in place; used when no gradient is needed
    cgc_kernels::lora_bwd          the gradients, from dy and the saved z (registered as lora_fwd's
                                   backward through `register_autograd`)

Routing tensors are passed individually (a custom op cannot take a dataclass). With `out=` under
autograd, the functional op's delta is added into `out` by `out.add_`, so autograd passes the
gradient of `out`'s producer through unchanged; without autograd the kernel adds into `out` itself.
The dropout seed is drawn inside lora_fwd from torch's CPU generator and returned as a CPU tensor,
so the backward regenerates the same mask (nothing else is stored).
"""

from __future__ import annotations

import torch

from . import reference, torch_backend
from .routing import TaskRouting, build_routing
from .triton import common
from .validation import check_cgc_lora_args

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
    return max(common.rank_pad(shared_a.shape[1]), common.rank_pad(task_a.shape[1])) > common.MAX_RANK_PAD


# ---- custom ops ------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("cgc_kernels::lora_fwd", mutates_args=())
def _lora_fwd(
    x: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor, task_b: Tensor,
    task_cluster: Tensor | None, order: Tensor, tile_task: Tensor, tile_start: Tensor, tile_end: Tensor,
    counts: Tensor, starts: Tensor, scaling: float, per_token_gates: bool, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton import dropout, forward

    seed = dropout.new_seed() if dropout_p > 0 else 0
    y = torch.zeros(x.shape[0], task_b.shape[1], dtype=x.dtype, device=x.device)  # task -1 rows: 0
    z = forward.cgc_lora_forward(
        x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
        scaling, per_token_gates, dropout_p, seed, y=y,
    )
    return y, z, torch.tensor([seed], dtype=torch.int64)


@_lora_fwd.register_fake
def _(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
      counts, starts, scaling, per_token_gates, dropout_p):
    M = x.shape[0]
    return (
        x.new_empty(M, task_b.shape[1]),
        x.new_empty(M, shared_a.shape[1] + task_a.shape[1], dtype=torch.float32),
        torch.empty(1, dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("cgc_kernels::lora_fwd_inplace", mutates_args=("out",))
def _lora_fwd_inplace(
    out: Tensor, x: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor,
    task_b: Tensor, task_cluster: Tensor | None, order: Tensor, tile_task: Tensor, tile_start: Tensor,
    tile_end: Tensor, scaling: float, per_token_gates: bool, dropout_p: float,
) -> None:
    from .triton import dropout, forward

    seed = dropout.new_seed() if dropout_p > 0 else 0
    forward.cgc_lora_forward(
        x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
        scaling, per_token_gates, dropout_p, seed, y=out, base=out, save_z=False,
    )


@_lora_fwd_inplace.register_fake
def _(out, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
      tile_end, scaling, per_token_gates, dropout_p):
    return None


@torch.library.custom_op("cgc_kernels::lora_bwd", mutates_args=())
def _lora_bwd(
    dy: Tensor, x: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor,
    task_b: Tensor, task_cluster: Tensor | None, order: Tensor, tile_task: Tensor, tile_start: Tensor,
    tile_end: Tensor, counts: Tensor, starts: Tensor, z: Tensor, seed: Tensor, scaling: float,
    per_token_gates: bool, dropout_p: float, needs: list[bool],
) -> list[Tensor]:
    """[dx, dgates, dshared_a, dshared_b, dtask_a, dtask_b]; an unneeded gradient is an empty tensor.
    needs = [x, gates, A (both sides), B (both sides)]."""
    from .triton import backward

    need_x, need_g, need_a, need_b = needs
    grads = backward.cgc_lora_backward(
        dy, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
        tile_end, counts, starts, z, scaling, per_token_gates, dropout_p, int(seed[0]),
        need_x=need_x, need_gates=need_g, need_a=need_a, need_b=need_b,
    )
    return [g if g is not None else x.new_empty(0) for g in grads]


@_lora_bwd.register_fake
def _(dy, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start,
      tile_end, counts, starts, z, seed, scaling, per_token_gates, dropout_p, needs):
    need_x, need_g, need_a, need_b = needs
    like = lambda t, need: torch.empty_like(t) if need else x.new_empty(0)
    return [like(x, need_x), like(gates, need_g), like(shared_a, need_a), like(shared_b, need_b),
            like(task_a, need_a), like(task_b, need_b)]


def _setup_context(ctx, inputs, output):
    (x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task, tile_start, tile_end,
     counts, starts, scaling, per_token_gates, dropout_p) = inputs
    _, z, seed = output
    ctx.save_for_backward(x, gates, shared_a, shared_b, task_a, task_b, task_cluster, order, tile_task,
                          tile_start, tile_end, counts, starts, z, seed)
    ctx.scaling, ctx.per_token_gates, ctx.dropout_p = scaling, per_token_gates, dropout_p


def _backward(ctx, dy, _dz, _dseed):
    n_x, n_g, n_sa, n_sb, n_ta, n_tb = ctx.needs_input_grad[:6]
    needs = [n_x, n_g, n_sa or n_ta, n_sb or n_tb]
    none_after = [None] * 10  # task_cluster, routing tensors, scaling, per_token_gates, dropout_p
    if not any(needs):
        return (None,) * 6 + tuple(none_after)
    saved = ctx.saved_tensors
    dx, dg, dsa, dsb, dta, dtb = torch.ops.cgc_kernels.lora_bwd(
        dy, *saved, ctx.scaling, ctx.per_token_gates, ctx.dropout_p, needs,
    )
    pick = lambda g, need: g if need else None
    return (pick(dx, n_x), pick(dg, n_g), pick(dsa, n_sa), pick(dsb, n_sb), pick(dta, n_ta),
            pick(dtb, n_tb), *none_after)


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
) -> torch.Tensor:
    """CGC-LoRA delta for a mixed-task batch; see `cgc_kernels.reference.cgc_lora` for the math.

    backend: "torch" (the fast PyTorch path, the CPU default), "triton" (the CUDA default) or
    "reference" (the spec); None picks by device, dtype and rank.

    Shapes: x [M, d_in]; task_ids [M] in [-1, T) or a TaskRouting; gates [T, S+K] (or [M, S+K]
    with per_token_gates); shared_a [C, S*r, d_in]; shared_b [C, d_out, S*r]; task_a [T, K*r, d_in];
    task_b [T, d_out, K*r]; task_cluster [T] or None. Returns [M, d_out] (or `out` += delta).

    A TaskRouting skips the id check (no host sync) and is reused across layers; on the Triton
    path a plain id tensor is checked, then routed per call. The kernels need only the routing's
    per-task segments, so a routing built with or without `task_cluster` gives the same result.
    """
    args = (x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
            dropout_p, out, backend)
    device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return _dispatch(*args)
    with torch.autocast(device, enabled=False):
        return _dispatch(*args)


def _dispatch(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates,
              dropout_p, out, backend):
    chosen = resolve_backend(x, backend)
    if backend is None and chosen == "triton" and _rank_too_large(shared_a, task_a):
        chosen = "torch"  # beyond the kernels' register budget
    if chosen == "reference":
        return reference.cgc_lora(
            x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
            task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, out=out,
        )
    shp = check_cgc_lora_args(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
        task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, out=out,
    )
    if chosen == "torch":
        if isinstance(task_ids, TaskRouting) and task_ids.device != x.device:
            raise ValueError(f"task_ids (routing) is on {task_ids.device} but x is on {x.device}")
        delta = torch_backend.cgc_lora_torch(
            x, task_ids, gates.to(x.device), shared_a, shared_b, task_a, task_b, scaling,
            task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p,
        )
        return delta if out is None else out.add_(delta.to(out.dtype))
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 for the Triton backend, got {x.dtype}")
    if not x.is_cuda and not common.INTERPRET:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before cgc_kernels "
                         "is imported (Triton's interpreter); use a CUDA device or backend='torch'")
    if _rank_too_large(shared_a, task_a):
        raise ValueError(f"shared_a / task_a: stacked rank S*r = {shp.S * shp.r} or K*r = {shp.K * shp.r} "
                         f"exceeds {common.MAX_RANK_PAD}, the fused kernels' limit; use backend='torch'")
    if isinstance(task_ids, TaskRouting):
        routing = task_ids
        if routing.device != x.device:
            raise ValueError(f"task_ids (routing) is on {routing.device} but x is on {x.device}")
    else:
        routing = build_routing(task_ids, shp.T, task_cluster, validate=False)
    gates = gates.to(x.device)
    rt = (routing.order, routing.tile_task, routing.tile_start, routing.tile_end)

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gates, shared_a, shared_b, task_a, task_b, out) if t is not None)
    if not needs_grad:
        target = out if out is not None else x.new_zeros(shp.M, shp.d_out)
        torch.ops.cgc_kernels.lora_fwd_inplace(
            target, x, gates, shared_a, shared_b, task_a, task_b, task_cluster, *rt,
            float(scaling), bool(per_token_gates), float(dropout_p),
        )
        return target
    y, _, _ = torch.ops.cgc_kernels.lora_fwd(
        x, gates, shared_a, shared_b, task_a, task_b, task_cluster, *rt, routing.counts, routing.starts,
        float(scaling), bool(per_token_gates), float(dropout_p),
    )
    if out is None:
        return y
    return out.add_(y)
