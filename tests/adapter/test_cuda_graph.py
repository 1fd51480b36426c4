"""CUDA graphs (GPU only; skipped without CUDA): a CGCModel decode-shaped step captured once and
replayed equals the eager step, and a captured dropout draws a new mask on every replay.

The routing is built before capture (as CGCModel builds it once per call shape of a request) and set
on the adapted layers; the captured region is the base model's forward, every adapted layer included.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCLoRAConfig, CGCModel, build_routing, cgc_lora
from tests.cases import TOLERANCES, Case, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _capture(fn):
    """Warm up on a side stream (compiles the kernels), then capture `fn` in a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_step_replay_equals_eager(dtype):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512))
    cgc = CGCModel(base, CGCLoRAConfig(tasks=["a", "b", "c", "d"], num_shared_experts=2, num_task_experts=1,
                                       rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
    cgc = cgc.to("cuda", dtype).eval()
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(std=0.02)
            layer.task_b.normal_(std=0.02)
    batch, seq = 16, 8  # 16 sequences of 4 tasks (one with no adapter), a decode-sized window
    ids = torch.randint(0, 512, (batch, seq), device="cuda")
    tasks = torch.tensor([0, 1, 2, 3, -1, 1, 2, 0] * 2)
    with torch.no_grad():
        want = cgc(input_ids=ids, task_ids=tasks, use_cache=False).logits
        token_ids = tasks[:, None].expand(batch, seq).reshape(-1).cuda()
        cgc._set_routing(build_routing(token_ids, 4))
        try:
            graph, out = _capture(lambda: cgc.model(input_ids=ids, use_cache=False).logits)
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
        finally:
            cgc._set_routing(None)
    torch.testing.assert_close(out, want, **TOLERANCES[dtype])


def test_captured_dropout_draws_a_new_mask_per_replay():
    case = Case(M=64, d_in=64, d_out=32, T=2, S=1, K=1, r=4)
    args = make_inputs(case, dtype=torch.float32, device="cuda")
    routing = build_routing(args["task_ids"], case.T)
    args["task_ids"] = routing
    with torch.no_grad():
        graph, out = _capture(lambda: cgc_lora(**args, dropout_p=0.5))
        results = []
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            results.append(out.clone())
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])
