"""CGCLoRALinear: B = 0 is the base layer; forward matches the reference op; merge / unmerge are
exact; nn.Linear and GPT-2's Conv1D."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cgc_kernels import CGCLoRALinear, TaskGate, reference
from cgc_kernels.op.routing import build_routing
from tests.cases import TOLERANCES

TOL = TOLERANCES[torch.float64]


def base_layer(kind: str, d_in=12, d_out=10, bias=True):
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(d_in, d_out, bias=bias)
    else:  # GPT-2: weight is [d_in, d_out]
        layer = Conv1D(d_out, d_in)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.2)
    return layer.double()


def random_layer(kind="linear", T=3, S=2, K=1, r=2, C=1, gate="task", seed=1):
    layer = CGCLoRALinear(base_layer(kind), T, S, K, r, alpha=4.0,
                          task_cluster=[t % C for t in range(T)], gate=gate)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fresh_layer_is_the_base_layer(kind):
    layer = CGCLoRALinear(base_layer(kind), 3, 2, 1, 4, alpha=8.0)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2, -1, 0], [2, 2, 1, 0, 1]])
    assert torch.equal(layer(x, ids), layer.base_layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("S,K,C", [
    (2, 1, 1),  # CGC-LoRA
    (0, 2, 1),  # multi-LoRA: no shared experts
    (1, 0, 1),  # MOELoRA-like: shared experts only
    (2, 1, 2),  # two clusters, each with its own shared experts
])
def test_forward_equals_base_plus_reference(kind, S, K, C):
    layer = random_layer(kind, S=S, K=K, C=C)
    x = torch.randn(7, 12, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 1])
    cluster = layer.task_cluster if C > 1 else None
    want = layer.base_layer(x) + reference.cgc_lora(
        x, ids, layer.task_gates(), layer.shared_a, layer.shared_b, layer.task_a, layer.task_b,
        layer.scaling, task_cluster=cluster)
    torch.testing.assert_close(layer(x, ids), want, **TOL)
    # a routing built once gives the same result, and so does current_routing
    routing = build_routing(ids, 3, cluster)
    torch.testing.assert_close(layer(x, routing), want, **TOL)
    layer.current_routing = routing
    torch.testing.assert_close(layer(x), want, **TOL)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("C", [1, 2])
def test_merge_equals_unmerged_forward_and_unmerge_is_exact(kind, C):
    layer = random_layer(kind, C=C)
    x = torch.randn(6, 12, dtype=torch.float64)
    w0 = layer.base_layer.weight.detach().clone()
    for t in range(3):
        unmerged = layer(x, torch.full((6,), t))
        layer.merge(t)
        assert not torch.equal(layer.base_layer.weight, w0)
        torch.testing.assert_close(layer(x), unmerged, **TOL)  # no ids needed once merged
        torch.testing.assert_close(layer(x, torch.full((6,), t)), unmerged, **TOL)
        with pytest.raises(ValueError, match="merged"):
            layer(x, torch.full((6,), (t + 1) % 3))
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)  # bit for bit


def test_merge_without_the_original_cannot_unmerge():
    """keep_original=False (a layer about to be dropped) merges the same weight and keeps nothing to
    put back: unmerge refuses instead of leaving the merged weight in place silently."""
    layer = random_layer()
    x = torch.randn(6, 12, dtype=torch.float64)
    unmerged = layer(x, torch.full((6,), 1))
    layer.merge(1, keep_original=False)
    torch.testing.assert_close(layer(x), unmerged, **TOL)
    with pytest.raises(ValueError, match="without keeping the original"):
        layer.unmerge()


def test_task_and_cluster_names_are_given_at_construction():
    layer = CGCLoRALinear(base_layer("linear"), 3, 1, 1, 2, 4.0, task_cluster=[0, 1, 1],
                          task_names=["qa", "sum", "cls"], cluster_names=["a", "b"])
    assert layer.task_names == ("qa", "sum", "cls") and layer.cluster_names == ("a", "b")
    assert random_layer(T=3, C=2).task_names == ("0", "1", "2")
    with pytest.raises(ValueError, match="task_names must name 3 entries"):
        CGCLoRALinear(base_layer("linear"), 3, 1, 1, 2, 4.0, task_names=["qa"])
    with pytest.raises(ValueError, match="cluster_names must name 2 entries"):
        CGCLoRALinear(base_layer("linear"), 3, 1, 1, 2, 4.0, task_cluster=[0, 1, 1], cluster_names=["a"])


def test_delta_weight_is_the_gate_weighted_expert_sum():
    layer = random_layer(S=2, K=1, r=2)
    g = layer.task_gates()[1]
    r = 2
    want = torch.zeros(10, 12, dtype=torch.float64)
    for e in range(2):
        want += g[e] * layer.shared_b[0][:, e * r:(e + 1) * r] @ layer.shared_a[0][e * r:(e + 1) * r]
    want += g[2] * layer.task_b[1] @ layer.task_a[1]
    torch.testing.assert_close(layer.get_delta_weight(1), want * layer.scaling, **TOL)


def test_shared_gate_module_and_token_gate():
    shared = TaskGate(3, 3)
    a = CGCLoRALinear(base_layer("linear"), 3, 2, 1, 2, 4.0, gate=shared)
    b = CGCLoRALinear(base_layer("linear"), 3, 2, 1, 2, 4.0, gate=shared)
    assert a.gate is b.gate and a.gate_kind == "task"
    tok = random_layer(gate="token")
    x = torch.randn(4, 12, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, -1])
    want = tok.base_layer(x) + reference.cgc_lora(
        x, ids, tok.gate(x, ids), tok.shared_a, tok.shared_b, tok.task_a, tok.task_b, tok.scaling,
        per_token_gates=True)
    torch.testing.assert_close(tok(x, ids), want, **TOL)
    with pytest.raises(ValueError, match="token gate"):
        tok.merge(0)


def test_layer_errors():
    layer = random_layer()
    x = torch.randn(4, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="no task ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        layer(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="cannot adapt"):
        CGCLoRALinear(nn.Embedding(4, 4), 1, 1, 1, 1, 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        CGCLoRALinear(base_layer("linear"), 2, 0, 0, 1, 1.0)
    layer.merge(0)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(1)


def test_input_gradients_of_base_and_experts_are_added_in_place():
    # Base and experts read x through one flat view, so autograd sums their two [M, d_in] input
    # gradients in place (aten::add_) instead of allocating the sum (aten::add) per layer.
    from torch.profiler import profile

    layer = random_layer()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1, 0, 0])
    y = layer(x, ids)
    with profile(record_shapes=True) as prof:
        y.sum().backward()
    adds = {(e.key, str(e.input_shapes)) for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::add", "aten::add_")}
    assert ("aten::add", str([[10, 12], [10, 12], []])) not in adds, adds
    assert any(key == "aten::add_" and "[10, 12]" in shapes for key, shapes in adds), adds
    # and the gradient is still the sum of both paths
    x2 = x.detach().clone().requires_grad_()
    want = layer.base_layer(x2) + reference.cgc_lora(
        x2.reshape(-1, 12), ids, layer.task_gates(), layer.shared_a, layer.shared_b, layer.task_a, layer.task_b,
        layer.scaling).view(2, 5, 10)
    want.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
