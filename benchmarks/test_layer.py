"""Layer level: a whole CGCLoRALinear (frozen base + experts + gate).

Training (forward + backward, tokens per step) and mixed-task inference (forward under no_grad,
one task per sequence), against the bare frozen nn.Linear (the floor), the MOELoRA loop, a
single PEFT LoRA of the same total rank, and (inference) PEFT's adapter_names= mixed batch.
"""

import pytest

from benchmarks import measure


@pytest.mark.bench(level="layer", modes=("full",))
def test_layer_train(benchmark, size, case, provider, mode):
    measure.run(benchmark, provider=provider, level="layer", mode=mode, case=case, size=size)


@pytest.mark.bench(level="infer", modes=("forward",))
def test_layer_infer(benchmark, size, case, provider, mode):
    measure.run(benchmark, provider=provider, level="infer", mode=mode, case=case, size=size)
