"""A few CGCModel training steps, eager and under torch.compile, in one process; run by
tests/adapter/test_compile_model.py (twice with one TORCHINDUCTOR_CACHE_DIR for the warm-cache check).

    python tests/compile_worker.py --backend inductor

Every decoder layer is compiled with fullgraph=True (a graph break inside a transformer block is
an error), the rest of the model runs eagerly. The batches mix tasks differently at every step
(rows grouped by task at one step, interleaved at the next), so a graph that baked one batch's
task layout in would be wrong at the next. Prints one JSON line: the eager and compiled losses
and the largest difference of any adapter parameter after the steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package under test

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cgc_kernels import CGCLoRAConfig, CGCModel  # noqa: E402

TASK_IDS = [[0, 0, 1, 2], [2, 0, 1, 0], [1, 1, 1, 2]]


def build() -> CGCModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    cgc = CGCModel(LlamaForCausalLM(config), CGCLoRAConfig(
        tasks=["a", "b", "c"], num_shared_experts=1, num_task_experts=1, rank=4,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    with torch.no_grad():  # nonzero B: every gradient flows from the first step
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(0.0, 0.1)
            layer.task_b.normal_(0.0, 0.1)
    return cgc.train()


def train(cgc: CGCModel) -> list[float]:
    opt = torch.optim.SGD([p for p in cgc.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for tids in TASK_IDS:
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        loss = cgc(input_ids=ids, labels=ids, task_ids=torch.tensor(tids)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    eager = build()
    compiled = copy.deepcopy(eager)
    for block in compiled.model.model.layers:
        block.compile(backend=args.backend, fullgraph=True)
    want, got = train(eager), train(compiled)
    params = dict(eager.named_parameters())
    diff = max((p - params[n]).abs().max().item() for n, p in compiled.named_parameters() if p.requires_grad)
    print(json.dumps({"eager": want, "compiled": got, "max_param_diff": diff}))


if __name__ == "__main__":
    main()
