"""Host overhead: the time one CGCLoRALinear call spends in Python and torch before and around its
kernel launches, measured on CPU with every Triton kernel replaced by a stub that launches nothing.

The LoRA branch at decode is a few microseconds of GPU work, so the host time per layer call is
what bounds decode speed unless the step is captured in a CUDA graph. Cases: inference (no_grad,
the in-place path the model uses while generating) and a training step (forward + backward).
Tiny shapes, so the torch ops around the launches (allocations, the routing) cost little and
what is measured is dispatch. Reported as the median per call; `pytest benchmarks/test_host.py`.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from benchmarks import measure
from benchmarks.stub_kernels import stubbed_kernels
from cgc_kernels import CGCLoRALinear, build_routing

# (name, training): decode-style inference and one training step
HOST_CASES = [pytest.param(False, id="infer"), pytest.param(True, id="train")]
M, D, T, S, K, R = 16, 64, 4, 2, 1, 8


def _layer() -> CGCLoRALinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(D, D)
    layer = CGCLoRALinear(base, num_tasks=T, num_shared_experts=S, num_task_experts=K, rank=R,
                          alpha=2 * R, backend="triton")
    with torch.no_grad():  # B is zero at init; nonzero so nothing can be skipped as a no-op
        layer.shared_b.normal_()
        layer.task_b.normal_()
    return layer


@pytest.mark.parametrize("training", HOST_CASES)
def test_host_time_per_layer_call(benchmark, training):
    layer = _layer().train(training)
    x = torch.randn(M, D, requires_grad=training)
    routing = build_routing(torch.arange(M) % T, T)  # built once per model forward, not per layer
    dy = torch.ones(M, D)

    def call():
        if training:
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            layer(x, routing).backward(dy)
        else:
            with torch.no_grad():
                layer(x, routing)

    with stubbed_kernels() as launches:
        call()
        # The stub was reached: the Triton path ran (forward, plus the backward's launches).
        assert launches["_fwd_kernel"] >= 1
        if training:
            assert launches["_bwd_rows_kernel"] >= 1 and launches["_bwd_weight_kernel"] >= 1
        benchmark.group = "host per layer call"
        benchmark.name = "train" if training else "infer"
        if benchmark.disabled:
            benchmark.pedantic(call)
            return
        # Many short calls per round: one call is tens of microseconds, below the timer's grain.
        calls_per_round = 200
        benchmark.pedantic(lambda: [call() for _ in range(calls_per_round)], rounds=15, warmup_rounds=2)
    data = sorted(t / calls_per_round for t in benchmark.stats.stats.data)
    row = dict(level="host", mode="train" if training else "infer", provider="fused_stubbed",
               case=f"M{M}-{D}x{D}-T{T}-S{S}K{K}r{R}", median_s=statistics.median(data),
               p20_s=measure.quantile(data, 0.2), p80_s=measure.quantile(data, 0.8), rounds=len(data),
               device="cpu", dtype="float32")
    benchmark.extra_info.update(row)
    measure.RESULTS.append(row)
