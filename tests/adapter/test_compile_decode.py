"""A CGCModel decode step compiles once, as one graph: generate with transformers' static cache
under torch.compile(fullgraph=True) (inductor, on CPU), 32 decode steps for each of two task mixes at
one batch size, gives the eager tokens with no graph break and no recompile.

transformers compiles the base model's `__call__` for the decode steps (the prefill runs eagerly).
dynamo runs that module's hooks outside its forward's graph; CGCModel's routing pre-hook runs
outside torch.compile altogether and builds one routing per call shape per request (the prompt's,
then the decode steps' shared one), so the only graph is the decoder step, which reads the
routing's tensors as inputs of fixed shape (the tile table is sized for the worst task mix): neither
a new step nor a new task mix changes a guard.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation import CompileConfig

from cgc_kernels import CGCLoRAConfig, CGCModel
from cgc_kernels.adapter import task_ids
from cgc_kernels.op.routing import build_routing

GRAPHS = 1  # the decoder step, the routing read as its inputs
STEPS = 32


def _model() -> CGCModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    cgc = CGCModel(LlamaForCausalLM(config), CGCLoRAConfig(
        tasks=["a", "b", "c"], num_shared_experts=1, num_task_experts=1, rank=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # experts that move the logits: a wrong routing changes the tokens
        for layer in cgc.adapted_layers().values():
            layer.task_b.normal_(0.0, 0.5)
    return cgc.eval()


def _generate(cgc: CGCModel, ids: torch.Tensor, tasks, compile_config: CompileConfig | None):
    kw = dict(compile_config=compile_config) if compile_config is not None else dict(disable_compile=True)
    return cgc.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=tasks,
                        max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1, do_sample=False,
                        cache_implementation="static", **kw)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_mixed_task_decode_compiles_once(fresh_dynamo, monkeypatch):
    builds = []

    def counted(*args, **kwargs):
        builds.append(args[0].shape)
        return build_routing(*args, **kwargs)

    monkeypatch.setattr(task_ids, "build_routing", counted)
    cgc = _model()
    ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(1))
    config = CompileConfig(fullgraph=True, backend="inductor", mode=None, dynamic=False)
    config._compile_all_devices = True  # transformers compiles decode on GPUs only unless asked
    graphs, outs = [], []
    for tasks in (["a", "b", "c", -1], ["c", "c", "a", "b"]):
        builds.clear()
        outs.append(_generate(cgc, ids, tasks, config))
        graphs.append(counters["stats"]["unique_graphs"])
        # The prompt's routing, then one that all 32 decode steps read, built outside the graph.
        assert builds == [(4 * 5,), (4,)], builds
        torch.testing.assert_close(outs[-1], _generate(cgc, ids, tasks, None), rtol=0, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [GRAPHS, GRAPHS], graphs  # compiled at the first decode step, never again
    # The two mixes route differently: each compiled generate read its own routing.
    assert not torch.equal(outs[0], outs[1])


def test_decode_speed_benchmark_runs_and_agrees(fresh_dynamo):
    """benchmarks/decode_speed.time_decode (what the GPU check calls) on CPU with dynamo's eager
    backend: the compiled and the eager decode give the same tokens (no timing asserted)."""
    from benchmarks.decode_speed import time_decode

    cgc = _model()
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    row = time_decode(cgc, ids, torch.ones_like(ids), ["b", "a"], new_tokens=4, backend="eager", repeats=1)
    assert row["same_tokens"] and row["batch"] == 2 and row["new_tokens"] == 4
    assert row["eager_tok_s"] > 0 and row["compiled_tok_s"] > 0
