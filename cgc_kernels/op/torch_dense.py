"""The torch backend's dense layout: every expert of every task as one LoRA, rows masked by a gate matrix.

All experts are stacked into one LoRA of rank R = C S r + T K r (every cluster's shared experts,
then every task's own):

    a_all [R, d_in] = [shared_a[0]; ...; shared_a[C-1]; task_a[0]; ...; task_a[T-1]]
    b_all [d_out, R] = the matching columns of shared_b and task_b

and each row m carries a gate row G[m] [R] that holds its cluster's and its task's gates times the
scaling (each expert's gate over its r rank columns) and 0 in every other column:

    z = h a_all^T    u = G * z    y = base + u b_all^T                         [M, R], [M, d_out]

That is the reference's math (a row only reaches its own cluster's and task's experts), in two
GEMMs over all M rows whatever the task mix: no runs, no gather of rows, no sort, and one GEMM
call per product as one PEFT LoRA makes. The price is rank R instead of (S+K) r; the GEMMs at
these ranks are bound by reading and writing the [M, d] operands, not by the rank, so while R is
small (a few tasks) it costs about what one LoRA of rank (S+K) r does. torch_backend.py takes it
for training-sized batches whose rows interleave (`use_dense`), where the per-run layout would make
one small GEMM pair per sequence. The backward is the same four GEMMs (dG = du * z gives the gates' gradient):

    du = dy b_all    dB_all = dy^T u    dz = G * du    dA_all = dz^T h    dh = dz a_all

G is built with `torch.where`, never by multiplying a mask, so a non-finite gate reaches only its
own task's rows. A non-finite expert weight would reach every row through 0 * inf in the GEMMs,
so the dense layout is used only when the weights are finite (checked per call), and only when
every row has a task (a task -1 row's x would reach the weight gradients the same way).
"""

from __future__ import annotations

import torch


def stack_all_experts(shared_a, shared_b, task_a, task_b) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_all [C S r + T K r, d_in], b_all [d_out, C S r + T K r]) from shared_a [C, S r, d_in],
    shared_b [C, d_out, S r], task_a [T, K r, d_in], task_b [T, d_out, K r]. A copy of the weights."""
    d_in, d_out = shared_a.shape[2], shared_b.shape[1]
    a_all = torch.cat([shared_a.reshape(-1, d_in), task_a.reshape(-1, d_in)])
    b_all = torch.cat([shared_b.permute(1, 0, 2).reshape(d_out, -1), task_b.permute(1, 0, 2).reshape(d_out, -1)], 1)
    return a_all, b_all


def unstack_all_grads(da_all, db_all, C: int, T: int, Sr: int, Kr: int):
    """(dshared_a, dshared_b, dtask_a, dtask_b) in the parameters' shapes, from da_all [R, d_in] and
    db_all [d_out, R] (either may be None)."""
    dsa = dsb = dta = dtb = None
    if da_all is not None:
        d_in = da_all.shape[1]
        dsa, dta = da_all[: C * Sr].reshape(C, Sr, d_in), da_all[C * Sr:].reshape(T, Kr, d_in)
    if db_all is not None:
        d_out = db_all.shape[0]
        dsb = db_all[:, : C * Sr].reshape(d_out, C, Sr).permute(1, 0, 2).contiguous()
        dtb = db_all[:, C * Sr:].reshape(d_out, T, Kr).permute(1, 0, 2).contiguous()
    return dsa, dsb, dta, dtb


def _place(weights: torch.Tensor, member: torch.Tensor, r: int) -> torch.Tensor:
    """[N, G * E * r]: row n's E gates `weights` [N, E] (each over r rank columns) in group g's
    block where member[n, g] (bool [N, G]), 0 elsewhere."""
    w = weights.repeat_interleave(r, dim=1)  # [N, E r]
    return torch.where(member[:, :, None], w[:, None, :], 0).reshape(w.shape[0], member.shape[1] * w.shape[1])


def gate_table(gates: torch.Tensor, cluster_member: torch.Tensor, task_member: torch.Tensor, S: int, r: int,
               scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """[N, R] gate rows for N tasks (gates [T, S+K], task_member = eye(T)) or N tokens (per-token
    gates [M, S+K], the rows' masks): scaling times each gate, in its cluster's block of the shared
    columns and its task's block of the task columns; 0 elsewhere (and for a row of no task)."""
    g = gates.to(dtype) * scaling
    return torch.cat([_place(g[:, :S], cluster_member, r), _place(g[:, S:], task_member, r)], 1)


def _in_runs(runs: list, T: int) -> bool:
    """Few enough runs (rows laid out by task) that a loop over them beats one pass over all rows."""
    return len(runs) <= RUNS_PER_TASK * T


# Up to this many runs per task, per-task work loops over slices; beyond, it is one masked pass.
RUNS_PER_TASK = 4


def gate_rows(ids: torch.Tensor, runs: list, table: torch.Tensor) -> torch.Tensor:
    """[M, R] the gate row of each row's task from the per-task table [T, R] (ids [M] in caller
    order, every id >= 0; runs [(task, start, end)] over them): slices of one task filled from its
    row when the rows lie in runs, else one gather of the table's rows."""
    if _in_runs(runs, table.shape[0]):
        g = table.new_empty(ids.shape[0], table.shape[1])
        for t, a, b in runs:
            g[a:b] = table[t]
        return g
    return table.index_select(0, ids)


def forward(h: torch.Tensor, g: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
            base: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """(y, z): z = h a_all^T [M, R]; y = base + (g * z) b_all^T [M, d_out] (one addmm), the delta
    alone without base, or `out` += it in place (returned)."""
    z = h @ a_all.T
    u = z * g
    if out is not None:
        return out.addmm_(u, b_all.T), z
    if base is not None:
        return torch.addmm(base, u, b_all.T), z
    return u @ b_all.T, z


def backward(dy: torch.Tensor, h: torch.Tensor, g: torch.Tensor, z: torch.Tensor, a_all, b_all,
             need_x: bool, need_g: bool, need_a: bool, need_b: bool):
    """(dh [M, d_in], dg [M, R] = d loss / d g, da_all [R, d_in], db_all [d_out, R]); None where
    not needed. Four GEMMs, each over all M rows."""
    du = dy @ b_all
    db_all = dy.T @ (z * g) if need_b else None
    dg = du * z if need_g else None
    dz = du * g
    da_all = dz.T @ h if need_a else None
    dh = dz @ a_all if need_x else None
    return dh, dg, da_all, db_all


def expert_sums(dg: torch.Tensor, r: int) -> torch.Tensor:
    """[N, C S + T K] each expert's r rank columns of dg [N, R] summed."""
    return dg.reshape(dg.shape[0], dg.shape[1] // r, r).sum(-1)


def own_gates(per_expert: torch.Tensor, cluster_member: torch.Tensor, task_member: torch.Tensor,
              S: int) -> torch.Tensor:
    """[N, S+K] each (task or token) row's own experts' entries of per_expert [N, C S + T K]: its
    cluster's block of the shared part and its task's block of the task part (picked with `where`,
    so another block's NaN stays out; a row of no task gets 0)."""
    N, C, T = per_expert.shape[0], cluster_member.shape[1], task_member.shape[1]
    shared = per_expert[:, : C * S].reshape(N, C, S)
    own = per_expert[:, C * S:].reshape(N, T, (per_expert.shape[1] - C * S) // T)
    pick = lambda blocks, member: torch.where(member[:, :, None], blocks, 0).sum(1)
    return torch.cat([pick(shared, cluster_member), pick(own, task_member)], 1)


def per_task_sums(ids: torch.Tensor, runs: list, rows: torch.Tensor, T: int) -> torch.Tensor:
    """[T, n] each task's sum of rows [M, n] (task -1 rows left out): per run a slice sum when the
    rows lie in runs, else one masked sum (`where`: one task's NaN reaches only its own sum)."""
    if _in_runs(runs, T):
        acc = rows.new_zeros(T, rows.shape[1])
        for t, a, b in runs:
            acc[t] += rows[a:b].sum(0)
        return acc
    member = ids[:, None] == torch.arange(T, device=rows.device)
    return torch.where(member[:, :, None], rows[:, None, :], 0).sum(0)
