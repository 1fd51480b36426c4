"""Gates: how much each expert contributes, per task (CGC-LoRA's task-motivated gate) or per token.

TaskGate   -> [T, S+K]  softmax of learned per-task logits (or of a linear map of a task embedding).
              Independent of the input, so a task's update is a fixed matrix that can be merged.
              init="uniform" starts every task at an even mixture; init="random" is MOELoRA's
              gate: a task embedding through a randomly initialised linear map without bias.
TokenGate  -> [M, S+K]  softmax(Wg[t] x_m), PLE's CGC gate; input-dependent, so not mergeable.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GATE_INITS


class Float32Module(nn.Module):
    """A module whose floating parameters stay float32 through `.to(dtype)`, `.half()`,
    `.bfloat16()` (devices still move): softmax logits in low precision would quantize the expert
    mixture, and they are tiny."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in self.parameters():
            if p.dtype.is_floating_point and p.dtype != torch.float32:
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self


class TaskGate(Float32Module):
    """Per-task softmax over the S+K experts a task may use.

    Args:
        num_tasks: T.
        num_experts: S+K.
        embedding_dim: None: free logits [T, S+K]. An int D: logits = task_embedding[t] @ W^T
            (+ bias with init="uniform"), task_embedding [T, D], W [S+K, D].
        init: "uniform": logits start at zero (W and bias zero), so a fresh module is plain
            averaging of its experts. "random" (needs embedding_dim): MOELoRA's gate, the
            embedding drawn from N(0, 1) (nn.Embedding's init) and W from nn.Linear's default
            init, no bias, so tasks start from different mixtures.
    """

    def __init__(self, num_tasks: int, num_experts: int, embedding_dim: int | None = None,
                 init: str = "uniform"):
        super().__init__()
        if init not in GATE_INITS:
            raise ValueError(f"init must be one of {GATE_INITS}, got {init!r}")
        if init == "random" and embedding_dim is None:
            raise ValueError("init='random' draws the linear map of a task embedding: give embedding_dim")
        self.num_tasks, self.num_experts, self.init = num_tasks, num_experts, init
        if embedding_dim is None:
            self.logits = nn.Parameter(torch.zeros(num_tasks, num_experts))
            self.embedding = self.proj = None
        elif init == "random":
            self.logits = None
            self.embedding = nn.Parameter(torch.randn(num_tasks, embedding_dim))
            self.proj = nn.Linear(embedding_dim, num_experts, bias=False)
        else:
            self.logits = None
            self.embedding = nn.Parameter(torch.randn(num_tasks, embedding_dim) / embedding_dim**0.5)
            self.proj = nn.Linear(embedding_dim, num_experts)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def task_logits(self) -> torch.Tensor:
        """[T, S+K] logits, float32 (float64 for a float64 gate): a low-precision gate would round
        the small differences between logits away."""
        if self.logits is not None:
            return self.logits.to(torch.promote_types(self.logits.dtype, torch.float32))
        dtype = torch.promote_types(self.embedding.dtype, torch.float32)
        bias = None if self.proj.bias is None else self.proj.bias.to(dtype)
        return nn.functional.linear(self.embedding.to(dtype), self.proj.weight.to(dtype), bias)

    def forward(self) -> torch.Tensor:
        """[T, S+K] float32 (float64 for a float64 gate) expert weights; each row sums to 1."""
        return torch.softmax(self.task_logits(), dim=-1)


class TokenGate(Float32Module):
    """Per-token softmax(Wg[t] x_m) over the experts of the token's task t."""

    def __init__(self, num_tasks: int, num_experts: int, in_features: int):
        super().__init__()
        self.num_tasks, self.num_experts = num_tasks, num_experts
        self.weight = nn.Parameter(torch.zeros(num_tasks, num_experts, in_features))

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """x [M, d_in], task_ids [M] in [-1, T) -> [M, S+K] float32 (rows of task -1 are unused)."""
        T, E = self.num_tasks, self.num_experts
        # One [M, d_in] x [d_in, T*E] matmul, then pick each token's task: T*E is small.
        all_logits = (x.float() @ self.weight.reshape(T * E, -1).float().T).view(-1, T, E)
        rows = torch.arange(x.shape[0], device=x.device)
        return torch.softmax(all_logits[rows, task_ids.clamp(min=0)], dim=-1)


class StackedTaskGate(nn.Module):
    """A [T, S+K] task gate made of one TaskGate per cluster, rows concatenated in cluster order.

    Each cluster (a plug-in CGC-LoRA module) keeps its own gate, so clusters trained apart can be
    added to or removed from one model without touching the others' gates. The same TaskGate
    objects may sit in every layer (gate_scope="model": one gate per cluster for the whole model).
    """

    def __init__(self, parts: list[TaskGate]):
        super().__init__()
        if not parts:
            raise ValueError("StackedTaskGate needs at least one TaskGate")
        widths = {g.num_experts for g in parts}
        if len(widths) != 1:
            raise ValueError(f"every cluster's gate must have the same S+K, got {sorted(widths)}")
        self.parts = nn.ModuleList(parts)
        self.num_tasks = sum(g.num_tasks for g in parts)
        self.num_experts = parts[0].num_experts

    def forward(self) -> torch.Tensor:
        """[T, S+K] float32 expert weights; each row sums to 1."""
        if len(self.parts) == 1:
            return self.parts[0]()
        return torch.cat([g() for g in self.parts], dim=0)
