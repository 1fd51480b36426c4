"""The reference op (the spec) against the naive loop oracle, gradcheck, and its `out=` contract."""

import pytest
import torch

from cgc_kernels import reference
from tests.cases import DIFF, SMALL_CASES, TOLERANCES, Case, make_inputs
from tests.oracle import naive_cgc_lora

CASES = SMALL_CASES


def _oracle(args, **kw):
    return naive_cgc_lora(
        args["x"], args["task_ids"], args["gates"], args["shared_a"], args["shared_b"], args["task_a"],
        args["task_b"], args["scaling"], task_cluster=args["task_cluster"],
        per_token_gates=args["per_token_gates"], **kw,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive_loop(case):
    args = make_inputs(case, torch.float64)
    got = reference.cgc_lora(**args)
    assert got.shape == (case.M, case.d_out) and got.dtype == torch.float64
    torch.testing.assert_close(got, _oracle(args), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_returns_input_dtype(dtype):
    case = Case(M=16, d_in=24, d_out=12, T=3, S=2, K=1, r=4, C=2)
    args = make_inputs(case, dtype, seed=1)
    got = reference.cgc_lora(**args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), _oracle(args), **TOLERANCES[dtype])


def test_reference_out_adds_in_place():
    args = make_inputs(Case(M=9, d_in=6, d_out=5, T=3, S=1, K=1, r=2, ids="with_unrouted"))
    base = torch.randn(9, 5, dtype=torch.float64)
    out = base.clone()
    ret = reference.cgc_lora(**args, out=out)
    assert ret is out
    torch.testing.assert_close(out, base + _oracle(args), **TOLERANCES[torch.float64])


def test_reference_dropout_mask_is_applied_and_scaled():
    case = Case(M=10, d_in=8, d_out=4, T=2, S=1, K=1, r=2)
    args = make_inputs(case)
    mask = torch.rand(case.M, case.d_in, generator=torch.Generator().manual_seed(3)) > 0.3
    got = reference.cgc_lora(**args, dropout_p=0.3, dropout_mask=mask)
    torch.testing.assert_close(got, _oracle(args, keep_mask=mask, dropout_p=0.3), **TOLERANCES[torch.float64])


def test_reference_dropout_draws_a_mask_in_training():
    args = make_inputs(Case(M=64, d_in=16, d_out=4, T=2, S=1, K=1, r=2))
    torch.manual_seed(0)
    a = reference.cgc_lora(**args, dropout_p=0.5)
    b = reference.cgc_lora(**args)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "case",
    [
        Case(M=5, d_in=4, d_out=3, T=3, S=1, K=1, r=2, C=2, ids="with_unrouted"),  # clusters + task -1
        Case(M=5, d_in=4, d_out=3, T=2, S=1, K=2, r=1, per_token_gates=True),  # per-token gates
    ],
    ids=str,
)
def test_reference_gradcheck(case):
    args = make_inputs(case, torch.float64, seed=2)
    names = list(DIFF)
    tensors = [args[n].clone().requires_grad_() for n in names]

    def fn(*ts):
        kw = dict(args, **dict(zip(names, ts, strict=True)))
        return reference.cgc_lora(**kw)

    assert torch.autograd.gradcheck(fn, tensors)
