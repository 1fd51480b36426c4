"""The fused Triton kernels (backend="triton") against the reference op: forward and every gradient.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest), with
the pinned block config (BLOCK 64); shapes stay tiny because the interpreter costs milliseconds per
program and loop iteration. With a GPU present the same tests also run on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from cgc_kernels import reference
from cgc_kernels.op.dispatch import cgc_lora
from cgc_kernels.op.routing import build_routing
from tests.cases import DIFF, TOLERANCES, TRITON_DEVICES, Case, make_inputs

DEVICES = TRITON_DEVICES

CASES = [
    # odd d_in / d_out: every d loop has a masked tail; M=37 is not a multiple of the 64-row block
    pytest.param(Case(M=37, d_in=65, d_out=33, T=3, S=2, K=1, r=4), id="cgc-odd-d"),
    # rank 1: each expert is one column of the padded 16-wide rank block
    pytest.param(Case(M=20, d_in=33, d_out=65, T=2, S=1, K=2, r=1), id="r1"),
    # rank 16 on both sides: the padded block is exactly full (no masked rank column)
    pytest.param(Case(M=24, d_in=33, d_out=33, T=2, S=1, K=1, r=16), id="r16"),
    # S = 0: multi-LoRA / Punica, no shared side at all
    pytest.param(Case(M=30, d_in=33, d_out=33, T=3, S=0, K=1, r=8), id="S0-multilora"),
    # K = 0: MOELoRA, shared experts only (task side empty)
    pytest.param(Case(M=30, d_in=33, d_out=33, T=2, S=3, K=0, r=4), id="K0-moelora"),
    # T = 1, S = 0, K = 1: plain LoRA
    pytest.param(Case(M=25, d_in=33, d_out=33, T=1, S=0, K=1, r=8), id="T1-plain-lora"),
    # a task with no tokens: its dA / dB must be exactly zero, its tiles absent
    pytest.param(Case(M=29, d_in=33, d_out=33, T=3, S=1, K=1, r=4, ids="skip_task"), id="empty-task"),
    # all tokens one task: one segment, other tasks' gradients zero
    pytest.param(Case(M=29, d_in=33, d_out=33, T=3, S=1, K=1, r=4, ids="one_task"), id="one-task"),
    # task -1 rows: delta 0, dx 0 there, excluded from every reduction
    pytest.param(Case(M=40, d_in=33, d_out=33, T=3, S=2, K=1, r=4, ids="with_unrouted"), id="unrouted"),
    # every row task -1: no tile runs; all gradients zero
    pytest.param(Case(M=9, d_in=33, d_out=33, T=2, S=1, K=1, r=4, ids="all_unrouted"), id="all-unrouted"),
    # several clusters: shared experts reduced over their cluster's tasks only; S*r = 24 pads to 32
    pytest.param(Case(M=45, d_in=33, d_out=33, T=4, S=3, K=1, r=8, C=2, ids="with_unrouted"),
                 id="clusters"),
    # per-token gates (PLE-style), with clusters: gates and dgates indexed by token
    pytest.param(Case(M=33, d_in=33, d_out=33, T=3, S=2, K=2, r=4, C=2, per_token_gates=True),
                 id="token-gates"),
    # M = 1: a single-row tile
    pytest.param(Case(M=1, d_in=33, d_out=33, T=2, S=1, K=1, r=4), id="M1"),
    # more rows per task than one tile: several tiles per task, the row loops of every kernel repeat
    pytest.param(Case(M=150, d_in=33, d_out=17, T=2, S=1, K=1, r=4), id="multi-tile"),
]


def _inputs(case, dtype, device, seed=0):
    return make_inputs(case, dtype=dtype, seed=seed, device=device)


def _ref64(args):
    """Reference in float64 from the same (already rounded) values: the truth to compare with."""
    a = {k: (v.double() if k in DIFF else v) for k, v in args.items()}
    return a


def _run(fn, args, dy, **kw):
    a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    y = fn(**a, **kw)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: a[k].grad for k in DIFF}


def _check(got, want, dtype, what):
    tol = TOLERANCES[dtype]
    if want is None:  # autograd leaves the unused side (S = 0 or K = 0, rank 0) without a gradient
        want = torch.zeros_like(got)
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **tol, msg=lambda m: f"{what}: {m}")


def _dtypes(device):
    # bf16 works in the interpreter only because the kernels cast dot operands to fp32 there.
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_reference(case, dtype, device):
    args = _inputs(case, dtype, device)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(case.M, case.d_out, generator=g).to(device=device, dtype=dtype)
    y, grads = _run(cgc_lora, args, dy, backend="triton")
    y_ref, grads_ref = _run(reference.cgc_lora, _ref64(args), dy)
    assert y.dtype == dtype and y.shape == (case.M, case.d_out)
    _check(y, y_ref, dtype, "forward")
    for k in DIFF:
        assert grads[k].dtype == args[k].dtype, k
        _check(grads[k], grads_ref[k], dtype, f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_naive_oracle(device):
    # An independent oracle (token-by-token loop), so the reference is not the only judge.
    from tests.oracle import naive_cgc_lora

    case = Case(M=23, d_in=33, d_out=17, T=3, S=2, K=1, r=2, C=2, ids="with_unrouted")
    args = _inputs(case, torch.float32, device)
    y = cgc_lora(**args, backend="triton")
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    want = naive_cgc_lora(**cpu)
    _check(y, want, torch.float32, "forward vs oracle")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_out_in_place(device, grad):
    # out= adds into the base output and returns it; without autograd the kernel adds in place, with
    # autograd the base's producer (here W) still gets its gradient unchanged.
    case = Case(M=21, d_in=33, d_out=17, T=2, S=1, K=1, r=4, ids="with_unrouted")
    args = _inputs(case, torch.float32, device)
    W32 = torch.randn(case.d_out, case.d_in, generator=torch.Generator().manual_seed(3)).to(device)
    results = []
    # The reference in float64 from the same values: the truth (fp32 against fp32 in another summation
    # order missed the tolerance at near-zero gradient entries for some draws of W).
    for fn, kw, dt in ((cgc_lora, dict(backend="triton"), torch.float32), (reference.cgc_lora, {}, torch.float64)):
        W = W32.detach().to(dt).clone().requires_grad_(grad)
        a = {k: (v.detach().to(dt).requires_grad_(grad) if k in DIFF else v) for k, v in args.items()}
        with torch.set_grad_enabled(grad):
            base = a["x"] @ W.T
            ret = fn(**a, out=base, **kw)
            assert ret is base
            if grad:
                ret.square().sum().backward()
        results.append((ret.detach().clone(), W.grad.clone() if grad else None,
                        [a[k].grad for k in DIFF] if grad else None))
    (y, gw, gs), (y_ref, gw_ref, gs_ref) = results
    _check(y, y_ref, torch.float32, "out")
    if grad:
        _check(gw, gw_ref, torch.float32, "grad W (base producer)")
        for k, g1, g2 in zip(DIFF, gs, gs_ref, strict=True):
            _check(g1, g2, torch.float32, f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_routing_reuse_and_block_size(device):
    # A TaskRouting built once is reused (no id check); its tile size only changes how rows are
    # grouped, never the result (16-row tiles, 128-row tiles, plain ids).
    case = Case(M=50, d_in=33, d_out=17, T=3, S=1, K=1, r=4, C=2, ids="with_unrouted")
    args = _inputs(case, torch.float32, device)
    want = cgc_lora(**args, backend="triton")
    for bm in (16, 128):
        rt = build_routing(args["task_ids"], case.T, args["task_cluster"], tile_rows=bm)
        got = cgc_lora(**{**args, "task_ids": rt}, backend="triton")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("only", ["x", "gates", "task_b", "shared_a"])
def test_only_needed_grads(device, only):
    # Gradients are computed only where needed (ctx.needs_input_grad); the one asked for is right.
    case = Case(M=30, d_in=33, d_out=17, T=3, S=1, K=2, r=4)
    args = _inputs(case, torch.float32, device)
    a = dict(args)
    a[only] = a[only].clone().requires_grad_()
    y = cgc_lora(**a, backend="triton")
    y.sum().backward()
    r = {k: (v.double().requires_grad_(k == only) if k in DIFF else v) for k, v in args.items()}
    reference.cgc_lora(**r).sum().backward()
    _check(a[only].grad, r[only].grad, torch.float32, f"grad {only}")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    # Same inputs -> bitwise the same gradients (no float atomics in any reduction).
    case = Case(M=150, d_in=33, d_out=17, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted")
    args = _inputs(case, torch.float16, device)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(3)).to(device, torch.float16)
    _, g1 = _run(cgc_lora, args, dy, backend="triton")
    _, g2 = _run(cgc_lora, args, dy, backend="triton")
    for k in DIFF:
        assert torch.equal(g1[k], g2[k]), k


def test_triton_backend_rejects_float64():
    case = Case(M=4, d_in=16, d_out=16, T=1, S=0, K=1, r=4)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        cgc_lora(**make_inputs(case, dtype=torch.float64), backend="triton")


def test_triton_backend_checks_ids():
    case = Case(M=4, d_in=16, d_out=16, T=2, S=0, K=1, r=4)
    args = make_inputs(case, dtype=torch.float32)
    args["task_ids"] = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="task id"):
        cgc_lora(**args, backend="triton")
