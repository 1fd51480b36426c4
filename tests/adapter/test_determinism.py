"""Determinism: the same inputs give bitwise the same forward and backward, run after run, and a
batch whose tokens are reordered without reordering any task's own tokens (tasks' blocks permuted,
or tokens of different tasks interleaved) gives bitwise the same result, row for row.

Why the second property holds, per backend:
  * triton: routing stably sorts tokens by (cluster, task), so every task-order-preserving
    reordering of the batch produces the same sorted order, the same tiles and the same reduction
    order in every gradient.
  * reference: each task's rows are gathered in batch order, and a cluster's rows (for the shared
    experts) task by task, so every sum runs in the same order after such a reordering.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cgc_kernels
from cgc_kernels import CGCLoRAConfig, CGCModel
from tests.cases import BACKENDS, DIFF, Case, device_of, make_inputs
from tests.models import train_steps

CASES = [
    # several tiles per task (M = 150 > 64-row block), two clusters of two tasks, task -1 rows
    pytest.param(Case(M=150, d_in=40, d_out=24, T=4, S=2, K=1, r=4, C=2, ids="with_unrouted"), id="clusters"),
    # per-token gates: the gates (and their gradient) move with their tokens
    pytest.param(Case(M=70, d_in=24, d_out=16, T=3, S=1, K=2, r=2, per_token_gates=True), id="token-gates"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def run(args: dict, dy: torch.Tensor, backend: str):
    """(y, {name: grad}) of one differentiable call."""
    a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    y = cgc_kernels.cgc_lora(**a, backend=backend)
    y.backward(dy)
    return y.detach(), {k: a[k].grad for k in DIFF}


def task_order_preserving(ids: torch.Tensor, mode: str, seed: int, key: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation `order` of the batch (new row i = old row order[i]) that keeps the tokens of
    each group (task, or `key` when given) in their original order.

    blocks:     the groups' blocks in a random group order (tokens sorted by group)
    interleave: tokens of different groups interleaved at random
    """
    g = torch.Generator().manual_seed(seed)
    group = ids if key is None else key
    M = ids.shape[0]
    if mode == "blocks":
        labels = group.unique()
        rank = torch.empty(int(labels.max()) + 2, dtype=torch.int64)
        rank[labels + 1] = torch.randperm(len(labels), generator=g)
        return torch.sort(rank[group + 1], stable=True).indices
    slots = torch.randperm(M, generator=g)
    order = torch.empty(M, dtype=torch.int64)
    for t in group.unique():
        rows = (group == t).nonzero().squeeze(1)
        order[slots[rows].sort().values] = rows  # this group's slots, filled in its own order
    return order


def permuted(args: dict, order: torch.Tensor) -> dict:
    a = dict(args, x=args["x"][order], task_ids=args["task_ids"][order])
    if args["per_token_gates"]:
        a["gates"] = args["gates"][order]
    return a


def _inputs(case: Case, dtype: torch.dtype, backend: str):
    device = device_of(backend)  # CUDA for Triton on a GPU
    args = make_inputs(case, dtype, seed=0, device=device)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return args, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_rerun_is_bitwise_equal(case, dtype, backend):
    args, dy = _inputs(case, dtype, backend)
    y1, g1 = run(args, dy, backend)
    y2, g2 = run(args, dy, backend)
    assert torch.equal(y1, y2)
    for k in DIFF:
        assert torch.equal(g1[k], g2[k]), k
    assert y1.abs().max() > 0 and all(g1[k].abs().max() > 0 for k in DIFF)  # nothing trivially zero


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["blocks", "interleave"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_task_order_preserving_reordering_is_bitwise_equal(case, dtype, mode, backend):
    args, dy = _inputs(case, dtype, backend)
    y, grads = run(args, dy, backend)
    order = task_order_preserving(args["task_ids"].cpu(), mode, seed=5)
    assert not torch.equal(order, torch.arange(case.M)), "the batch must really be reordered"
    order = order.to(args["x"].device)
    yp, gp = run(permuted(args, order), dy[order], backend)
    row_wise = {"x"} | ({"gates"} if case.per_token_gates else set())
    want = {k: grads[k][order] if k in row_wise else grads[k] for k in DIFF}
    assert torch.equal(yp, y[order])
    for k in DIFF:
        assert torch.equal(gp[k], want[k]), f"grad {k} changed with the batch order"


# ---- a training step through CGCModel ---------------------------------------------------------------
def _model(backend: str) -> CGCModel:
    torch.manual_seed(0)
    # eager attention: SDPA's memory-efficient CUDA backward is not bitwise reproducible
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        attn_implementation="eager"))
    cgc = CGCModel(base, CGCLoRAConfig(tasks=["qa", "sum", "cls"], num_shared_experts=2, num_task_experts=1,
                                       rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
                   backend=backend).to(device_of(backend))
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            layer.task_b.normal_(std=0.1)
            layer.shared_b.normal_(std=0.1)
    return cgc


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_are_bitwise_reproducible(backend):
    # Same seed, same batches -> bitwise the same losses and adapter weights after a few AdamW
    # steps, LoRA dropout included (its mask comes from the seeded generator).
    ids = torch.randint(3, 96, (4, 10), generator=torch.Generator().manual_seed(2)).to(device_of(backend))
    tids = torch.tensor([0, 2, -1, 1])
    results = []
    for _ in range(2):
        cgc = _model(backend)
        cgc.train()
        opt = torch.optim.AdamW([p for p in cgc.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(123)
        losses = train_steps(cgc, ids, tids, opt, 3)
        results.append((torch.stack(losses), {n: p.detach().clone() for n, p in cgc.named_parameters()
                                              if p.requires_grad}))
    (l1, p1), (l2, p2) = results
    assert torch.equal(l1, l2)
    assert p1.keys() == p2.keys()
    for n in p1:
        assert torch.equal(p1[n], p2[n]), n
    assert not torch.equal(l1[0], l1[-1])  # the steps did train

