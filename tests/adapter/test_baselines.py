"""MOELoRALinear (the benchmarks' baseline) computes the same function as CGCLoRALinear.

Checked in float64: outputs, the input gradient, and the gradients of every expert and of the
gate, after `MOELoRALinear.from_cgc` copies a CGCLoRALinear. The CGC side runs the reference
backend; the tests.oracle loop checks the CGC side independently, so a shared mistake fails too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.baselines import MOELoRALinear
from cgc_kernels import CGCLoRALinear
from tests.cases import TOLERANCES
from tests.oracle import naive_cgc_lora

TOL = TOLERANCES[torch.float64]


def _layer(T, S, K, r, task_cluster=None, d_in=12, d_out=10, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    layer = CGCLoRALinear(base, T, S, K, r, alpha=2.0 * r, task_cluster=task_cluster, backend="reference")
    with torch.no_grad():  # nonzero B and an uneven gate, so every expert and gate column matters
        for p in (layer.shared_b, layer.task_b):
            p.normal_()
        layer.gate.logits.normal_()
    return layer


def _ids(M, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, T, (M,), generator=g)
    ids[0], ids[-1] = -1, T - 1  # always a base-only row and the last task
    return ids


@pytest.mark.parametrize(
    "T,S,K,r,task_cluster",
    [
        (3, 2, 1, 4, None),  # CGC-LoRA, one cluster
        (4, 2, 2, 3, [0, 1, 1, 0]),  # two clusters: shared experts per cluster
        (3, 2, 0, 2, None),  # MOELoRA: shared experts only (K = 0)
        (3, 0, 1, 2, None),  # multi-LoRA: task experts only (S = 0)
        (1, 1, 1, 5, None),  # a single task
    ],
)
def test_forward_and_gradients_match_cgc(T, S, K, r, task_cluster):
    layer = _layer(T, S, K, r, task_cluster)
    moe = MOELoRALinear.from_cgc(layer)
    assert moe.num_experts == layer.num_clusters * S + T * K
    M = 29
    ids = _ids(M, T)
    x = torch.randn(M, layer.in_features, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1, ids), moe(x2, ids)

    # Independent check of the CGC side (and so of the baseline) against the naive oracle.
    L = layer
    expected = L.base_layer(x) + naive_cgc_lora(
        x, ids, L.task_gates().detach().double(), L.shared_a, L.shared_b, L.task_a, L.task_b, L.scaling,
        task_cluster=L.task_cluster if L.num_clusters > 1 else None)
    torch.testing.assert_close(y1, expected.detach(), **TOL)
    torch.testing.assert_close(y2, y1, **TOL)
    assert torch.equal(y2[ids == -1], layer.base_layer(x)[ids == -1])  # task -1: the base model alone

    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    torch.testing.assert_close(moe.gate.logits.grad, layer.gate.logits.grad, **TOL)
    # Expert e of the baseline is rank block i (j) of cluster c's (task t's) stacked experts.
    blocks = [(L.shared_a.grad[c], L.shared_b.grad[c], i) for c in range(L.num_clusters) for i in range(S)]
    blocks += [(L.task_a.grad[t], L.task_b.grad[t], j) for t in range(T) for j in range(K)]
    for e, (ga, gb, i) in enumerate(blocks):
        torch.testing.assert_close(moe.lora_A[e].weight.grad, ga[i * r:(i + 1) * r], **TOL)
        torch.testing.assert_close(moe.lora_B[e].weight.grad, gb[:, i * r:(i + 1) * r], **TOL)


def test_per_sample_ids_and_3d_input():
    # [batch, seq, d_in] input with one task per sample, as a model wrapper passes it.
    layer = _layer(3, 2, 1, 4, [0, 1, 0])
    moe = MOELoRALinear.from_cgc(layer)
    x = torch.randn(4, 5, layer.in_features, dtype=torch.float64)
    sample_ids = torch.tensor([2, -1, 0, 1])
    per_token = sample_ids.unsqueeze(1).expand(4, 5)
    torch.testing.assert_close(moe(x, sample_ids), layer(x, per_token), **TOL)
    moe.current_task_ids = per_token
    torch.testing.assert_close(moe(x), layer(x, per_token), **TOL)


def test_from_cgc_rejects_token_gate():
    base = nn.Linear(8, 8, dtype=torch.float64)
    layer = CGCLoRALinear(base, 2, 1, 1, 2, alpha=4.0, gate="token")
    with pytest.raises(ValueError, match="task-gated"):
        MOELoRALinear.from_cgc(layer)
