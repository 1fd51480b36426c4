"""An independent oracle for CGC-LoRA: a naive loop over tokens and experts, straight from the
formula in docs/design.md section 2. Slow and obvious on purpose; shares no code with the package."""

from __future__ import annotations

import torch


def naive_cgc_lora(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling,
                   task_cluster=None, per_token_gates=False, keep_mask=None, dropout_p=0.0):
    """x [M, d_in] -> [M, d_out] float64, one token and one expert at a time."""
    M, d_in = x.shape
    d_out = task_b.shape[1]
    E = gates.shape[1]
    r = (shared_a.shape[1] + task_a.shape[1]) // E
    S = shared_a.shape[1] // r
    K = task_a.shape[1] // r
    out = torch.zeros(M, d_out, dtype=torch.float64)
    for m in range(M):
        t = int(task_ids[m])
        if t == -1:
            continue
        c = 0 if task_cluster is None else int(task_cluster[t])
        g = gates[m] if per_token_gates else gates[t]
        xm = x[m].double()
        if keep_mask is not None:
            xm = xm * keep_mask[m].double() / (1.0 - dropout_p)
        for i in range(S):
            a = shared_a[c][i * r:(i + 1) * r].double()
            b = shared_b[c][:, i * r:(i + 1) * r].double()
            out[m] += float(g[i]) * (b @ (a @ xm))
        for j in range(K):
            a = task_a[t][j * r:(j + 1) * r].double()
            b = task_b[t][:, j * r:(j + 1) * r].double()
            out[m] += float(g[S + j]) * (b @ (a @ xm))
    return out * scaling
