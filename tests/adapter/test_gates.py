"""TaskGate, StackedTaskGate, TokenGate: shapes, softmax rows, independence of clusters."""

from __future__ import annotations

import pytest
import torch

from cgc_kernels import StackedTaskGate, TaskGate, TokenGate


@pytest.mark.parametrize("embedding_dim", [None, 4])  # free logits, task embedding + linear map
def test_task_gate_rows_are_softmaxes(embedding_dim):
    gate = TaskGate(3, 4, embedding_dim)
    torch.testing.assert_close(gate(), torch.full((3, 4), 0.25))  # fresh: an even mixture
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    g = gate()
    assert g.shape == (3, 4) and g.dtype == torch.float32
    torch.testing.assert_close(g.sum(-1), torch.ones(3))
    torch.testing.assert_close(g, torch.softmax(gate.task_logits(), -1))


def test_stacked_gate_concatenates_clusters():
    a, b = TaskGate(2, 3), TaskGate(3, 3, embedding_dim=2)
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.normal_()
    stacked = StackedTaskGate([a, b])
    assert stacked.num_tasks == 5 and stacked.num_experts == 3
    torch.testing.assert_close(stacked(), torch.cat([a(), b()]))
    with pytest.raises(ValueError, match="same S\\+K"):
        StackedTaskGate([TaskGate(1, 2), TaskGate(1, 3)])
    with pytest.raises(ValueError, match="at least one"):
        StackedTaskGate([])


def test_token_gate_picks_each_tokens_task():
    gate = TokenGate(3, 2, 5)
    with torch.no_grad():
        gate.weight.normal_()
    x = torch.randn(4, 5)
    ids = torch.tensor([2, 0, -1, 1])
    g = gate(x, ids)
    for m, t in enumerate(ids.clamp(min=0).tolist()):
        torch.testing.assert_close(g[m], torch.softmax(gate.weight[t] @ x[m], -1))
