"""The fast PyTorch backend of `cgc_lora`: the CPU path, and CUDA shapes the kernels do not take.

Same math as reference.py (the spec), laid out for few, large GEMMs and a hand-written backward:

* Rows are cut into **runs**: maximal stretches of consecutive rows with one task id. A model that
  lays its batch out grouped by task (CGCModel, CGCDataCollator, the training loop) gives one run
  per task, so every task's rows are a slice of x: no gather, scatter or index_add anywhere.
* **Each task is one LoRA of rank (S+K) r**: its cluster's shared experts and its own, stacked
  (`stacked_experts`, a copy of the weights, not of the rows). Per run, one GEMM pair: z = h A^T,
  then y = base + (g z) B^T as one addmm. x, y and base are each read or written once, as for
  a single LoRA of the same total rank (PEFT's); splitting shared and task experts into separate
  GEMMs would read x twice and write y three times.
* Rows that truly interleave (many runs shorter than `MIN_RUN` rows, e.g. per-token task ids or
  a decode batch in caller order) are stably sorted by task once per call, computed as above,
  and put back: a gather in and a gather out, on x / y forward and dy / dx backward.
* A training-sized batch whose rows interleave by sequence (a loader in the caller's order), with
  few tasks, takes the **dense layout** instead (torch_dense.py, `use_dense`): all experts as one
  LoRA, each row's gates masking the others' columns; two GEMMs over all rows, no runs, no gather.

Forward saves h = drop(x) (x itself without dropout) and z = h A^T [M, (S+K) r]; the backward
makes, per run, four GEMMs (docs/design.md section 2), then folds the stacked weight gradients back
into the shared (summed over a cluster's tasks) and task parameters:

    dz_raw = dy B                  dB = dy^T (g * z)              dz = g * dz_raw
    dA = dz^T h                    dx = drop'(dz A)               dg[t, e] = sum over t's rows of <dz_raw_e, z_e>

Gates are folded with the scaling s into `g` ([(S+K) r] per task, or per row with per-token
gates), so no pass over y scales it. dgates is summed run by run, so a NaN in one task's gate or
rows reaches no other task. Matmuls run in x's dtype (fp32 accumulation inside the BLAS for
fp16 / bf16); results are deterministic run to run.

This file is the math: `forward_call` and `backward_call` on a RowPlan (`plan_for`). autograd.py
wraps them in an autograd Function (eager) and in custom ops (torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import torch_dense
from .routing import TaskRouting, host_list, tensor_cache, to_device
from .validation import CGCShapes

# Runs shorter than this on average (with more runs than tasks) are gathered into task order:
# below it, per-run GEMMs cost more in call overhead than one gather of the rows.
MIN_RUN = 16


@dataclass
class RowPlan:
    """How one call's rows map to tasks, on the host.

    runs:     [(task, start, end)] maximal runs of one task id >= 0, in row order
    covered:  the runs cover every row (no task -1 row)
    clusters: [T] cluster of each task, or None (one cluster)
    ids:      [M] int64 task ids (on the op's device), in plan order
    order:    [M] rows in task order when the rows were gathered, else None; inverse puts them back
    caller_ids, caller_runs: ids and runs in the caller's row order (the dense layout's; the
              same objects as ids and runs when nothing is gathered)
    dense:    force (True) or forbid (False) the dense layout; None decides per call (`use_dense`)
    """

    runs: list[tuple[int, int, int]]
    covered: bool
    clusters: tuple[int, ...] | None
    ids: torch.Tensor
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    caller_ids: torch.Tensor | None = None
    caller_runs: list[tuple[int, int, int]] | None = None
    dense: bool | None = None


def _runs(host_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(task, start, end)] maximal runs of one id in host_ids [M] (CPU), task -1 runs dropped."""
    M = host_ids.numel()
    if M == 0:
        return []
    values = host_ids.numpy()  # host values: numpy reads them without a dispatched (syncing) op
    bounds = (np.flatnonzero(values[1:] != values[:-1]) + 1).tolist()
    starts, ends = [0, *bounds], [*bounds, M]
    ids = values.tolist()  # once per routing (plans are cached on it)
    return [(ids[a], a, b) for a, b in zip(starts, ends, strict=True) if ids[a] >= 0]


def plan_rows(ids: torch.Tensor, host_ids: torch.Tensor | None = None, host_cluster: list[int] | None = None,
              gather: bool | None = None, dense: bool | None = None) -> RowPlan:
    """The RowPlan of ids [M] (checked, in [-1, T)). `host_ids`: the same ids on the CPU when the
    caller has them (else one device-to-host copy); `host_cluster`: [T] clusters or None (one
    cluster). `gather`: force (True) or forbid (False) sorting rows into task order (for the
    per-run layout); `dense`: force or forbid the dense layout."""
    host = ids if ids.device.type == "cpu" else host_ids if host_ids is not None else ids.cpu()
    M = host.numel()
    runs = caller_runs = _runs(host)
    caller_ids = ids
    if gather is None:
        gather = len(runs) > len({t for t, _, _ in runs}) and M < MIN_RUN * len(runs)
    order = inverse = None
    if gather:
        # Stable: the rows of each task keep their order (task -1 rows first, skipped).
        host, host_order = torch.sort(host, stable=True)
        host_inverse = torch.empty_like(host_order)
        host_inverse[host_order] = torch.arange(M)
        order, inverse = to_device(host_order, ids.device), to_device(host_inverse, ids.device)
        ids = ids[order]
        runs = _runs(host)
    covered = sum(b - a for _, a, b in runs) == M
    clusters = None if host_cluster is None else tuple(host_cluster)
    return RowPlan(runs, covered, clusters, ids, order, inverse, caller_ids, caller_runs, dense)


# ---- forward and backward on planned rows ------------------------------------------------------

def stacked_experts(shared_a, shared_b, task_a, task_b, task_cluster: list[int] | None):
    """(a_cat [T, (S+K) r, d_in], b_cat [T, d_out, (S+K) r]): each task's shared experts (of its
    cluster) and its own, stacked, so that one task is one LoRA of rank (S+K) r: one GEMM pair per
    run reads x and writes y once. Cheap: the weights, not the rows, are copied."""
    T = task_a.shape[0]
    if task_cluster is None:
        sa, sb = shared_a.expand(T, -1, -1), shared_b.expand(T, -1, -1)
    else:
        sa = torch.stack([shared_a[c] for c in task_cluster])
        sb = torch.stack([shared_b[c] for c in task_cluster])
    return torch.cat([sa, task_a], 1), torch.cat([sb, task_b], 2)


def _row_gates(plan: RowPlan, gates: torch.Tensor, per_token: bool, r: int, scaling: float,
               dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(g_task [T, (S+K) r] or None, g_rows [M, (S+K) r] or None): the gates times scaling,
    repeated over each expert's r rank columns; per task (one broadcast per run) or, with per-token
    gates, per row (plan order)."""
    if per_token:
        g = gates if plan.order is None else gates[plan.order]
        return None, (g.to(dtype) * scaling).repeat_interleave(r, dim=1)
    return (gates.to(dtype) * scaling).repeat_interleave(r, dim=1), None


def forward_rows(h: torch.Tensor, plan: RowPlan, gates: torch.Tensor, a_cat, b_cat, scaling: float,
                 per_token: bool, r: int, base: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """(y, z, g_task, g_rows) for h [M, d_in] in plan order: y = base + delta [M, d_out] (a new
    tensor; the delta alone without base), or `out` += delta in place; z = h a_cat[t]^T
    [M, (S+K) r] raw (rows of no task zero) for the backward. Per run: z = h A^T, then
    y = base + (g * z) B^T as one addmm, so base is never copied or added in a separate pass."""
    M, d_out = h.shape[0], b_cat.shape[1]
    g_task, g_rows = _row_gates(plan, gates, per_token, r, scaling, h.dtype)
    z = h.new_empty(M, a_cat.shape[1]) if plan.covered else h.new_zeros(M, a_cat.shape[1])
    if out is not None:
        y, inplace = out, True
    elif plan.covered:
        y, inplace = h.new_empty(M, d_out), False
    else:  # rows of no task keep base (or zero)
        y, inplace = (base.clone() if base is not None else h.new_zeros(M, d_out)), True
    for t, a, b in plan.runs:
        torch.mm(h[a:b], a_cat[t].T, out=z[a:b])
        u = z[a:b] * (g_rows[a:b] if per_token else g_task[t])
        if inplace:
            y[a:b].addmm_(u, b_cat[t].T)
        elif base is not None:
            torch.addmm(base[a:b], u, b_cat[t].T, out=y[a:b])
        else:
            torch.mm(u, b_cat[t].T, out=y[a:b])
    return y, z, g_task, g_rows


def backward_rows(dy: torch.Tensor, h: torch.Tensor, plan: RowPlan, gates, a_cat, b_cat, z, g_task, g_rows,
                  scaling: float, per_token: bool, S: int, r: int, task_cluster: list[int] | None,
                  num_clusters: int, need_x: bool, need_g: bool, need_a: bool, need_b: bool):
    """(dh, dgates, dshared_a, dshared_b, dtask_a, dtask_b) in plan order; None where not needed.
    Per run four GEMMs (dz = dy B, dB = dy^T (g z), dA = dz^T h, dh = dz A), each reading dy or h
    once; dgates is per task [T, S+K] (summed run by run, so a NaN in one task's rows reaches only
    its gates), or per row [M, S+K] (plan order) with per-token gates."""
    M, T = h.shape[0], a_cat.shape[0]
    E = a_cat.shape[1] // r
    dh = (h.new_empty if plan.covered else h.new_zeros)(M, h.shape[1]) if need_x else None
    da = torch.zeros_like(a_cat) if need_a else None  # per task, stacked; folded into shared / task below
    db = torch.zeros_like(b_cat) if need_b else None
    dg = None
    if need_g:
        dg = h.new_zeros(M, E) if per_token else h.new_zeros(T, E)
    for t, a, b in plan.runs:
        g = g_rows[a:b] if per_token else g_task[t]
        dz_raw = dy[a:b] @ b_cat[t]  # [m, (S+K) r]
        if need_b:
            db[t].addmm_(dy[a:b].T, z[a:b] * g)
        if need_g:
            prod = (dz_raw * z[a:b]).view(b - a, E, r).sum(-1)
            if per_token:
                dg[a:b] = prod
            else:
                dg[t] += prod.sum(0)
        dz = dz_raw * g
        if need_a:
            da[t].addmm_(dz.T, h[a:b])
        if need_x:
            torch.mm(dz, a_cat[t], out=dh[a:b])
    if dg is not None:
        dg = (dg * scaling).to(gates.dtype)
    dsa = dsb = dta = dtb = None
    if need_a:
        dsa, dta = _fold(da, S * r, 1, task_cluster, num_clusters)
    if need_b:
        dsb, dtb = _fold(db, S * r, 2, task_cluster, num_clusters)
    return dh, dg, dsa, dsb, dta, dtb


def _fold(d_cat: torch.Tensor, split: int, dim: int, task_cluster: list[int] | None, num_clusters: int):
    """Per-task stacked gradients [T, ...] -> (shared [C, ...] summed over each cluster's tasks, task [T, ...])."""
    d_shared, d_task = d_cat.narrow(dim, 0, split), d_cat.narrow(dim, split, d_cat.shape[dim] - split)
    if task_cluster is None:
        shared = d_shared.sum(0, keepdim=True)
    else:
        shared = d_shared.new_zeros(num_clusters, *d_shared.shape[1:])
        for t, c in enumerate(task_cluster):
            shared[c] += d_shared[t]
    return shared, d_task.contiguous()


# ---- whole calls: plan, permute, dropout -------------------------------------------------------

def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


def use_dense(plan: RowPlan, x: torch.Tensor, shp: CGCShapes) -> bool:
    """Whether this call takes the dense layout (torch_dense.py): forced by the plan, else on the
    CPU for a training-sized batch (at least DENSE_MIN_ROWS rows) whose rows interleave (more runs
    than tasks: sequences in the caller's order), every row with a task, while all experts stacked
    (C S + T K of them) are at most DENSE_RANK_RATIO times one task's S + K. Rows grouped by task
    (one run each) and small decode batches keep the per-run layout, which is as fast or faster."""
    if plan.dense is not None:
        return plan.dense and plan.covered
    C, T, S, K = shp.C, shp.T, shp.S, shp.K
    return (x.device.type == "cpu" and plan.covered and len(plan.caller_runs) > T
            and plan.caller_ids.shape[0] >= DENSE_MIN_ROWS and C * S + T * K <= DENSE_RANK_RATIO * (S + K))


# Measured on SmolLM2-135M's layers on the 2-core CPU (BENCHMARKS.md): 4 tasks (ratio 2) interleaved
# sequence by sequence, a training step at 1.05x one PEFT LoRA dense against 1.12x-1.18x per run;
# grouped rows even; 8 tasks (ratio 3.3) per run faster; a 16-row decode dense 1.1x slower.
DENSE_RANK_RATIO = 2.0
DENSE_MIN_ROWS = 256


def _members(plan: RowPlan, C: int, T: int, per_token: bool, device):
    """(cluster_member, task_member): bool [N, C] and [N, T], which cluster's and task's gate block
    each gate row fills: N = T tasks (per-task gates) or N = M rows (per-token gates)."""
    clusters = torch.tensor(plan.clusters if plan.clusters is not None else [0] * T, device=device)
    task_cluster = clusters[:, None] == torch.arange(C, device=device)  # [T, C]
    if not per_token:
        return task_cluster, torch.eye(T, dtype=torch.bool, device=device)
    row_task = plan.caller_ids[:, None] == torch.arange(T, device=device)  # [M, T]
    if C == 1:
        return row_task.any(1, keepdim=True), row_task
    return (row_task[:, :, None] & task_cluster[None]).any(1), row_task


class SavedForward(NamedTuple):
    """What forward_call keeps for backward_call. Per-run layout: z [M, (S+K) r], the gates per task
    (g_task [T, (S+K) r]) or per row (g_rows), each task's stacked experts (a [T, (S+K) r, d_in],
    b [T, d_out, (S+K) r]). Dense layout (dense=True): z [M, R], each row's gate row g_rows [M, R],
    all experts as one LoRA (a [R, d_in], b [d_out, R])."""

    h: torch.Tensor  # drop(x) [M, d_in], in plan order
    mask: torch.Tensor | None  # the dropout keep-mask [M, d_in] (caller order), None without dropout
    z: torch.Tensor
    g_task: torch.Tensor | None
    g_rows: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    dense: bool


def _dense_forward(h, mask, plan: RowPlan, shp: CGCShapes, gates, a_all, b_all, scaling, per_token, base, out):
    cluster_member, task_member = _members(plan, shp.C, shp.T, per_token, h.device)
    table = torch_dense.gate_table(gates, cluster_member, task_member, shp.S, shp.r, scaling, h.dtype)
    g = table if per_token else torch_dense.gate_rows(plan.caller_ids, plan.caller_runs, table)
    direct = _same_dtype(h, base, out)
    y, z = torch_dense.forward(h, g, a_all, b_all, base=base if direct else None, out=out if direct else None)
    return (y if direct else add_to(y, base, out)), SavedForward(h, mask, z, None, g, a_all, b_all, True)


def _dense_backward(dy, plan: RowPlan, shp: CGCShapes, saved: SavedForward, gates, scaling, per_token, needs):
    h, z, g, a_all, b_all = saved.h, saved.z, saved.g_rows, saved.a, saved.b
    C, T, S, K, r = shp.C, shp.T, shp.S, shp.K, shp.r
    need_x, need_g, need_a, need_b = needs
    dh, dg_rows, da_all, db_all = torch_dense.backward(dy.to(h.dtype).contiguous(), h, g, z, a_all, b_all,
                                                       need_x, need_g, need_a, need_b)
    dg = None
    if need_g:
        per_expert = torch_dense.expert_sums(dg_rows, r)  # [M, C S + T K]
        if not per_token:
            per_expert = torch_dense.per_task_sums(plan.caller_ids, plan.caller_runs, per_expert, T)
        cluster_member, task_member = _members(plan, C, T, per_token, h.device)
        dg = (torch_dense.own_gates(per_expert, cluster_member, task_member, S) * scaling).to(gates.dtype)
    return (dh, dg, *torch_dense.unstack_all_grads(da_all, db_all, C, T, S * r, K * r))


def _same_dtype(h: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None) -> bool:
    """Whether base / out (when given) share h's dtype, so the GEMMs can write base + delta directly."""
    return (out is None or out.dtype == h.dtype) and (base is None or base.dtype == h.dtype)


def add_to(delta: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """out += delta (returned), base + delta, or delta alone, each in base's / out's dtype."""
    if out is not None:
        return out.add_(delta.to(out.dtype))
    return delta if base is None else base + delta.to(base.dtype)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def forward_call(x, plan: RowPlan, shp: CGCShapes, gates, shared_a, shared_b, task_a, task_b, scaling,
                 per_token, dropout_p, mask=None, base=None, out=None) -> tuple[torch.Tensor, SavedForward]:
    """(y [M, d_out] in caller order, saved): y = base + delta, the delta alone, or `out` += delta
    (returned); saved for backward_call."""
    if dropout_p > 0 and mask is None:
        mask = _dropout_mask(x, dropout_p)
    h = x if mask is None else x * mask / (1.0 - dropout_p)
    if use_dense(plan, x, shp):
        a_all, b_all = torch_dense.stack_all_experts(shared_a, shared_b, task_a, task_b)
        if _finite(a_all, b_all):  # else 0 * inf would reach every row: the per-run layout
            return _dense_forward(h, mask, plan, shp, gates, a_all, b_all, scaling, per_token, base, out)
    a_cat, b_cat = stacked_experts(shared_a, shared_b, task_a, task_b, plan.clusters)
    if plan.order is not None:
        h = h[plan.order]
    direct = plan.order is None and _same_dtype(h, base, out)
    y, z, g_task, g_rows = forward_rows(h, plan, gates, a_cat, b_cat, scaling, per_token, shp.r,
                                        base=base if direct else None, out=out if direct else None)
    if not direct:  # gathered rows (or a base / out of another dtype): the delta, put back, then added
        y = add_to(y[plan.inverse] if plan.order is not None else y, base, out)
    return y, SavedForward(h, mask, z, g_task, g_rows, a_cat, b_cat, False)


def backward_call(dy, plan: RowPlan, shp: CGCShapes, saved: SavedForward, gates, scaling, per_token, dropout_p,
                  needs):
    """The six gradients of forward_call (x, gates, shared_a, shared_b, task_a, task_b) in caller
    order, None where not needed; base's gradient is dy itself. needs = [x, gates, A (both sides),
    B (both sides)]."""
    mask = saved.mask
    if saved.dense:
        dh, dg, dsa, dsb, dta, dtb = _dense_backward(dy, plan, shp, saved, gates, scaling, per_token, needs)
    else:
        dy = dy.to(saved.h.dtype)
        if plan.order is not None:
            dy = dy[plan.order]
        dh, dg, dsa, dsb, dta, dtb = backward_rows(
            dy.contiguous(), saved.h, plan, gates, saved.a, saved.b, saved.z, saved.g_task, saved.g_rows,
            scaling, per_token, shp.S, shp.r, plan.clusters, shp.C, *needs)
        if plan.order is not None:
            dh = dh[plan.inverse] if dh is not None else None
            dg = dg[plan.inverse] if dg is not None and per_token else dg
    if dh is not None and mask is not None:
        dh = dh * mask / (1.0 - dropout_p)
    return dh, dg, dsa, dsb, dta, dtb


def plan_for(task_ids: torch.Tensor | TaskRouting, ids: torch.Tensor, task_cluster: torch.Tensor | None) -> RowPlan:
    """The RowPlan of a call: one per routing, or per plain id tensor (kept in its cache), so the
    layers of one forward share it; a routing from CGCModel carries the ids on the host, so no id
    is copied from a device."""
    routing = task_ids if isinstance(task_ids, TaskRouting) else None
    host_cluster = None if task_cluster is None else host_list(task_cluster)
    cache = routing.cache if routing is not None else tensor_cache(task_ids)
    key = ("torch_backend.plan", host_cluster)
    if key not in cache:
        cache[key] = plan_rows(ids, routing.host_task_ids if routing is not None else None, host_cluster)
    return cache[key]
