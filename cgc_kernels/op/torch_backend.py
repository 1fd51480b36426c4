"""The fast PyTorch backend of `cgc_lora`: the CPU path, and CUDA shapes the kernels do not take.

Same math as reference.py (the spec), laid out for few, large GEMMs and a hand-written backward:

* Rows are cut into **runs**: maximal stretches of consecutive rows with one task id. A model that
  lays its batch out grouped by task (CGCModel, CGCDataCollator, the training loop) gives one run
  per task, so every task's rows are a slice of x: no gather, scatter or index_add anywhere.
* **Shared experts**: one GEMM pair over all of a cluster's rows (with one cluster: all rows), the
  per-row gate of each rank column applied as one multiply by `ws [M, S r]`.
* **Task experts**: one GEMM pair per run, written into slices of preallocated outputs.
* Rows that truly interleave (many runs shorter than `MIN_RUN` rows, e.g. per-token task ids or
  a decode batch in caller order) are stably sorted by task once per call, computed as above,
  and put back: a gather in and a gather out, on x / y forward and dy / dx backward.

Forward saves h = drop(x) (x itself without dropout), z_s = h A_s^T [M, S r], z_t = h A_t^T
[M, K r] and the per-row gates; the backward makes dz = dy B once per side and from it dx, dA, dB
and dgates, all as slices and GEMMs (DESIGN.md section 2):

    dz_raw = dy B                  dB = dy^T (g * z)              dz = g * dz_raw
    dA = dz^T h                    dx = drop'(dz A)               dg[t, e] = sum over t's rows of <dz_raw_e, z_e>

Gates are folded with the scaling s into `g`, so no pass over y scales it. Task gates reach their
rows run by run and dgates is summed run by run, so a NaN in one task's gate or rows reaches no
other task. Matmuls run in x's dtype (fp32
accumulation inside the BLAS for fp16 / bf16); results are deterministic run to run.

Eager calls go through the autograd Function `_TorchCGCLoRA` (a plain Python call without
autograd); under torch.compile the same two functions run as the custom ops
`cgc_kernels::torch_fwd` / `cgc_kernels::torch_bwd`, opaque to the compiler, so the graph has
fixed shapes whatever the batch's task mix (data-dependent row counts stay inside the op).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import TaskRouting

# Runs shorter than this on average (with more runs than tasks) are gathered into task order:
# below it, per-run GEMMs cost more in call overhead than one gather of the rows.
MIN_RUN = 16


@dataclass
class RowPlan:
    """How one call's rows map to tasks, on the host.

    runs:         [(task, start, end)] maximal runs of one task id >= 0, in row order
    cluster_runs: [(cluster, start, end)] row ranges for the shared experts: all rows with one
                  cluster, else maximal runs of rows whose tasks share a cluster
    covered:      cluster_runs cover every row (no task -1 row is left out)
    ids:          [M] int64 task ids (on the op's device)
    order:        [M] rows in task order when the rows were gathered, else None
    """

    runs: list[tuple[int, int, int]]
    cluster_runs: list[tuple[int, int, int]]
    covered: bool
    ids: torch.Tensor
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None


def _runs(host_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(task, start, end)] maximal runs of one id in host_ids [M] (CPU), task -1 runs dropped."""
    M = host_ids.numel()
    if M == 0:
        return []
    bounds = torch.nonzero(host_ids[1:] != host_ids[:-1]).flatten().add_(1).tolist()
    starts, ends = [0, *bounds], [*bounds, M]
    ids = host_ids.tolist()  # once per routing (plans are cached on it)
    return [(ids[a], a, b) for a, b in zip(starts, ends, strict=True) if ids[a] >= 0]


def plan_rows(ids: torch.Tensor, host_ids: torch.Tensor | None = None, host_cluster: list[int] | None = None,
              gather: bool | None = None) -> RowPlan:
    """The RowPlan of ids [M] (checked, in [-1, T)). `host_ids`: the same ids on the CPU when the
    caller has them (else one device-to-host copy); `host_cluster`: [T] clusters or None (one
    cluster). `gather`: force (True) or forbid (False) sorting rows into task order."""
    host = ids if ids.device.type == "cpu" else host_ids if host_ids is not None else ids.cpu()
    M = host.numel()
    runs = _runs(host)
    if gather is None:
        gather = len(runs) > len({t for t, _, _ in runs}) and M < MIN_RUN * len(runs)
    order = inverse = None
    if gather:
        # Stable: the rows of each task keep their order (task -1 rows first, skipped).
        host, host_order = torch.sort(host, stable=True)
        host_inverse = torch.empty_like(host_order)
        host_inverse[host_order] = torch.arange(M)
        order, inverse = host_order.to(ids.device), host_inverse.to(ids.device)
        ids = ids[order]
        runs = _runs(host)
    if host_cluster is None:
        cluster_runs, covered = [(0, 0, M)], True
    else:
        cluster_runs = []
        for t, a, b in runs:
            c = host_cluster[t]
            if cluster_runs and cluster_runs[-1][0] == c and cluster_runs[-1][2] == a:
                cluster_runs[-1] = (c, cluster_runs[-1][1], b)
            else:
                cluster_runs.append((c, a, b))
        covered = sum(b - a for _, a, b in cluster_runs) == M
    return RowPlan(runs, cluster_runs, covered, ids, order, inverse)


# ---- forward and backward on planned rows ------------------------------------------------------

def _row_gates(plan: RowPlan, gates: torch.Tensor, per_token: bool, S: int, r: int, scaling: float,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(g_task [T, (S+K) r] or None, ws [M, S r] (zero rows for task -1), wt [M, K r] or None):
    gates times scaling, repeated over each expert's r rank columns. Task gates reach the rows
    run by run (a broadcast copy per run, no gather), and a NaN in one task's gate stays there."""
    M = plan.ids.shape[0]
    if per_token:
        g = gates if plan.order is None else gates[plan.order]
        rows = (g.to(dtype) * scaling).repeat_interleave(r, dim=1)
        rows = torch.where((plan.ids >= 0).unsqueeze(1), rows, 0.0)
        return None, rows[:, : S * r], rows[:, S * r:]
    g_task = (gates.to(dtype) * scaling).repeat_interleave(r, dim=1)  # [T, (S+K) r]
    ws = None
    if S > 0:
        ws = torch.empty(M, S * r, dtype=dtype, device=plan.ids.device)
        if sum(b - a for _, a, b in plan.runs) < M:
            ws.zero_()
        for t, a, b in plan.runs:
            ws[a:b] = g_task[t, : S * r]
    return g_task, ws, None


def forward_rows(h: torch.Tensor, plan: RowPlan, gates: torch.Tensor, shared_a, shared_b, task_a, task_b,
                 scaling: float, per_token: bool, S: int, K: int, r: int):
    """y [M, d_out] and what the backward needs, for h [M, d_in] in plan order."""
    M, d_out, dt = h.shape[0], shared_b.shape[1], h.dtype
    g_task, ws, wt = _row_gates(plan, gates, per_token, S, r, scaling, dt)
    y = h.new_empty(M, d_out)
    shared_writes = S > 0 and plan.covered
    if not shared_writes:
        y.zero_()
    zs = zt = None
    if S > 0:
        zs = h.new_empty(M, S * r) if plan.covered else h.new_zeros(M, S * r)
        for c, a, b in plan.cluster_runs:
            torch.mm(h[a:b], shared_a[c].T, out=zs[a:b])
            u = zs[a:b] * ws[a:b]
            if shared_writes:
                torch.mm(u, shared_b[c].T, out=y[a:b])
            else:
                y[a:b].addmm_(u, shared_b[c].T)
    if K > 0:
        zt = h.new_zeros(M, K * r)  # task -1 rows stay zero (their dgates share is zero)
        for t, a, b in plan.runs:
            torch.mm(h[a:b], task_a[t].T, out=zt[a:b])
            g = wt[a:b] if per_token else g_task[t, S * r:]
            y[a:b].addmm_(zt[a:b] * g, task_b[t].T)
    return y, zs, zt, ws, wt, g_task


def backward_rows(dy: torch.Tensor, h: torch.Tensor, plan: RowPlan, gates, shared_a, shared_b, task_a, task_b,
                  zs, zt, ws, wt, g_task, scaling: float, per_token: bool, S: int, K: int, r: int,
                  need_x: bool, need_g: bool, need_a: bool, need_b: bool):
    """(dh, dgates, dshared_a, dshared_b, dtask_a, dtask_b) in plan order; None where not needed.
    dgates is per task [T, S+K], or per row [M, S+K] (plan order) with per-token gates."""
    M = h.shape[0]
    T = task_a.shape[0]
    dh = None
    if need_x:
        dh = h.new_empty(M, h.shape[1]) if S > 0 and plan.covered else h.new_zeros(M, h.shape[1])
    dsa = torch.zeros_like(shared_a) if need_a else None
    dsb = torch.zeros_like(shared_b) if need_b else None
    dta = torch.zeros_like(task_a) if need_a else None
    dtb = torch.zeros_like(task_b) if need_b else None
    g_rows = h.new_zeros(M, S + K) if need_g else None  # per row: sum over its rank block of dz_raw * z
    if S > 0:
        for c, a, b in plan.cluster_runs:
            dz_raw = dy[a:b] @ shared_b[c]  # [m, S r]
            if need_b:
                dsb[c].addmm_(dy[a:b].T, zs[a:b] * ws[a:b])
            if need_g:
                g_rows[a:b, :S] = (dz_raw * zs[a:b]).view(b - a, S, r).sum(-1)
            dz = dz_raw * ws[a:b]
            if need_a:
                dsa[c].addmm_(dz.T, h[a:b])
            if need_x:
                if plan.covered:
                    torch.mm(dz, shared_a[c], out=dh[a:b])
                else:
                    dh[a:b].addmm_(dz, shared_a[c])
    if K > 0:
        for t, a, b in plan.runs:
            g = wt[a:b] if per_token else g_task[t, S * r:]
            dz_raw = dy[a:b] @ task_b[t]  # [m, K r]
            if need_b:
                dtb[t].addmm_(dy[a:b].T, zt[a:b] * g)
            if need_g:
                g_rows[a:b, S:] = (dz_raw * zt[a:b]).view(b - a, K, r).sum(-1)
            dz = dz_raw * g
            if need_a:
                dta[t].addmm_(dz.T, h[a:b])
            if need_x:
                dh[a:b].addmm_(dz, task_a[t])
    dg = None
    if need_g:
        g_rows = g_rows * scaling
        if per_token:
            dg = g_rows
        else:  # per-task sums, run by run (a NaN in one task's rows reaches only that task's gates)
            dg = h.new_zeros(T, S + K)
            for t, a, b in plan.runs:
                dg[t] += g_rows[a:b].sum(0)
        dg = dg.to(gates.dtype)
    return dh, dg, dsa, dsb, dta, dtb


# ---- whole calls: plan, permute, dropout -------------------------------------------------------

def _sizes(gates, shared_a, task_a):
    E = gates.shape[1]
    r = (shared_a.shape[1] + task_a.shape[1]) // E
    return shared_a.shape[1] // r, task_a.shape[1] // r, r


def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


def forward_call(x, plan: RowPlan, gates, shared_a, shared_b, task_a, task_b, scaling, per_token, dropout_p,
                 mask=None):
    """(y [M, d_out] in caller order, saved): saved = (h, mask, zs, zt, ws, wt, g_task), h in plan order."""
    S, K, r = _sizes(gates, shared_a, task_a)
    if dropout_p > 0 and mask is None:
        mask = _dropout_mask(x, dropout_p)
    h = x if mask is None else x * mask / (1.0 - dropout_p)
    if plan.order is not None:
        h = h[plan.order]
    y, zs, zt, ws, wt, g_task = forward_rows(h, plan, gates, shared_a, shared_b, task_a, task_b, scaling,
                                             per_token, S, K, r)
    if plan.order is not None:
        y = y[plan.inverse]
    return y, (h, mask, zs, zt, ws, wt, g_task)


def backward_call(dy, plan: RowPlan, saved, gates, shared_a, shared_b, task_a, task_b, scaling, per_token,
                  dropout_p, needs):
    """The six gradients of forward_call in caller order (None where not needed)."""
    h, mask, zs, zt, ws, wt, g_task = saved
    S, K, r = _sizes(gates, shared_a, task_a)
    dy = dy.to(h.dtype)
    if plan.order is not None:
        dy = dy[plan.order]
    dh, dg, dsa, dsb, dta, dtb = backward_rows(
        dy.contiguous(), h, plan, gates, shared_a, shared_b, task_a, task_b, zs, zt, ws, wt, g_task,
        scaling, per_token, S, K, r, *needs)
    if plan.order is not None:
        dh = dh[plan.inverse] if dh is not None else None
        dg = dg[plan.inverse] if dg is not None and per_token else dg
    if dh is not None and mask is not None:
        dh = dh * mask / (1.0 - dropout_p)
    return dh, dg, dsa, dsb, dta, dtb


class _TorchCGCLoRA(torch.autograd.Function):
    """Eager autograd for the backend: forward_call, and backward_call as its hand-written backward."""

    @staticmethod
    def forward(ctx, x, gates, shared_a, shared_b, task_a, task_b, plan, scaling, per_token, dropout_p):
        y, saved = forward_call(x, plan, gates, shared_a, shared_b, task_a, task_b, scaling, per_token,
                                dropout_p)
        h, mask, zs, zt, ws, wt, g_task = saved
        ctx.plan, ctx.scaling, ctx.per_token, ctx.dropout_p = plan, scaling, per_token, dropout_p
        ctx.has = [t is not None for t in saved]
        ctx.save_for_backward(gates, shared_a, shared_b, task_a, task_b, *[t for t in saved if t is not None])
        return y

    @staticmethod
    def backward(ctx, dy):
        gates, shared_a, shared_b, task_a, task_b, *rest = ctx.saved_tensors
        it = iter(rest)
        saved = [next(it) if has else None for has in ctx.has]
        n_x, n_g, n_sa, n_sb, n_ta, n_tb = ctx.needs_input_grad[:6]
        needs = (n_x, n_g, n_sa or n_ta, n_sb or n_tb)
        dx, dg, dsa, dsb, dta, dtb = backward_call(
            dy, ctx.plan, saved, gates, shared_a, shared_b, task_a, task_b, ctx.scaling, ctx.per_token,
            ctx.dropout_p, needs)
        pick = lambda g, need: g if need else None
        return (pick(dx, n_x), pick(dg, n_g), pick(dsa, n_sa), pick(dsb, n_sb), pick(dta, n_ta),
                pick(dtb, n_tb), None, None, None, None)


# ---- custom ops: the same functions, opaque to torch.compile ----------------------------------

Tensor = torch.Tensor


def _op_plan(ids: Tensor, task_cluster: Tensor | None) -> RowPlan:
    return plan_rows(ids, None, None if task_cluster is None else task_cluster.tolist())


@torch.library.custom_op("cgc_kernels::torch_fwd", mutates_args=())
def _torch_fwd(x: Tensor, ids: Tensor, gates: Tensor, shared_a: Tensor, shared_b: Tensor, task_a: Tensor,
               task_b: Tensor, task_cluster: Tensor | None, scaling: float, per_token_gates: bool,
               dropout_p: float) -> tuple[Tensor, Tensor]:
    """(y [M, d_out], keep-mask [M, d_in] bool, empty without dropout)."""
    plan = _op_plan(ids, task_cluster)
    y, (_, mask, *_) = forward_call(x, plan, gates, shared_a, shared_b, task_a, task_b, scaling,
                                    per_token_gates, dropout_p)
    return y, mask if mask is not None else x.new_empty(0, dtype=torch.bool)


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
    plan = _op_plan(ids, task_cluster)
    _, saved = forward_call(x, plan, gates, shared_a, shared_b, task_a, task_b, scaling, per_token_gates,
                            dropout_p, mask=mask if dropout_p > 0 else None)
    grads = backward_call(dy, plan, saved, gates, shared_a, shared_b, task_a, task_b, scaling,
                          per_token_gates, dropout_p, needs)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_torch_bwd.register_fake
def _(dy, x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, mask, scaling, per_token_gates,
      dropout_p, needs):
    need_x, need_g, need_a, need_b = needs
    like = lambda t, need: torch.empty_like(t) if need else x.new_empty(0)
    return [like(x, need_x), like(gates, need_g), like(shared_a, need_a), like(shared_b, need_b),
            like(task_a, need_a), like(task_b, need_b)]


def _setup_context(ctx, inputs, output):
    x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, scaling, per_token, dropout_p = inputs
    ctx.save_for_backward(x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, output[1])
    ctx.scaling, ctx.per_token, ctx.dropout_p = scaling, per_token, dropout_p


def _backward(ctx, dy, _dmask):
    x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, mask = ctx.saved_tensors
    n_x, _, n_g, n_sa, n_sb, n_ta, n_tb = ctx.needs_input_grad[:7]
    needs = [n_x, n_g, n_sa or n_ta, n_sb or n_tb]
    rest = (None,) * 4  # task_cluster, scaling, per_token_gates, dropout_p
    if not any(needs):
        return (None,) * 7 + rest
    dx, dg, dsa, dsb, dta, dtb = torch.ops.cgc_kernels.torch_bwd(
        dy, x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster, mask, ctx.scaling, ctx.per_token,
        ctx.dropout_p, needs)
    pick = lambda g, need: g if need else None
    return (pick(dx, n_x), None, pick(dg, n_g), pick(dsa, n_sa), pick(dsb, n_sb), pick(dta, n_ta),
            pick(dtb, n_tb), *rest)


_torch_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- entry point ---------------------------------------------------------------------------------

def cgc_lora_torch(x, task_ids: torch.Tensor | TaskRouting, gates, shared_a, shared_b, task_a, task_b,
                   scaling: float, *, task_cluster: torch.Tensor | None, per_token_gates: bool,
                   dropout_p: float) -> torch.Tensor:
    """The delta [M, d_out] for checked arguments (dispatch.py validates). A TaskRouting carries
    the row plan across layers (built by the first, reused by the rest) and, from CGCModel, the ids
    on the host, so no layer copies ids from a device."""
    routing = task_ids if isinstance(task_ids, TaskRouting) else None
    ids = (routing.task_ids if routing is not None else task_ids).to(torch.int64)
    if torch.compiler.is_compiling():
        y, _ = torch.ops.cgc_kernels.torch_fwd(x, ids, gates, shared_a, shared_b, task_a, task_b, task_cluster,
                                               float(scaling), bool(per_token_gates), float(dropout_p))
        return y
    host_cluster = None if task_cluster is None else tuple(task_cluster.tolist())
    if routing is None:
        plan = plan_rows(ids, None, host_cluster)
    else:
        key = ("torch_backend.plan", host_cluster)
        plan = routing.cache.get(key)
        if plan is None:
            plan = routing.cache[key] = plan_rows(ids, routing.host_task_ids, host_cluster)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gates, shared_a, shared_b, task_a, task_b))
    if not needs_grad:
        return forward_call(x, plan, gates, shared_a, shared_b, task_a, task_b, scaling, per_token_gates,
                            dropout_p)[0]
    return _TorchCGCLoRA.apply(x, gates, shared_a, shared_b, task_a, task_b, plan, float(scaling),
                               bool(per_token_gates), float(dropout_p))
