"""The CGC-LoRA op in plain PyTorch: the specification every backend is judged against (the CPU
path is torch_backend.py; this file is written to be read).

For token m with task t = task_ids[m], cluster c = task_cluster[t], gate g = gates[t] (or gates[m]):

    delta_m = s * ( sum_{i<S} g[i]   * shared_b[c][:, i*r:(i+1)*r] @ shared_a[c][i*r:(i+1)*r] @ drop(x_m)
                  + sum_{j<K} g[S+j] * task_b[t][:, j*r:(j+1)*r]   @ task_a[t][j*r:(j+1)*r]   @ drop(x_m) )

    task_ids[m] == -1  ->  delta_m = 0

Because the experts of one side are stacked along the rank, "sum over experts of g_e * B_e A_e x"
is one pair of matmuls per cluster (shared) or task (task-specific) with the rank-r blocks of
z = A x scaled by their expert's gate in between. The loops below run over clusters and tasks,
never over tokens. Autograd gives every gradient.
"""

from __future__ import annotations

import torch

from .routing import TaskRouting
from .validation import check_cgc_lora_args


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cgc_lora(x: torch.Tensor, task_ids: torch.Tensor | TaskRouting, gates: torch.Tensor, shared_a: torch.Tensor,
             shared_b: torch.Tensor, task_a: torch.Tensor, task_b: torch.Tensor, scaling: float, *,
             task_cluster: torch.Tensor | None = None, per_token_gates: bool = False, dropout_p: float = 0.0,
             out: torch.Tensor | None = None, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The gate-weighted sum of every expert a token's task uses, scaled by `scaling`.

    Args:
        x: [M, d_in] float16 / bfloat16 / float32 / float64.
        task_ids: [M] integer in [-1, T) (-1: no adapter), or a TaskRouting built from checked ids.
        gates: [T, S+K] (columns: S shared, then K task experts), or [M, S+K] if per_token_gates.
        shared_a: [C, S*r, d_in]; shared_b: [C, d_out, S*r].
        task_a: [T, K*r, d_in]; task_b: [T, d_out, K*r].
        scaling: s = alpha / r.
        task_cluster: [T] integer cluster of each task; None means one cluster (C must be 1).
        per_token_gates: gates has one row per token instead of per task.
        dropout_p: dropout on the LoRA input (only this branch sees it).
        out: [M, d_out]; when given, the delta is added into it in place and it is returned.
        dropout_mask: [M, d_in] bool keep-mask to use instead of drawing one (tests compare
            kernels that generate their own mask through this).

    Returns:
        [M, d_out] in x's dtype: the delta, or `out` with the delta added.
    """
    shp = check_cgc_lora_args(
        x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
        task_cluster=task_cluster, per_token_gates=per_token_gates, dropout_p=dropout_p, out=out,
    )
    ids = task_ids.task_ids if isinstance(task_ids, TaskRouting) else task_ids
    ids = ids.to(torch.int64)
    acc = _accumulate_dtype(x.dtype)
    S, r = shp.S, shp.r

    h = x.to(acc)
    if dropout_mask is not None:
        if dropout_mask.shape != x.shape:
            raise ValueError(f"dropout_mask must be [M, d_in] = {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
        h = h * dropout_mask.to(acc) / (1.0 - dropout_p)
    elif dropout_p > 0:
        h = torch.nn.functional.dropout(h, p=dropout_p, training=True)

    # Each expert's gate repeated over its r rank columns: [M, (S+K) r], zero for task -1 tokens.
    valid = ids >= 0
    token_gates = gates if per_token_gates else gates[ids.clamp(min=0)]
    rank_gates = token_gates.to(acc).repeat_interleave(r, dim=1) * valid.unsqueeze(1)
    shared_gates, task_gates = rank_gates[:, : S * r], rank_gates[:, S * r :]

    cluster = (
        torch.zeros(shp.T, dtype=torch.int64, device=x.device) if task_cluster is None
        else task_cluster.to(torch.int64)
    )
    token_cluster = torch.where(valid, cluster[ids.clamp(min=0)], -1)

    delta = torch.zeros(shp.M, shp.d_out, dtype=acc, device=x.device)
    if shp.S > 0:
        for c in range(shp.C):
            rows = (token_cluster == c).nonzero().squeeze(1)
            # Task-major within the cluster: the shared gradients then sum rows in an order that no
            # task-order-preserving shuffle of the batch can change (bitwise reproducible).
            rows = rows[torch.sort(ids[rows], stable=True).indices]
            z = h[rows] @ shared_a[c].to(acc).T  # [m_c, S r]
            delta = delta.index_add(0, rows, (z * shared_gates[rows]) @ shared_b[c].to(acc).T)
    if shp.K > 0:
        for t in range(shp.T):
            rows = (ids == t).nonzero().squeeze(1)
            z = h[rows] @ task_a[t].to(acc).T  # [m_t, K r]
            delta = delta.index_add(0, rows, (z * task_gates[rows]) @ task_b[t].to(acc).T)
    delta = delta * scaling

    if out is None:
        return delta.to(x.dtype)
    return out.add_(delta.to(out.dtype))
