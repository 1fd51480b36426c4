"""Fused dropout: the kernels' seeded mask against the reference given that same mask."""

from __future__ import annotations

import pytest
import torch

from cgc_kernels import reference
from cgc_kernels.op.dispatch import cgc_lora
from cgc_kernels.op.triton.dropout import dropout_keep_mask, new_seed
from tests.cases import TOLERANCES, Case, make_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DIFF = ("x", "gates", "shared_a", "shared_b", "task_a", "task_b")
P = 0.3


def _grads(fn, args, dy, **kw):
    a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    y = fn(**a, **kw)
    y.backward(dy)
    return y.detach(), {k: a[k].grad for k in DIFF}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [
        # unsorted ids with task -1 rows and clusters: the mask follows ORIGINAL row indices
        pytest.param(Case(M=40, d_in=65, d_out=17, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted"),
                     id="clusters-unrouted"),
        # per-token gates: dgates through the dropped input too
        pytest.param(Case(M=24, d_in=33, d_out=17, T=2, S=1, K=1, r=4, per_token_gates=True),
                     id="token-gates"),
    ],
)
def test_dropout_matches_reference_with_kernel_mask(case, device):
    args = make_inputs(case, dtype=torch.float32, device=device)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(5)).to(device)
    torch.manual_seed(1234)
    seed = new_seed(device)  # the seed the op will draw after the same manual_seed
    torch.manual_seed(1234)
    y, g = _grads(cgc_lora, args, dy, backend="triton", dropout_p=P)
    mask = dropout_keep_mask(seed, case.M, case.d_in, P, device)
    y_ref, g_ref = _grads(reference.cgc_lora, args, dy, dropout_p=P, dropout_mask=mask)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, **tol)
    for k in DIFF:  # the backward regenerated the same mask (dx is zero where dropped)
        torch.testing.assert_close(g[k], g_ref[k] if g_ref[k] is not None else torch.zeros_like(g[k]), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_properties(device):
    m1 = dropout_keep_mask(7, 64, 65, P, device)
    m2 = dropout_keep_mask(8, 64, 65, P, device)
    assert m1.dtype == torch.bool and m1.shape == (64, 65)
    assert torch.equal(m1, dropout_keep_mask(7, 64, 65, P, device))  # a function of the seed
    assert not torch.equal(m1, m2)  # and of nothing else
    keep = m1.float().mean().item()
    assert abs(keep - (1 - P)) < 0.05, keep  # 4160 draws: the keep rate is 0.7 within ~4 sigma
    assert dropout_keep_mask(7, 64, 65, 0.0, device).all()


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_differs_between_calls(device):
    # Each forward draws a new seed: two training steps do not share a mask.
    case = Case(M=16, d_in=33, d_out=17, T=2, S=1, K=1, r=4)
    args = make_inputs(case, dtype=torch.float32, device=device)
    y1 = cgc_lora(**args, backend="triton", dropout_p=P)
    y2 = cgc_lora(**args, backend="triton", dropout_p=P)
    assert not torch.equal(y1, y2)
