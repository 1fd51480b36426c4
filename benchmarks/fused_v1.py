"""The first fused kernels (op/triton/forward.py + backward.py) as a benchmark provider, `fused_v1`.

They are kept until a GPU run has timed them beside the GPU-filling kernels that `cgc_lora`
dispatches to now; then the slower set is deleted. An autograd Function over their launchers,
with the call pattern the op used with them: y zero-filled then written, dx zero-filled, the
weight gradients from the saved z. No dropout (the benchmarks use none).
"""

from __future__ import annotations

import torch

from cgc_kernels.op.routing import TaskRouting
from cgc_kernels.op.triton import backward, forward


class FusedV1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, shared_a, shared_b, task_a, task_b, routing: TaskRouting, scaling: float):
        rt = (routing.order, routing.tile_task, routing.tile_start, routing.tile_end)
        y = torch.zeros(x.shape[0], task_b.shape[1], dtype=x.dtype, device=x.device)
        z = forward.cgc_lora_forward(x, gates, shared_a, shared_b, task_a, task_b, None, *rt,
                                     scaling, False, 0.0, None, y=y)
        ctx.save_for_backward(x, gates, shared_a, shared_b, task_a, task_b, z)
        ctx.routing, ctx.scaling = routing, scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gates, shared_a, shared_b, task_a, task_b, z = ctx.saved_tensors
        rt = ctx.routing
        n = ctx.needs_input_grad
        grads = backward.cgc_lora_backward(
            dy.contiguous(), x, gates, shared_a, shared_b, task_a, task_b, None, rt.order, rt.tile_task,
            rt.tile_start, rt.tile_end, rt.counts, rt.starts, z, ctx.scaling, False, 0.0, None,
            need_x=n[0], need_gates=n[1], need_a=n[2] or n[4], need_b=n[3] or n[5])
        dx, dg, dsa, dsb, dta, dtb = grads
        return dx, dg, dsa, dsb, dta, dtb, None, None


def fused_v1(x, routing, gates, shared_a, shared_b, task_a, task_b, scaling):
    """The LoRA delta [M, d_out] through the first fused kernels (one cluster, task gates)."""
    return FusedV1.apply(x, gates, shared_a, shared_b, task_a, task_b, routing, float(scaling))
