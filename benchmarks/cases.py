"""The benchmark sweep: which problems are timed at each size, and the inputs every provider of a
case shares (one layer, its inputs and routing, built once per case).

Sizes: "cpu" (d=512, M=512, a few minutes on 2 cores, float32), "gpu" (d=4096 and a 7B
model's 11008->4096 down projection, M in {512, 8192}, bfloat16), and "ci" (the cpu sweep at
d=128, M=256: the default on CPU under --benchmark-disable, where only correctness is checked).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.baselines import MOELoRALinear
from cgc_kernels import CGCLoRALinear, build_routing

SIZES = ("ci", "cpu", "gpu")
MIXES = ("uniform", "zipf")
ZIPF_EXPONENT = 1.5
EXPERT_SHAPES = ((2, 1, 8), (4, 2, 4), (8, 0, 2))  # (S, K, r): CGC, more and smaller, MOELoRA-like
TASK_COUNTS = (1, 4, 16)
# Two cases beside the sweep, at the largest M of the first layer shape, T = 4, uniform: the
# (2, 1, 8) case with dropout p = 0.1 on the LoRA input (the kernels draw the mask themselves),
# and r = 32, whose padded rank (shared 2 x 32 = 64, task 32: 96 > 64) takes the kernels' largest
# rank tier, the one no sweep case reaches.
DROPOUT_P = 0.1
LARGE_RANK_EXPERTS = (2, 1, 32)

# ---- cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One problem: M tokens of d_in features through a d_in -> d_out layer with T tasks.

    Tokens come in sequences of `seq` tokens, one task per sequence (as in a training batch or
    a mixed serving batch), drawn uniformly or from a Zipf law over tasks (`mix`).
    """

    M: int
    d_in: int
    d_out: int
    T: int
    S: int
    K: int
    r: int
    mix: str = "uniform"
    seq: int = 128
    shape: str = ""  # a name for d_in -> d_out, e.g. "7B down_proj"
    dropout_p: float = 0.0  # on the LoRA input; only providers that train with dropout run it

    @property
    def name(self) -> str:
        drop = f"-drop{self.dropout_p:g}" if self.dropout_p else ""
        return f"M{self.M}-{self.d_in}x{self.d_out}-T{self.T}-S{self.S}K{self.K}r{self.r}-{self.mix}{drop}"

    @property
    def total_rank(self) -> int:
        """(S+K) r: the rank of one task's update, and of the single LoRA it is compared with."""
        return (self.S + self.K) * self.r


def default_size(timing: bool = True) -> str:
    """CGC_BENCH_SIZE if set, else gpu with CUDA, else cpu when timing and ci when only checking."""
    size = os.environ.get("CGC_BENCH_SIZE")
    if size:
        if size not in SIZES:
            raise ValueError(f"CGC_BENCH_SIZE must be one of {SIZES}, got {size!r}")
        return size
    if torch.cuda.is_available():
        return "gpu"
    return "cpu" if timing else "ci"


def cases(size: str) -> list[BenchCase]:
    """The sweep of one size: every (T, (S,K,r), mix) for each M and layer shape (no Zipf at T=1),
    then the two extra cases (dropout, the largest rank tier)."""
    seq = 128
    if size == "cpu":
        tokens, shapes = (512,), ((512, 512, ""),)
    elif size == "ci":
        tokens, shapes, seq = (256,), ((128, 128, ""),), 32
    elif size == "gpu":
        tokens = (512, 8192)
        shapes = ((4096, 4096, "7B q_proj/v_proj"),)
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    out = []
    for M in tokens:
        for d_in, d_out, label in shapes:
            for T in TASK_COUNTS:
                for S, K, r in EXPERT_SHAPES:
                    for mix in MIXES if T > 1 else ("uniform",):
                        out.append(BenchCase(M, d_in, d_out, T, S, K, r, mix, seq=seq, shape=label))
    if size == "cpu":  # a few minutes on 2 cores: every T at one (S,K,r), the others and Zipf once each
        out = [c for c in out if (c.S, c.K, c.r) == (2, 1, 8) and (c.mix == "uniform" or c.T == 16)
               or c.T == 4 and c.mix == "uniform"]
    if size == "gpu":  # a 7B model's down projection, one mid-sized configuration
        out += [BenchCase(M, 11008, 4096, 4, 2, 1, 8, "uniform", shape="7B down_proj") for M in tokens]
    M, (d_in, d_out, label) = tokens[-1], shapes[0]
    out += [BenchCase(M, d_in, d_out, 4, 2, 1, 8, "uniform", seq=seq, shape=label, dropout_p=DROPOUT_P),
            BenchCase(M, d_in, d_out, 4, *LARGE_RANK_EXPERTS, "uniform", seq=seq, shape=label)]
    return out


def device_for(size: str) -> torch.device:
    if size == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("--bench-size=gpu needs a CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def dtype_for(size: str) -> torch.dtype:
    return torch.bfloat16 if size == "gpu" else torch.float32


# ---- inputs --------------------------------------------------------------------------------


def task_probabilities(T: int, mix: str) -> torch.Tensor:
    """[T] probability of each task: uniform, or Zipf (p_t ~ (t+1)^-1.5: task 0 dominates)."""
    if mix == "uniform":
        return torch.full((T,), 1.0 / T)
    if mix == "zipf":
        w = torch.arange(1, T + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
        return (w / w.sum()).float()
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")


def sample_task_ids(case: BenchCase, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """[num_samples] one task id per sequence, drawn from the case's mix."""
    probs = task_probabilities(case.T, case.mix)
    return torch.multinomial(probs, num_samples, replacement=True, generator=generator)


def make_layer(case: BenchCase, device, dtype, seed: int = 0) -> CGCLoRALinear:
    """A frozen bias-free base Linear (as in Llama) with CGC-LoRA experts; B and gate logits random
    (a fresh layer has B = 0 and an even gate, which would hide wrong expert or gate handling)."""
    torch.manual_seed(seed)
    base = nn.Linear(case.d_in, case.d_out, bias=False, device=device, dtype=dtype)
    layer = CGCLoRALinear(base, case.T, case.S, case.K, case.r, alpha=2.0 * case.r)
    with torch.no_grad():
        for p in (layer.shared_b, layer.task_b):
            p.normal_(0.0, 1.0 / max(case.total_rank, 1) ** 0.5)
        layer.gate.logits.normal_()
    return layer


def clone_layer(layer: CGCLoRALinear, backend: str | None) -> CGCLoRALinear:
    """A CGCLoRALinear with the same experts and gate over the same (shared, frozen) base layer,
    forcing `backend`; each provider trains its own copy."""
    new = CGCLoRALinear(layer.base_layer, layer.num_tasks, layer.num_shared_experts, layer.num_task_experts,
                        layer.rank, layer.scaling * layer.rank, task_cluster=layer.task_cluster.tolist(),
                        backend=backend)
    # Not the base's weights: copying them onto themselves would bump their autograd version.
    own = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
    missing, unexpected = new.load_state_dict(own, strict=False)
    assert not unexpected and all(k.startswith("base_layer.") for k in missing)
    return new

class Memo:
    """`cached(key, build)`: build once per problem (a layer copy, a compiled graph, a PEFT model)."""

    cache: dict

    def cached(self, key: str, build: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@dataclass
class Problem(Memo):
    """Everything a case's providers share: the layer, its baseline copy, inputs, routing."""

    case: BenchCase
    device: torch.device
    dtype: torch.dtype
    layer: CGCLoRALinear
    x: torch.Tensor  # [M, d_in]
    task_ids: torch.Tensor  # [M] one id per token (constant over each sequence)
    sample_ids: torch.Tensor  # [M // seq] one id per sequence
    dy: torch.Tensor  # [M, d_out] upstream gradient
    routing: object  # TaskRouting of task_ids, built once as a model does per forward
    cache: dict = field(default_factory=dict)

    @property
    def moe(self) -> MOELoRALinear:
        return self.cached("moe", lambda: MOELoRALinear.from_cgc(self.layer))

    @property
    def gates(self) -> torch.Tensor:
        """[T, S+K] the layer's task gate, detached (the op-level input)."""
        return self.cached("gates", lambda: self.layer.task_gates().detach())


@functools.lru_cache(maxsize=1)  # one case at a time: GPU cases hold hundreds of MB
def build_problem(case: BenchCase, device: torch.device, dtype: torch.dtype) -> Problem:
    gen = torch.Generator().manual_seed(1)
    n_samples = max(case.M // case.seq, 1)
    sample_ids = sample_task_ids(case, n_samples, gen)
    task_ids = sample_ids.repeat_interleave(case.seq)[: case.M]
    layer = make_layer(case, device, dtype)
    x = torch.randn(case.M, case.d_in, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(case.M, case.d_out, generator=gen).to(device=device, dtype=dtype)
    task_ids, sample_ids = task_ids.to(device), sample_ids.to(device)
    routing = build_routing(task_ids, case.T)
    return Problem(case, device, dtype, layer, x, task_ids, sample_ids, dy, routing)
