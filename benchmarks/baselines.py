"""The baseline CGC-LoRA replaces: a MOELoRA-style layer, one tiny LoRA expert per nn.Linear pair.

MOELoRALinear computes exactly the CGC-LoRA function (docs/design.md section 2) the way task-gated
LoRA-expert layers are usually written: every expert is its own `lora_A: Linear(d_in, r)` /
`lora_B: Linear(r, d_out)` in a ModuleList, a Python loop runs ALL experts on EVERY token, and
each expert's output is multiplied by a per-token gate weight that is zero for tokens whose task
(or cluster) does not use that expert:

    y = base(x) + s * sum_{e < E} w[:, e] * lora_B[e](lora_A[e](drop(x)))       E = C*S + T*K

    w[m, e] = gates[t, i] * (cluster(t) == c)   for shared expert e = (cluster c, slot i < S)
    w[m, e] = gates[t, S+j] * (t == t_e)        for task expert e = (task t_e, slot j < K)
    (t = task_ids[m]; w[m, :] = 0 when t == -1)

That is 2E small matmuls over all M tokens per layer (E*M*r*(d_in+d_out) multiply-adds, most of
them multiplied by zero), where CGC-LoRA does the work of S+K experts per token. Expert order:
the C*S shared experts cluster by cluster, then the T*K task experts task by task.

`MOELoRALinear.from_cgc(layer)` copies a CGCLoRALinear's experts and gate, so both compute the
same function and benchmarks compare equal work.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cgc_kernels import CGCLoRALinear, TaskGate


class MOELoRALinear(nn.Module):
    """A frozen `base_layer` plus C*S shared and T*K task LoRA experts, looped in Python.

    Args:
        base_layer: nn.Linear [d_in -> d_out]; frozen here.
        num_tasks, num_shared_experts, num_task_experts, rank, alpha: T, S, K, r, alpha (s = alpha / r).
        task_cluster: [T] cluster of each task; None = one cluster.
        gate: module returning [T, S+K] expert weights (a TaskGate); None = a fresh TaskGate.
        dropout: dropout on the LoRA input in training mode (one mask shared by all experts).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_tasks: int,
        num_shared_experts: int,
        num_task_experts: int,
        rank: int,
        alpha: float,
        *,
        task_cluster: list[int] | torch.Tensor | None = None,
        gate: nn.Module | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        T, S, K, r = num_tasks, num_shared_experts, num_task_experts, rank
        tc = torch.as_tensor([0] * T if task_cluster is None else task_cluster, dtype=torch.int64)
        C = int(tc.max()) + 1
        self.num_tasks, self.num_clusters = T, C
        self.num_shared_experts, self.num_task_experts, self.rank = S, K, r
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        w = base_layer.weight
        kw = dict(dtype=w.dtype, device=w.device)
        E = C * S + T * K
        self.lora_A = nn.ModuleList(nn.Linear(d_in, r, bias=False, **kw) for _ in range(E))
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False, **kw) for _ in range(E))
        for b in self.lora_B:
            nn.init.zeros_(b.weight)
        self.gate = gate if gate is not None else TaskGate(T, S + K).to(w.device)

        # Per expert: which gate column it reads, whether it is shared, and its owner (cluster or task).
        shared = [True] * (C * S) + [False] * (T * K)
        column = [i for _ in range(C) for i in range(S)] + [S + j for _ in range(T) for j in range(K)]
        owner = [c for c in range(C) for _ in range(S)] + [t for t in range(T) for _ in range(K)]
        self.register_buffer("task_cluster", tc.to(w.device), persistent=False)
        self.register_buffer("expert_shared", torch.tensor(shared, dtype=torch.bool, device=w.device),
                             persistent=False)
        self.register_buffer("expert_column", torch.tensor(column, dtype=torch.int64, device=w.device),
                             persistent=False)
        self.register_buffer("expert_owner", torch.tensor(owner, dtype=torch.int64, device=w.device),
                             persistent=False)
        # Per-token ids set by a model wrapper for the duration of a forward (as MOELoRA threads them).
        self.current_task_ids: torch.Tensor | None = None

    @classmethod
    def from_cgc(cls, layer: CGCLoRALinear) -> MOELoRALinear:
        """The same function as `layer` (a task-gated CGCLoRALinear): its experts copied into
        per-expert Linears, its gate deep-copied, its frozen base layer shared (not copied)."""
        if layer.gate_kind != "task":
            raise ValueError("MOELoRALinear.from_cgc needs a task-gated layer (gate='task')")
        C, T = layer.num_clusters, layer.num_tasks
        S, K, r = layer.num_shared_experts, layer.num_task_experts, layer.rank
        moe = cls(layer.base_layer, T, S, K, r, alpha=layer.scaling * r,
                  task_cluster=layer.task_cluster.tolist(),
                  gate=copy.deepcopy(layer.gate), dropout=layer.dropout)
        with torch.no_grad():
            e = 0
            for c in range(C):
                for i in range(S):
                    moe.lora_A[e].weight.copy_(layer.shared_a[c, i * r:(i + 1) * r])
                    moe.lora_B[e].weight.copy_(layer.shared_b[c, :, i * r:(i + 1) * r])
                    e += 1
            for t in range(T):
                for j in range(K):
                    moe.lora_A[e].weight.copy_(layer.task_a[t, j * r:(j + 1) * r])
                    moe.lora_B[e].weight.copy_(layer.task_b[t, :, j * r:(j + 1) * r])
                    e += 1
        return moe

    @property
    def num_experts(self) -> int:
        return len(self.lora_A)

    def expert_weights(self, task_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """task_ids [M] in [-1, T), gates [T, S+K] -> [M, E] per-token weight of every expert."""
        ids = task_ids.to(torch.int64)
        valid = ids >= 0
        safe = ids.clamp(min=0)
        token_gates = gates[safe] * valid.unsqueeze(1)  # [M, S+K]; zero rows for task -1
        owner = self.task_cluster[safe].unsqueeze(1), safe.unsqueeze(1)  # shared experts: by cluster
        key = torch.where(self.expert_shared.unsqueeze(0), *owner)
        uses = key == self.expert_owner.unsqueeze(0)  # [M, E]: token's cluster/task owns expert e
        return token_gates[:, self.expert_column] * uses

    def lora_delta(self, x: torch.Tensor, task_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone: x [M, d_in], task_ids [M], gates [T, S+K] -> [M, d_out] (x's dtype)."""
        h = self.dropout(x)
        w = self.expert_weights(task_ids, gates).to(x.dtype)
        delta = None
        for e in range(self.num_experts):  # every expert on every token: the baseline's cost
            y = self.lora_B[e](self.lora_A[e](h)) * w[:, e:e + 1]
            delta = y if delta is None else delta + y
        if delta is None:
            return x.new_zeros(x.shape[0], self.base_layer.out_features)
        return delta * self.scaling

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., d_in]; task_ids [M] per token, shaped like x[..., 0], or [batch] per sample of a
        [batch, seq, d_in] x; None reads `current_task_ids`. Returns [..., d_out]."""
        if task_ids is None:
            task_ids = self.current_task_ids
        if task_ids is None:
            raise ValueError("MOELoRALinear.forward needs task_ids")
        if x.dim() == 3 and task_ids.dim() == 1 and task_ids.shape[0] == x.shape[0]:
            task_ids = task_ids.unsqueeze(1).expand(x.shape[:2])  # per-sample ids over the sequence
        result = self.base_layer(x)
        x2 = x.reshape(-1, x.shape[-1])
        delta = self.lora_delta(x2, task_ids.reshape(-1), self.gate())
        return result + delta.view(result.shape).to(result.dtype)
