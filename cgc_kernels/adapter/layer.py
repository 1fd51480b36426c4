"""CGCLoRALinear: a frozen base layer plus S shared and K task-specific LoRA experts and a gate.

    y = base(x) + cgc_lora(x, task_ids, gates, shared_a, shared_b, task_a, task_b, alpha / r)

The base layer is called as it is (nn.Linear, GPT-2's Conv1D, bitsandbytes 4-bit / int8 layers,
...), and the LoRA delta is added to its output (in place when no gradient is recorded). A
quantized base runs its own kernels without autograd and its input gradient comes from its
dequantized weight (see quantized.py).
`merge(task)` folds one task's gate-weighted experts into the base weight (for deployment);
`unmerge()` restores the saved original exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..op.dispatch import cgc_lora
from ..op.routing import TaskRouting
from .gates import TaskGate, TokenGate
from .quantized import expert_dtype, frozen_base_forward, is_quantized


def base_layer_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module; ValueError if it has none."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):  # GPT-2: weight is [d_in, d_out]
        return int(base.weight.shape[0]), int(base.nf)
    raise ValueError(
        f"cannot adapt {type(base).__name__}: it has no in_features/out_features (nn.Linear-like) "
        f"and is not a transformers Conv1D"
    )


def _is_transposed(base: nn.Module) -> bool:
    return type(base).__name__ == "Conv1D"


class CGCLoRALinear(nn.Module):
    """A frozen linear-like `base_layer` with CGC-LoRA experts.

    Args:
        base_layer: module mapping [..., d_in] -> [..., d_out]; frozen here.
        num_tasks: T.
        num_shared_experts: S (per cluster).
        num_task_experts: K (per task).
        rank: r of one expert.
        alpha: scaling = alpha / rank.
        dropout: dropout on the LoRA input in training mode.
        task_cluster: [T] cluster of each task (list or tensor); None = one cluster.
        gate: "task" or "token", or a TaskGate module to share (model-wide gate scope).
        gate_embedding_dim: task gate from a task embedding of this size (gate="task" only).
        gate_init: "uniform" or "random" (MOELoRA's random task-embedding gate); see TaskGate.
        backend: force the op's backend ("reference" / "triton"); None picks by device.

    Parameters: shared_a [C, S*r, d_in], shared_b [C, d_out, S*r], task_a [T, K*r, d_in],
    task_b [T, d_out, K*r]; A kaiming-uniform like PEFT's LoRA, B zero (so a fresh layer is the base).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        task_cluster: list[int] | torch.Tensor | None = None,
        gate: str | nn.Module = "task",
        gate_embedding_dim: int | None = None,
        gate_init: str = "uniform",
        backend: str | None = None,
        task_names: Sequence[str] | None = None,
        cluster_names: Sequence[str] | None = None,
    ):
        super().__init__()
        if num_tasks < 1 or num_shared_experts < 0 or num_task_experts < 0 or rank < 1:
            raise ValueError(
                f"need num_tasks >= 1, S >= 0, K >= 0, rank >= 1; got T={num_tasks}, "
                f"S={num_shared_experts}, K={num_task_experts}, r={rank}"
            )
        if num_shared_experts + num_task_experts < 1:
            raise ValueError("num_shared_experts + num_task_experts must be at least 1")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer_features(base_layer)
        self.num_tasks, self.rank = num_tasks, rank
        self.num_shared_experts, self.num_task_experts = num_shared_experts, num_task_experts
        self.scaling = alpha / rank
        self.dropout = dropout
        self.backend = backend

        if task_cluster is None:
            task_cluster = [0] * num_tasks
        tc = torch.as_tensor(task_cluster, dtype=torch.int64)
        if tc.shape != (num_tasks,) or int(tc.min()) < 0:
            raise ValueError(
                f"task_cluster must be [T] = [{num_tasks}] non-negative ints, got {task_cluster}"
            )
        self.num_clusters = int(tc.max()) + 1
        self.register_buffer("task_cluster", tc, persistent=False)
        # Names of the task and cluster behind each index (CGCModel's; indices as text by default):
        # what a rebuild for other clusters matches experts and gates by.
        self.task_names = _names(task_names, num_tasks, "task_names")
        self.cluster_names = _names(cluster_names, self.num_clusters, "cluster_names")

        self.quantized_base = is_quantized(base_layer)
        weight = getattr(base_layer, "weight", None)
        dtype = expert_dtype(base_layer)  # the weight's dtype, or the compute dtype of a quantized base
        device = weight.device if weight is not None else None
        C, T, S, K, r = self.num_clusters, num_tasks, num_shared_experts, num_task_experts, rank
        d_in, d_out = self.in_features, self.out_features
        kw = dict(dtype=dtype, device=device)
        self.shared_a = nn.Parameter(torch.empty(C, S * r, d_in, **kw))
        self.shared_b = nn.Parameter(torch.zeros(C, d_out, S * r, **kw))
        self.task_a = nn.Parameter(torch.empty(T, K * r, d_in, **kw))
        self.task_b = nn.Parameter(torch.zeros(T, d_out, K * r, **kw))
        self.reset_lora_parameters()

        if isinstance(gate, nn.Module):
            self.gate_kind = "token" if isinstance(gate, TokenGate) else "task"
            size = (getattr(gate, "num_tasks", T), getattr(gate, "num_experts", S + K))
            if size != (T, S + K):
                raise ValueError(f"gate module is for [T, S+K] = [{size[0]}, {size[1]}] but the layer has "
                                 f"T={T} tasks and S+K={S + K} experts")
            self.gate = gate
        elif gate == "task":
            self.gate_kind, self.gate = "task", TaskGate(T, S + K, gate_embedding_dim, gate_init)
        elif gate == "token":
            self.gate_kind, self.gate = "token", TokenGate(T, S + K, d_in)
        else:
            raise ValueError(f"gate must be 'task', 'token' or a gate module, got {gate!r}")
        if device is not None:
            self.gate.to(device)

        self.merged_task: int | None = None
        self._weight_before_merge: _KeptWeight | None = None  # what unmerge puts back
        self.disable_adapters = False  # PEFT's flag: True makes forward the base layer exactly
        # Set by CGCModel for the duration of a forward, so the model's own code passes no ids.
        self.current_routing: torch.Tensor | TaskRouting | None = None

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) per expert (bound 1/sqrt(d_in), as PEFT's LoRA); B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.shared_a.uniform_(-bound, bound)
            self.task_a.uniform_(-bound, bound)
            self.shared_b.zero_()
            self.task_b.zero_()

    # ---- gates ---------------------------------------------------------------------------
    def task_gates(self) -> torch.Tensor:
        """[T, S+K] float32 expert weights of the task gate."""
        if self.gate_kind != "task":
            raise ValueError("this layer has a token gate: its weights depend on the input")
        return self.gate()

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | TaskRouting | None = None) -> torch.Tensor:
        """x [..., d_in]; task_ids [M] (M = x.numel() // d_in, or shaped like x[..., 0]) in [-1, T),
        or a TaskRouting; None uses `current_routing` (set by CGCModel). Returns [..., d_out]."""
        if task_ids is None:
            task_ids = self.current_routing
        # Checked before the base layer runs, whose own errors would not name the argument.
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.device != self.shared_a.device:
            raise ValueError(f"x is on {x.device} but the layer's experts are on {self.shared_a.device}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features but the layer expects {self.in_features}")
        if isinstance(task_ids, TaskRouting) and task_ids.device != x.device:
            task_ids = task_ids.on(x.device)  # device_map="auto": the routing's copy on this device
        if self.disable_adapters:
            return self._base_forward(x)
        if self.merged_task is not None:
            result = self._base_forward(x)
            if task_ids is not None:
                self._check_merged_ids(task_ids)
            return result
        if task_ids is None:
            raise ValueError(
                "CGCLoRALinear.forward got no task ids: pass task_ids, or call the model through "
                "CGCModel (cgc(...), cgc.generate); with gradient checkpointing, enable it with "
                "CGCModel.activation_checkpointing_enable so the recomputation gets the routing"
            )
        if isinstance(task_ids, torch.Tensor) and task_ids.dim() > 1:
            if task_ids.shape != x.shape[:-1]:
                raise ValueError(f"task_ids shaped {tuple(task_ids.shape)} must be [M] or x.shape[:-1] = "
                                 f"{tuple(x.shape[:-1])}")
            task_ids = task_ids.reshape(-1)

        flat = x.reshape(-1, self.in_features)
        # When x needs a gradient the base gets the same flat view as the experts, so both input
        # gradients land in one buffer and autograd adds them in place; through two different
        # views of x it would allocate their sum (one more pass over [M, d_in] per layer).
        result = self._base_forward(flat if x.requires_grad and torch.is_grad_enabled() else x)
        dtype = self.compute_dtype(x)
        experts = [w.to(dtype) for w in (self.shared_a, self.shared_b, self.task_a, self.task_b)]
        x2 = flat.to(dtype)
        out_shape = (*x.shape[:-1], self.out_features)
        with torch.autocast(x.device.type, enabled=False):  # the gate computes in its own dtype (fp32)
            if self.gate_kind == "token":
                ids = task_ids.task_ids if isinstance(task_ids, TaskRouting) else task_ids
                gates, per_token = self.gate(x2.to(self.shared_a.dtype), ids), True
            else:
                gates, per_token = self.gate(), False
        kw = dict(task_cluster=self.task_cluster if self.num_clusters > 1 else None, per_token_gates=per_token,
                  dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        if torch.is_grad_enabled() or result.dtype != dtype:
            # Out of place under autograd (as PEFT's LoRA): an in-place add into a view of the base
            # output costs autograd a copy of it, and is refused when that output comes from a
            # compiled region or a custom Function. Also for a base whose dtype autocast leaves alone.
            if result.dtype == dtype:  # base + delta in one pass (the kernels write it directly)
                y = cgc_lora(x2, task_ids, gates, *experts, self.scaling,
                             base=result.reshape(-1, self.out_features), **kw)
                return y.view(out_shape)
            delta = cgc_lora(x2, task_ids, gates, *experts, self.scaling, **kw)
            return (result.reshape(-1, self.out_features) + delta.to(result.dtype)).view(out_shape)
        out2 = result.reshape(-1, self.out_features)  # a view of the base output when contiguous
        delta_out = cgc_lora(x2, task_ids, gates, *experts, self.scaling, out=out2, **kw)
        return delta_out.view(out_shape)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_base_forward(self.base_layer, x) if self.quantized_base else self.base_layer(x)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the LoRA branch computes in: autocast's for x's device when it is on (as
        nn.Linear: float64 is left alone), else the experts' own. The experts stay in their dtype
        (fp32) either way; under autocast they are cast per forward, and their gradients flow back."""
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64 and self.shared_a.dtype != torch.float64:
            return torch.get_autocast_dtype(device)
        return self.shared_a.dtype

    def _check_merged_ids(self, task_ids) -> None:
        ids = task_ids.task_ids if isinstance(task_ids, TaskRouting) else task_ids
        if ids.numel() and bool((ids != self.merged_task).any()):
            raise ValueError(
                f"task {self.merged_task} is merged into this layer; it cannot serve other task ids "
                f"(unmerge() first)"
            )

    # ---- merge / unmerge -----------------------------------------------------------------
    @torch.no_grad()
    def get_delta_weight(self, task: int) -> torch.Tensor:
        """[d_out, d_in] the task's merged update s * sum_e g_e B_e A_e, in float32 (float64 for a
        float64 layer)."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must lie in [0, {self.num_tasks}), got {task}")
        acc = torch.float64 if self.task_a.dtype == torch.float64 else torch.float32
        g = self.task_gates()[task].to(acc)
        S, r = self.num_shared_experts, self.rank
        col = g.repeat_interleave(r)  # each expert's gate over its r rank columns
        c = int(self.task_cluster[task])
        delta = (self.shared_b[c].to(acc) * col[: S * r]) @ self.shared_a[c].to(acc)
        delta += (self.task_b[task].to(acc) * col[S * r :]) @ self.task_a[task].to(acc)
        return delta * self.scaling

    @torch.no_grad()
    def merge(self, task: int, *, keep_original: bool = True) -> None:
        """Fold task `task` into the base weight; forward then needs no ids (or only this task's).
        keep_original=False drops the original weight (no unmerge): for a layer about to be
        replaced by its merged base layer, so that the model's memory stays that of one copy."""
        if self.gate_kind != "task":
            raise ValueError("cannot merge a layer with a token gate: its expert mixture depends on x")
        if self.merged_task is not None:
            raise ValueError(f"task {self.merged_task} is already merged; unmerge() first")
        weight = getattr(self.base_layer, "weight", None)
        if self.quantized_base or weight is None or not weight.dtype.is_floating_point:
            raise ValueError(
                f"cannot merge into {type(self.base_layer).__name__}: its weight is quantized, and "
                f"re-quantizing the merged weight would round the update away; export a PEFT adapter "
                f"(CGCModel.export_peft_adapter), or use CGCModel.merge_task(task, dequantize=True) "
                f"for a full-precision merged model"
            )
        delta = self.get_delta_weight(task)
        if _is_transposed(self.base_layer):
            delta = delta.T
        # The merged weight is a new Parameter and the original is kept as it was: a weight tied to
        # another module (an LM head sharing the input embedding) is untied by the merge instead of
        # changing the embedding too, and unmerge re-ties it by putting the very same object back.
        merged = (weight.detach().to(delta.dtype) + delta).to(weight.dtype)
        self._weight_before_merge = _KeptWeight(weight) if keep_original else None
        self.base_layer.weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
        self.merged_task = task

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight `merge` replaced: the original Parameter object, bit for bit
        (tied to the same modules as before)."""
        if self.merged_task is None:
            return
        if self._weight_before_merge is None:
            raise ValueError(f"task {self.merged_task} was merged without keeping the original weight: "
                             f"nothing to unmerge")
        self.base_layer.weight = self._weight_before_merge.weight
        self._weight_before_merge = None
        self.merged_task = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, tasks={self.num_tasks}, "
                f"clusters={self.num_clusters}, S={self.num_shared_experts}, K={self.num_task_experts}, "
                f"r={self.rank}, scaling={self.scaling:g}, gate={self.gate_kind}")


class _KeptWeight(NamedTuple):
    """The base weight a merge replaced. Held in a tuple because a Parameter set as a module
    attribute would be registered as one of the layer's own."""

    weight: nn.Parameter


def _names(names: Sequence[str] | None, count: int, what: str) -> tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(count))
    names = tuple(names)
    if len(names) != count:
        raise ValueError(f"{what} must name {count} entries, got {len(names)}: {list(names)}")
    return names
