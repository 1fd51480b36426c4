"""Op level: the LoRA branch alone (no base layer): forward, backward, forward + backward.

Providers: fused (Triton), fused_v1 (the first kernel generation, benchmarks/fused_v1.py),
cuda_ref (csrc_ref's CUDA forward), reference, moelora_loop,
torch_compile, peft_lora (a single LoRA of rank (S+K) r, checked against task 0's update). Groups: "op-<mode> <case>".
"""

import pytest

from benchmarks import measure


@pytest.mark.bench(level="op", modes=("forward", "backward", "full"))
def test_op(benchmark, size, case, provider, mode):
    measure.run(benchmark, provider=provider, level="op", mode=mode, case=case, size=size)
