"""How the Triton path launches (kernels stubbed, so on any machine): eager calls reach the launchers
without the custom-op dispatcher, and every launch runs under the inputs' device guard."""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.stub_kernels import stubbed_kernels
from cgc_kernels.op import dispatch
from cgc_kernels.op.triton import common
from tests.cases import DIFF, Case, make_inputs

CASE = Case(M=12, d_in=16, d_out=8, T=2, S=1, K=1, r=4)


def _call(grad: bool, dropout_p: float = 0.0):
    args = make_inputs(CASE, dtype=torch.float32)
    if grad:
        for k in DIFF:
            args[k].requires_grad_()
        y = dispatch.cgc_lora(**args, dropout_p=dropout_p, backend="triton")
        y.sum().backward()
    else:
        with torch.no_grad():
            dispatch.cgc_lora(**args, dropout_p=dropout_p, out=torch.zeros(CASE.M, CASE.d_out), backend="triton")


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_eager_calls_bypass_the_custom_ops(monkeypatch, grad):
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the torch.library dispatcher")

    for name in ("lora_fwd", "lora_fwd_inplace", "lora_bwd"):
        monkeypatch.setattr(torch.ops.cgc_kernels, name, refuse)
    with stubbed_kernels() as launches:
        _call(grad)
    assert launches["_fwd_kernel"] == 1
    assert launches["_bwd_rows_kernel"] == int(grad)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "autograd"])
def test_every_launch_runs_under_the_device_guard(monkeypatch, grad):
    guarded, outside = [], []
    depth = [0]

    @contextlib.contextmanager
    def recording_guard(t):
        guarded.append(t.device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(common, "device_guard", recording_guard)
    with stubbed_kernels(on_launch=lambda name: None if depth[0] else outside.append(name)) as launches:
        _call(grad, dropout_p=0.1)
    # forward: expand (+ shrink at this small M); backward: dB, rows, dA, reduce
    assert launches["_fwd_kernel"] == 1 and launches["_bwd_rows_kernel"] == int(grad)
    assert not outside, f"launched outside the device guard: {outside}"
    assert guarded and all(d == torch.device("cpu") for d in guarded)


def test_checked_signature_cache_never_hides_an_error():
    # A call with a routing is checked once per signature (shapes, dtypes, devices, arguments); a
    # later call that differs in any of them is checked again and fails as it would have.
    from cgc_kernels.op.routing import build_routing

    args = make_inputs(CASE, dtype=torch.float32)
    args["task_ids"] = build_routing(args["task_ids"], CASE.T)
    with stubbed_kernels(), torch.no_grad():
        for _ in range(2):
            dispatch.cgc_lora(**args, backend="triton")
        with pytest.raises(ValueError, match="experts must match x"):
            dispatch.cgc_lora(**{**args, "task_b": args["task_b"].double()}, backend="triton")
        with pytest.raises(ValueError, match="dropout_p"):
            dispatch.cgc_lora(**args, dropout_p=1.0, backend="triton")
        with pytest.raises(ValueError, match="gates must be"):
            dispatch.cgc_lora(**{**args, "gates": args["gates"][:1]}, backend="triton")
