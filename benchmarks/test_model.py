"""Model level: a small Llama-shaped model with CGC-LoRA on all linear layers (CGCModel).

Training step (forward + backward of the LM loss, tokens/s) and mixed-task greedy generation
(generated tokens/s) with 1, 4 and 16 tasks in one batch, against the MOELoRA loop, a single
PEFT LoRA of rank (S+K) r, PEFT's adapter_names= mixed batch, and the bare model (generation).
"""

import pytest

from benchmarks import model_harness

pytest.importorskip("cgc_kernels.adapter.model", reason="CGCModel is not in this checkout")


def pytest_generate_tests(metafunc):
    from benchmarks.conftest import bench_size

    params, ids = [], []
    for case in model_harness.model_cases(bench_size(metafunc.config)):
        for provider in model_harness.MODEL_PROVIDERS[case.kind]:
            params.append((case, provider))
            ids.append(f"{case.name}-{provider}")
    metafunc.parametrize(("model_case", "provider"), params, ids=ids)


def test_model(benchmark, size, model_case, provider):
    model_harness.run_model(benchmark, provider=provider, case=model_case, size=size)
