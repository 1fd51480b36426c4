"""The fast PyTorch backend against the naive loop oracle and the reference: outputs, every
gradient, rows in runs or interleaved (the gathered path), dropout through a given mask, fp16/bf16,
and that the contiguous path really has no gather, scatter or index_add."""

from __future__ import annotations

import pytest
import torch

import cgc_kernels
from cgc_kernels import build_routing, reference
from cgc_kernels.op import autograd, torch_backend
from cgc_kernels.op.validation import CGCShapes, shapes_of
from tests.cases import DIFF, TOLERANCES, Case, make_inputs
from tests.oracle import naive_cgc_lora

CASES = [
    Case(M=7, d_in=5, d_out=6, T=1, S=0, K=1, r=3),  # plain LoRA
    Case(M=9, d_in=8, d_out=4, T=3, S=0, K=1, r=2),  # multi-LoRA: task experts only
    Case(M=9, d_in=8, d_out=4, T=3, S=4, K=0, r=2),  # MOELoRA: shared experts only
    Case(M=40, d_in=6, d_out=7, T=3, S=2, K=1, r=2),  # CGC-LoRA, interleaved rows
    Case(M=30, d_in=6, d_out=5, T=4, S=2, K=2, r=1, C=2),  # two clusters
    Case(M=30, d_in=6, d_out=5, T=4, S=2, K=2, r=1, C=2, ids="with_unrouted"),  # clusters + task -1
    Case(M=24, d_in=5, d_out=3, T=3, S=1, K=1, r=2, ids="with_unrouted"),  # task -1 rows
    Case(M=20, d_in=7, d_out=9, T=3, S=2, K=1, r=2, per_token_gates=True),  # per-token gates
    Case(M=8, d_in=33, d_out=65, T=2, S=1, K=2, r=3),  # odd dimensions
    Case(M=1, d_in=4, d_out=3, T=2, S=1, K=1, r=2),  # a single token (decode)
    Case(M=0, d_in=4, d_out=3, T=2, S=1, K=1, r=2),  # empty batch
    Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2, ids="skip_task"),  # a task with no tokens
    Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2, ids="all_unrouted"),  # nothing routed
    Case(M=12, d_in=4, d_out=3, T=3, S=1, K=1, r=2, ids="one_task"),  # one run
]
LAYOUTS = ["as_drawn", "grouped", "sequences", "gathered"]


def _layout(args: dict, layout: str) -> tuple[dict, bool | None]:
    """Reorder the rows: grouped by task (one run each), in sequences of 4 rows of one task, or as
    drawn; "gathered" forces the sorted (gather) path. Returns (args, gather)."""
    ids = args["task_ids"]
    M = ids.shape[0]
    if layout == "grouped":
        perm = torch.sort(ids, stable=True).indices
    elif layout == "sequences":
        ids = ids[torch.arange(M) // 4 * 4] if M else ids  # each block of 4 rows takes its first row's task
        perm = torch.arange(M)
        args = dict(args, task_ids=ids)
    else:
        perm = torch.arange(M)
    out = dict(args)
    out["task_ids"] = args["task_ids"][perm]
    out["x"] = args["x"][perm]
    if args["per_token_gates"]:
        out["gates"] = args["gates"][perm]
    return out, (True if layout == "gathered" else None)


def _grads(fn, args: dict, dy: torch.Tensor):
    a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    y = fn(a)
    y.backward(dy)
    return y.detach(), [a[k].grad for k in DIFF]


def _torch_call(gather, dense):
    def call(a):
        ids = a["task_ids"]
        cluster = a["task_cluster"]
        plan = torch_backend.plan_rows(ids, None, None if cluster is None else cluster.tolist(), gather=gather,
                                       dense=dense)
        shp = shapes_of(a["x"], a["gates"], a["shared_a"], a["task_a"], a["task_b"])
        return autograd.TorchCGCLoRA.apply(
            a["x"], a["gates"], a["shared_a"], a["shared_b"], a["task_a"], a["task_b"], None, plan, shp,
            a["scaling"], a["per_token_gates"], 0.0)
    return call


@pytest.mark.parametrize("dense", [False, True], ids=["per_run", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_oracle_and_gradients_match_reference(case, layout, dense):
    if dense and layout == "gathered":
        pytest.skip("the dense layout never gathers rows")
    args, gather = _layout(make_inputs(case, torch.float64), layout)
    want = naive_cgc_lora(args["x"], args["task_ids"], args["gates"], args["shared_a"], args["shared_b"],
                          args["task_a"], args["task_b"], args["scaling"], task_cluster=args["task_cluster"],
                          per_token_gates=args["per_token_gates"])
    dy = torch.randn(case.M, case.d_out, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, grads = _grads(_torch_call(gather, dense), args, dy)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(y, want, **tol)
    _, want_grads = _grads(lambda a: reference.cgc_lora(**a), args, dy)
    for name, g, w in zip(DIFF, grads, want_grads, strict=True):
        w = torch.zeros_like(args[name]) if w is None else w  # the reference leaves unused experts None
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("ids", ["grouped", "random", "with_unrouted"])
def test_base_plus_delta_in_one_pass_and_base_gets_dy(ids):
    """base= folds the base output into the per-run addmm (grouped), or adds it after the rows are
    put back (gathered): either way y = base + delta and base's gradient is dy."""
    case = Case(M=40, d_in=12, d_out=10, T=3, S=2, K=1, r=2, C=2, ids="random" if ids == "grouped" else ids)
    args = make_inputs(case, torch.float64)
    if ids == "grouped":
        args["task_ids"] = args["task_ids"].sort().values
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(case.M, case.d_out, dtype=torch.float64, generator=gen, requires_grad=True)
    x = args["x"].clone().requires_grad_()
    y = cgc_kernels.cgc_lora(**{**args, "x": x}, base=base, backend="torch")
    want = base.detach() + naive_cgc_lora(args["x"], args["task_ids"], args["gates"], args["shared_a"],
                                          args["shared_b"], args["task_a"], args["task_b"], args["scaling"],
                                          task_cluster=args["task_cluster"])
    torch.testing.assert_close(y.detach(), want, **TOLERANCES[torch.float64])
    dy = torch.randn(case.M, case.d_out, dtype=torch.float64, generator=gen)
    y.backward(dy)
    torch.testing.assert_close(base.grad, dy)
    x_ref = args["x"].clone().requires_grad_()
    reference.cgc_lora(**{**args, "x": x_ref}).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_through_the_public_op(dtype):
    case = Case(M=48, d_in=24, d_out=12, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted")
    args = make_inputs(case, dtype, seed=1)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(2)).to(dtype)
    y, grads = _grads(lambda a: cgc_kernels.cgc_lora(**a, backend="torch"), args, dy)
    assert y.dtype == dtype
    args64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
              for k, v in args.items()}
    y64, grads64 = _grads(lambda a: reference.cgc_lora(**a), args64, dy.double())
    tol = TOLERANCES[dtype]
    for name, g, w in zip(("y", *DIFF), [y, *grads], [y64, *grads64], strict=True):
        scale = w.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(g.double() / scale, w / scale, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_dropout_uses_the_mask_in_forward_and_backward():
    case = Case(M=20, d_in=8, d_out=4, T=2, S=1, K=1, r=2)
    args = make_inputs(case)
    mask = torch.rand(case.M, case.d_in, generator=torch.Generator().manual_seed(3)) > 0.3
    plan = torch_backend.plan_rows(args["task_ids"])
    x = args["x"].clone().requires_grad_()
    shp = CGCShapes(M=case.M, d_in=case.d_in, d_out=case.d_out, T=case.T, C=1, S=case.S, K=case.K, r=case.r)
    y, saved = torch_backend.forward_call(x.detach(), plan, shp, args["gates"], args["shared_a"],
                                          args["shared_b"], args["task_a"], args["task_b"], 2.0, False, 0.3, mask=mask)
    dy = torch.randn_like(y)
    dx = torch_backend.backward_call(dy, plan, shp, saved, args["gates"], 2.0, False, 0.3,
                                     (True, False, False, False))[0]
    ref = reference.cgc_lora(**{**args, "x": x}, dropout_p=0.3, dropout_mask=mask)
    ref.backward(dy)
    torch.testing.assert_close(y, ref.detach(), **TOLERANCES[torch.float64])
    torch.testing.assert_close(dx, x.grad, **TOLERANCES[torch.float64])


def test_dropout_draws_a_mask_in_training():
    args = make_inputs(Case(M=64, d_in=16, d_out=4, T=2, S=1, K=1, r=2))
    torch.manual_seed(0)
    a = cgc_kernels.cgc_lora(**args, dropout_p=0.5, backend="torch")
    b = cgc_kernels.cgc_lora(**args, backend="torch")
    assert not torch.allclose(a, b)


def test_default_backend_on_cpu_is_torch():
    assert cgc_kernels.op.dispatch.resolve_backend(torch.zeros(1, 1), None) == "torch"


def test_routing_shares_one_plan_across_calls():
    case = Case(M=32, d_in=8, d_out=4, T=2, S=1, K=1, r=2)
    args = make_inputs(case, torch.float32)
    routing = build_routing(torch.sort(args["task_ids"]).values, case.T)
    a = {**args, "task_ids": routing}
    cgc_kernels.cgc_lora(**a, backend="torch")
    assert len(routing.cache) == 1
    plan = next(iter(routing.cache.values()))
    cgc_kernels.cgc_lora(**a, backend="torch")
    assert next(iter(routing.cache.values())) is plan and plan.order is None and len(plan.runs) == 2


def test_plan_gathers_only_short_interleaved_runs():
    grouped = torch.tensor([0] * 40 + [1] * 40)
    sequences = torch.tensor(([0] * 20 + [1] * 20) * 2)  # 4 runs of 20 rows: slices
    tokens = torch.tensor([0, 1] * 40)  # 80 runs of 1 row: gathered
    assert torch_backend.plan_rows(grouped).order is None
    assert torch_backend.plan_rows(sequences).order is None
    assert torch_backend.plan_rows(tokens).order is not None


def test_grouped_rows_run_without_gather_scatter_or_index_add():
    # The contiguous path (rows grouped by task), forward and backward: slices and GEMMs only.
    from torch.profiler import ProfilerActivity, profile

    case = Case(M=64, d_in=16, d_out=8, T=4, S=2, K=1, r=4)
    args, _ = _layout(make_inputs(case, torch.float32), "grouped")
    a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    routing = build_routing(a["task_ids"], case.T)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = cgc_kernels.cgc_lora(**{**a, "task_ids": routing}, backend="torch")
        y.sum().backward()
    names = {e.key for e in prof.key_averages()}
    banned = {n for n in names if any(w in n for w in ("index_add", "scatter", "index_select", "gather",
                                                        "index_put", "aten::index"))}
    assert not banned, banned


def test_dense_layout_only_for_interleaved_training_sized_batches():
    use = lambda ids, T=4: torch_backend.use_dense(torch_backend.plan_rows(ids), torch.zeros(1, 1), CGCShapes(
        M=ids.shape[0], d_in=1, d_out=1, T=T, C=1, S=2, K=1, r=8))
    sequences = (torch.arange(16) % 4).repeat_interleave(32)  # 16 sequences of 32 rows, tasks in turn
    assert use(sequences)
    assert not use(sequences.sort().values)  # grouped by task: one run each
    assert not use(torch.arange(16) % 4)  # a 16-row decode batch
    assert not use((torch.arange(16) % 8).repeat_interleave(32), T=8)  # 8 tasks: 10 experts stacked vs 3
    assert not use(torch.cat([sequences[:-1], torch.tensor([-1])]))  # a row of no task


def test_dense_layout_falls_back_when_a_task_weight_is_not_finite():
    # Dense mixing multiplies other tasks' weights by 0; an inf there must not reach their rows.
    case = Case(M=40, d_in=6, d_out=7, T=3, S=2, K=1, r=2)
    args = make_inputs(case, torch.float64)
    args["task_b"][1, 0, 0] = float("inf")
    y = _torch_call(None, True)(args)
    want = naive_cgc_lora(args["x"], args["task_ids"], args["gates"], args["shared_a"], args["shared_b"],
                          args["task_a"], args["task_b"], args["scaling"])
    other = args["task_ids"] != 1
    assert other.any() and (~other).any()
    torch.testing.assert_close(y[other], want[other], **TOLERANCES[torch.float64])
    assert not torch.isfinite(y[~other]).all()
