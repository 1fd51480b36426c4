"""The one harness behind every benchmark suite: cases, inputs, providers, timing and memory.

A suite parametrizes over `(case, provider)` pairs from `cases(size)` and `PROVIDERS`, builds
the provider's runner for the case, and hands it to `run(...)`, which

1. always checks the provider's result against the reference backend on the same inputs
   (outputs, and the input gradient when a backward runs) and fails if they differ beyond
   the dtype's tolerance; this is all that happens under `--benchmark-disable` (CI);
2. otherwise times it with pytest-benchmark (fixed warm-up and rounds, CUDA synchronized),
   measures peak memory (CUDA) and the activation memory kept for the backward (any device),
   and appends one row to `RESULTS`, which conftest.py writes to a JSON file at the end.

Benchmarks measure; they never pass or fail on a time.

Sizes: "cpu" (d=512, M=512, a few minutes on 2 cores, float32), "gpu" (d=4096 and a 7B
model's 11008->4096 down projection, M in {512, 8192}, bfloat16), and "ci" (the cpu sweep at
d=128, M=256: the default on CPU under --benchmark-disable, where only correctness is checked).
"""

from __future__ import annotations

import copy
import datetime
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from benchmarks.baselines import MOELoRALinear
from cgc_kernels import CGCLoRALinear, build_routing, cgc_lora, reference
from tests.cases import TOLERANCES

SIZES = ("ci", "cpu", "gpu")
MIXES = ("uniform", "zipf")
ZIPF_EXPONENT = 1.5
EXPERT_SHAPES = ((2, 1, 8), (4, 2, 4), (8, 0, 2))  # (S, K, r): CGC, more and smaller, MOELoRA-like
TASK_COUNTS = (1, 4, 16)

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

    @property
    def name(self) -> str:
        return (f"M{self.M}-{self.d_in}x{self.d_out}-T{self.T}-S{self.S}K{self.K}r{self.r}-{self.mix}")

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
    """The sweep of one size: every (T, (S,K,r), mix) for each M and layer shape (no Zipf at T=1)."""
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


def export_task(layer: CGCLoRALinear, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [(S+K) r, d_in], B [d_out, (S+K) r]) of one task as a single LoRA with scaling 1:
    B A equals the task's merged update s * sum_e g_e B_e A_e."""
    with torch.no_grad():
        S, r = layer.num_shared_experts, layer.rank
        col = layer.task_gates()[task].repeat_interleave(r).to(layer.task_b.dtype)
        c = int(layer.task_cluster[task])
        a = torch.cat([layer.shared_a[c], layer.task_a[task]], 0)
        b = torch.cat([layer.shared_b[c] * col[: S * r], layer.task_b[task] * col[S * r:]], 1) * layer.scaling
    return a.clone(), b.clone()


def peft_layer(layer: CGCLoRALinear, tasks: list[int]) -> nn.Module:
    """A PEFT LoRA Linear over the same frozen base, one adapter "task{t}" of rank (S+K) r per task,
    each the export of that task (so a mixed batch through `adapter_names` is the CGC function)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    R = (layer.num_shared_experts + layer.num_task_experts) * layer.rank
    config = LoraConfig(r=R, lora_alpha=R)
    pl = None
    for t in tasks:
        name = f"task{t}"
        if pl is None:
            pl = PeftLinear(layer.base_layer, name, config=config, r=R, lora_alpha=R)
        else:
            pl.update_layer(name, r=R, lora_alpha=R, config=config)
        a, b = export_task(layer, t)
        with torch.no_grad():
            pl.lora_A[name].weight.copy_(a)
            pl.lora_B[name].weight.copy_(b)
    w = layer.base_layer.weight
    return pl.to(device=w.device, dtype=w.dtype)


class _Memo:
    """`cached(key, build)`: build once per problem (a layer copy, a compiled graph, a PEFT model)."""

    cache: dict

    def cached(self, key: str, build: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@dataclass
class Problem(_Memo):
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


# ---- providers -----------------------------------------------------------------------------


@dataclass
class Runner:
    """What a provider gives the harness for one case.

    fn: x [M, d_in] -> [M, d_out], differentiable (or under no_grad for inference).
    params: trainable tensors whose .grad is cleared between rounds.
    check: "same" (the CGC function: compared with the reference), "task0" (a single LoRA equal
        to task 0's update: compared with the reference on all-task-0 ids), "none" (a floor).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    check: str = "same"


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    levels: tuple[str, ...]  # of "op", "layer", "infer"
    needs_cuda: bool = False
    # cpu / ci sizes: run only on these cases (torch.compile costs ~20 s per compiled graph on 2 cores)
    cpu_case_filter: Callable[[BenchCase], bool] | None = None
    gpu_case_filter: Callable[[BenchCase], bool] | None = None
    modes: tuple[str, ...] = ("forward", "backward", "full")

    def skip_reason(self, level: str, case: BenchCase, size: str, mode: str = "forward") -> str | None:
        if level not in self.levels:
            return f"{self.name} has no {level}-level benchmark"
        if mode not in self.modes:
            return f"{self.name} has no {mode} pass"
        if self.needs_cuda and not torch.cuda.is_available():
            return f"{self.name} runs the Triton kernels, which need a CUDA device"
        filt = self.gpu_case_filter if size == "gpu" else self.cpu_case_filter
        if filt is not None and not filt(case):
            return f"{self.name} runs on a subset of the {size} cases (compile time)"
        return None


def _compile_subset(case: BenchCase) -> bool:
    return (case.S, case.K, case.r) == (2, 1, 8) and case.mix == "uniform" and case.T == 4 and case.M == 8192


def _compile_subset_cpu(case: BenchCase) -> bool:
    return (case.S, case.K, case.r) == (2, 1, 8) and case.mix == "uniform" and case.T == 4


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider("fused", "cgc_lora, Triton kernels (backend='triton')", ("op", "layer", "infer"),
                 needs_cuda=True),
        Provider("fused_v1", "the first fused Triton kernels (benchmarks/fused_v1.py)", ("op",),
                 needs_cuda=True),
        Provider("cuda_ref", "csrc_ref's hand-written CUDA forward (fp32, no tensor cores)", ("op",),
                 needs_cuda=True, modes=("forward",)),
        Provider("torch", "cgc_lora, the fast PyTorch backend (backend='torch'; the CPU default)",
                 ("op", "layer", "infer")),
        Provider("reference", "cgc_lora, PyTorch reference (backend='reference')", ("op", "layer", "infer")),
        Provider("moelora_loop", "MOELoRA-style: one Linear pair per expert, all experts on all tokens",
                 ("op", "layer", "infer")),
        Provider("torch_compile", "torch.compile of the reference op / layer (graph breaks allowed)",
                 ("op", "layer"), cpu_case_filter=_compile_subset_cpu, gpu_case_filter=_compile_subset),
        Provider("peft_lora", "one PEFT LoRA of rank (S+K) r: the floor of any LoRA",
                 ("op", "layer", "infer")),
        Provider("peft_mixed", "PEFT adapter_names= mixed batch, one adapter per task", ("infer",)),
        Provider("bare_linear", "the frozen base nn.Linear alone: the layer's floor", ("layer", "infer")),
    ]
}


# Providers that are a backend of cgc_lora itself.
OP_BACKENDS = {"fused": "triton", "torch": "torch", "reference": "reference"}


def _op_args(p: Problem, layer: CGCLoRALinear):
    return (layer.shared_a, layer.shared_b, layer.task_a, layer.task_b, layer.scaling)


def make_runner(provider: str, level: str, p: Problem) -> Runner:
    """The runner of `provider` at `level` ("op": the LoRA branch alone; "layer": base + branch,
    training; "infer": base + branch under no_grad, one task per sequence)."""
    case = p.case
    if provider in OP_BACKENDS:
        backend = OP_BACKENDS[provider]
        layer = p.cached(f"layer-{backend}", lambda: clone_layer(p.layer, backend))
        if level == "op":
            gates = p.gates.clone().requires_grad_()
            fn = lambda x: cgc_lora(x, p.routing, gates, *_op_args(p, layer), backend=backend)
            return Runner(fn, [gates, *_lora_params(layer)])
        return Runner(lambda x: layer(x, p.routing), list(layer.parameters()))
    if provider == "fused_v1":
        from benchmarks.fused_v1 import fused_v1

        layer = p.cached("layer-triton", lambda: clone_layer(p.layer, "triton"))
        gates = p.gates.clone().requires_grad_()
        return Runner(lambda x: fused_v1(x, p.routing, gates, *_op_args(p, layer)), [gates, *_lora_params(layer)])
    if provider == "cuda_ref":
        from cgc_kernels.op import csrc_ref

        p.cached("csrc-load", csrc_ref.load)  # build once, outside the timed region
        w32 = p.cached("fp32-experts", lambda: [w.detach().float() for w in _op_args(p, p.layer)[:4]])
        gates = p.gates.float()

        def fn(x):
            return csrc_ref.forward(x.float(), p.task_ids, gates, *w32, p.layer.scaling).to(x.dtype)

        return Runner(fn, [])
    if provider == "moelora_loop":
        moe = p.moe
        if level == "op":
            gates = p.gates.clone().requires_grad_()
            return Runner(lambda x: moe.lora_delta(x, p.task_ids, gates), [gates, *moe.parameters()])
        if level == "infer":
            B = p.sample_ids.shape[0]
            return Runner(lambda x: moe(x.view(B, -1, case.d_in), p.sample_ids).view(case.M, -1), [])
        return Runner(lambda x: moe(x, p.task_ids), list(moe.parameters()))
    if provider == "torch_compile":
        layer = p.cached("layer-compile", lambda: clone_layer(p.layer, "reference"))
        if level == "op":
            gates = p.gates.clone().requires_grad_()
            op = p.cached("compiled-op", lambda: torch.compile(reference.cgc_lora))
            fn = lambda x: op(x, p.task_ids, gates, *_op_args(p, layer))
            return Runner(fn, [gates, *_lora_params(layer)])
        compiled = p.cached("compiled-layer", lambda: torch.compile(layer))
        return Runner(lambda x: compiled(x, p.task_ids), list(layer.parameters()))
    if provider == "peft_lora":
        pl = p.cached("peft-single", lambda: peft_layer(p.layer, [0]))
        params = [q for q in pl.parameters() if q.requires_grad]
        if level == "op":
            A, Bm = pl.lora_A["task0"], pl.lora_B["task0"]
            return Runner(lambda x: Bm(A(x)) * pl.scaling["task0"], params, check="task0")
        return Runner(lambda x: pl(x), params, check="task0")
    if provider == "peft_mixed":
        pl = p.cached("peft-mixed", lambda: peft_layer(p.layer, list(range(case.T))).eval())
        names = [f"task{int(t)}" for t in p.sample_ids.tolist()]
        B = len(names)
        return Runner(lambda x: pl(x.view(B, -1, case.d_in), adapter_names=names).view(case.M, -1), [])
    if provider == "bare_linear":
        base = p.layer.base_layer
        return Runner(lambda x: base(x), [], check="none")
    raise ValueError(f"unknown provider {provider!r}")


def _lora_params(layer: CGCLoRALinear) -> list[torch.Tensor]:
    return [layer.shared_a, layer.shared_b, layer.task_a, layer.task_b]


# ---- expected results ----------------------------------------------------------------------


def expected(p: Problem, level: str, check: str, with_grad: bool):
    """(y, dx) of the reference for this problem; check="task0" runs every token as task 0."""
    key = f"expected-{level}-{check}-{with_grad}"

    def build():
        layer = p.cached("layer-expected", lambda: clone_layer(p.layer, "reference"))
        ids = p.task_ids if check == "same" else torch.zeros_like(p.task_ids)
        x = p.x.clone().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            y = layer(x, ids) if level != "op" else cgc_lora(
                x, ids, p.gates, *_op_args(p, layer), backend="reference")
        if not with_grad:
            return y.detach(), None
        y.backward(p.dy)
        return y.detach(), x.grad

    return p.cached(key, build)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Compare against the reference relative to its scale, with the dtype's tolerance."""
    tol = TOLERANCES[want.dtype]
    scale = want.float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol, msg=lambda m: f"{what}: {m}")


# ---- timing, memory, results ---------------------------------------------------------------

RESULTS: list[dict] = []
SETTINGS = {"rounds": None, "warmup": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd saves for the backward during `fn()`, not counting the
    storages of `exclude` (inputs and parameters, which live anyway)."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return total


def run(benchmark, *, provider: str, level: str, mode: str, case: BenchCase, size: str) -> None:
    """Check, then (unless disabled) time one provider on one case. mode: forward | backward | full."""
    reason = PROVIDERS[provider].skip_reason(level, case, size, mode)
    if reason:
        import pytest

        pytest.skip(reason)
    device, dtype = device_for(size), dtype_for(size)
    p = build_problem(case, device, dtype)
    runner = make_runner(provider, level, p)
    training = level != "infer"
    backward = mode in ("backward", "full")
    x = p.x.clone().requires_grad_(training)

    def clear():
        x.grad = None
        for q in runner.params:
            q.grad = None

    def forward():
        if training:
            return runner.fn(x)
        with torch.no_grad():
            return runner.fn(x)

    # 1. Correctness, always; under --benchmark-disable (CI) this is all, run through the fixture.
    def check():
        y_ref, dx_ref = expected(p, level, runner.check, backward) if runner.check != "none" else (None, None)
        clear()
        y = forward()
        if y_ref is not None:
            assert_matches(y, y_ref, f"{provider} {level} output")
        if backward:
            y.backward(p.dy)
            if dx_ref is not None:
                assert_matches(x.grad, dx_ref, f"{provider} {level} input gradient")

    benchmark.group = f"{level}-{mode} {case.name}"
    benchmark.name = provider
    if benchmark.disabled:
        benchmark.pedantic(check)
        return
    check()

    # 2. Timing.
    def target_forward():
        y = forward()
        _sync(device)
        return y

    def target_full():
        clear()
        forward().backward(p.dy)
        _sync(device)

    def setup_backward():
        clear()
        y = forward()
        _sync(device)
        return (y,), {}

    def target_backward(y):
        y.backward(p.dy)
        _sync(device)

    rounds = SETTINGS["rounds"] or (30 if device.type == "cuda" else 10)
    warmup = SETTINGS["warmup"]
    if mode == "forward":
        benchmark.pedantic(target_forward, rounds=rounds, warmup_rounds=warmup)
    elif mode == "backward":
        benchmark.pedantic(target_backward, setup=setup_backward, rounds=rounds, warmup_rounds=warmup)
    else:
        benchmark.pedantic(target_full, rounds=rounds, warmup_rounds=warmup)

    # 3. Memory: CUDA peak over one more call; activation bytes kept for the backward.
    peak = None
    if device.type == "cuda":
        clear()
        args = setup_backward()[0] if mode == "backward" else ()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (target_backward if mode == "backward" else target_full if mode == "full" else target_forward)(*args)
        peak = torch.cuda.max_memory_allocated() - base
        del args
    saved = None
    if training and mode != "backward":
        clear()
        saved = saved_activation_bytes(forward, [x, *runner.params, *p.layer.base_layer.parameters()])

    data = sorted(benchmark.stats.stats.data)
    row = dict(
        level=level, mode=mode, provider=provider, case=case.name, **asdict(case),
        median_s=statistics.median(data), p20_s=_quantile(data, 0.2), p80_s=_quantile(data, 0.8),
        rounds=len(data), peak_mem_bytes=peak, saved_activation_bytes=saved,
        lora_bytes=lora_branch_bytes(case, mode, dtype) if level == "op" else None,
        dtype=str(dtype).replace("torch.", ""), device=device.type,
    )
    row["tokens_per_s"] = case.M / row["median_s"]
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in asdict(case)})
    RESULTS.append(row)


def _quantile(sorted_data: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted data."""
    if len(sorted_data) == 1:
        return sorted_data[0]
    pos = q * (len(sorted_data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def lora_branch_bytes(case: BenchCase, mode: str, dtype: torch.dtype) -> int:
    """The least memory traffic of the LoRA branch (activations only; experts are small):
    forward reads x and writes y; backward reads dy and x (for dA) and writes dx."""
    es = torch.empty((), dtype=dtype).element_size()
    fwd = case.M * (case.d_in + case.d_out) * es
    bwd = case.M * (2 * case.d_in + case.d_out) * es
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# ---- environment ---------------------------------------------------------------------------


@functools.cache
def copy_bandwidth(device_type: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large clone; median of 10)."""
    device = torch.device(device_type)
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times[2:])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.cache
def environment(size: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    device = device_for(size).type
    return dict(
        date=datetime.date.today().isoformat(),
        size=size,
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        gpu=torch.cuda.get_device_name() if cuda else None,
        torch=torch.__version__,
        triton=triton_version,
        git_commit=git_commit(),
        copy_bandwidth_bytes_per_s=copy_bandwidth(device),
        dtype=str(dtype_for(size)).replace("torch.", ""),
    )


# ---- model level ---------------------------------------------------------------------------
# A small Llama-shaped model with CGC-LoRA on every linear layer of every block, built from a
# config (random weights). Training: one forward + backward of the LM loss on a mixed-task batch.
# Generation: greedy decoding of a batch whose sequences belong to T tasks (T in {1, 4, 16}).

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_SHAPES = {
    # llama config, (batch, seq) for training, (batch, prompt, new tokens) for generation
    "ci": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256), (4, 32), (4, 8, 4)),
    "cpu": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024), (8, 64), (16, 16, 8)),
    "gpu": (dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000), (8, 1024), (16, 64, 32)),
}
MODEL_EXPERTS = (2, 1, 8)  # (S, K, r)


@dataclass(frozen=True)
class ModelCase:
    kind: str  # "train" | "generate"
    T: int

    @property
    def name(self) -> str:
        return f"{self.kind}-T{self.T}"


def model_cases(size: str) -> list[ModelCase]:
    return [ModelCase(kind, T) for kind in ("train", "generate") for T in TASK_COUNTS]


MODEL_PROVIDERS = {
    "train": ("fused", "torch", "reference", "moelora_loop", "peft_lora"),
    "generate": ("fused", "torch", "reference", "moelora_loop", "peft_mixed", "peft_lora", "bare_model"),
}


@dataclass
class ModelProblem(_Memo):
    case: ModelCase
    size: str
    device: torch.device
    dtype: torch.dtype
    base: nn.Module  # pristine copy of the base model (for PEFT and the baseline)
    cgc: nn.Module  # CGCModel over another copy
    input_ids: torch.Tensor  # [batch, seq]
    sample_ids: torch.Tensor  # [batch] task of each sequence: i % T (all T tasks in one batch)
    new_tokens: int
    cache: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Tokens per timed call: trained tokens, or generated tokens."""
        b, s = self.input_ids.shape
        return b * s if self.case.kind == "train" else b * self.new_tokens


@functools.lru_cache(maxsize=1)
def build_model_problem(case: ModelCase, size: str) -> ModelProblem:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cgc_kernels import CGCLoRAConfig, CGCModel

    device, dtype = device_for(size), dtype_for(size)
    shape, (tb, ts), (gb, gp, gn) = MODEL_SHAPES[size]
    # Eager attention on CPU: SDPA's CPU backward is slow on these short batches.
    attn = "sdpa" if device.type == "cuda" else "eager"
    torch.manual_seed(0)
    config = LlamaConfig(**shape, attn_implementation=attn)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    S, K, r = MODEL_EXPERTS
    cgc = CGCModel(copy.deepcopy(base), CGCLoRAConfig(
        tasks=[f"task{t}" for t in range(case.T)], num_shared_experts=S, num_task_experts=K, rank=r,
        alpha=2.0 * r, target_modules=ALL_LINEAR))
    with torch.no_grad():  # nonzero B and uneven gates, as at the op level
        for layer in cgc.adapted_layers().values():
            for q in (layer.shared_b, layer.task_b):
                q.normal_(0.0, 0.02)
            for q in layer.gate.parameters():
                q.normal_()
    gen = torch.Generator().manual_seed(2)
    batch, seq = (tb, ts) if case.kind == "train" else (gb, gp)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
    sample_ids = (torch.arange(batch) % case.T).to(device)
    return ModelProblem(case, size, device, dtype, base, cgc, input_ids, sample_ids, gn)


def _moelora_model(p: ModelProblem) -> nn.Module:
    """A copy of the base model with every adapted Linear replaced by MOELoRALinear.from_cgc of the
    CGC layer, the task ids threaded to the layers by a forward pre-hook (as MOELoRA patches them in)."""
    model = copy.deepcopy(p.base)
    layers = []
    for name, cgc_layer in p.cgc.adapted_layers().items():
        moe = MOELoRALinear.from_cgc(cgc_layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, moe)
        layers.append(moe)
    model.moe_task_ids = None

    def hook(module, args, kwargs):
        for layer in layers:
            layer.current_task_ids = model.moe_task_ids

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def _peft_model(p: ModelProblem, tasks: list[int]) -> nn.Module:
    """A PEFT LoRA model over a copy of the base, one adapter "task{t}" per task, each the CGC
    model's own export of that task (`peft_adapter_state`): rank (S+K) r on every linear layer."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pm = None
    for t in tasks:
        cfg, tensors = p.cgc.peft_adapter_state(t)
        config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=ALL_LINEAR)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(p.base), config, adapter_name=f"task{t}")
        else:
            pm.add_adapter(f"task{t}", config)
        set_peft_model_state_dict(pm, tensors, adapter_name=f"task{t}")
    pm.set_adapter("task0")
    pm = pm.to(device=p.device, dtype=p.dtype)
    return pm.eval() if p.case.kind == "generate" else pm  # adapter_names= is refused in training mode


def _set_backend(cgc, backend: str) -> None:
    for layer in cgc.adapted_layers().values():
        layer.backend = backend


def model_call(provider: str, p: ModelProblem) -> tuple[Callable[..., object], str]:
    """(call, check): call(input_ids, generate=False) returns the LM loss (train) / logits, or the
    generated ids with generate=True; check as in Runner ("same", "task0", "none")."""
    ids, tasks = p.sample_ids, p.sample_ids.tolist()
    gen_kw = dict(max_new_tokens=p.new_tokens, min_new_tokens=p.new_tokens, do_sample=False, pad_token_id=0)
    if provider in OP_BACKENDS:
        backend = OP_BACKENDS[provider]

        def call(x, generate=False):
            _set_backend(p.cgc, backend)
            if generate:
                return p.cgc.generate(input_ids=x, task_ids=ids, **gen_kw)
            out = p.cgc(input_ids=x, labels=x if p.case.kind == "train" else None, task_ids=ids)
            return out.loss if p.case.kind == "train" else out.logits

        return call, "same"
    if provider == "moelora_loop":
        model = p.cached("moelora", lambda: _moelora_model(p))

        def call(x, generate=False):
            model.moe_task_ids = ids
            if generate:
                return model.generate(input_ids=x, **gen_kw)
            out = model(input_ids=x, labels=x if p.case.kind == "train" else None)
            return out.loss if p.case.kind == "train" else out.logits

        return call, "same"
    if provider in ("peft_lora", "peft_mixed"):
        mixed = provider == "peft_mixed"
        pm = p.cached(provider, lambda: _peft_model(p, list(range(p.case.T)) if mixed else [0]))
        names = [f"task{t}" for t in tasks] if mixed else None

        def call(x, generate=False):
            kw = {"adapter_names": names} if mixed else {}
            if generate:
                return pm.generate(input_ids=x, **kw, **gen_kw)
            out = pm(input_ids=x, labels=x if p.case.kind == "train" else None, **kw)
            return out.loss if p.case.kind == "train" else out.logits

        return call, "same" if mixed else "task0"
    if provider == "bare_model":

        def call(x, generate=False):
            if generate:
                return p.base.generate(input_ids=x, **gen_kw)
            return p.base(input_ids=x).logits

        return call, "none"
    raise ValueError(f"unknown model-level provider {provider!r}")


def model_expected(p: ModelProblem, check: str) -> torch.Tensor:
    """The reference CGC model's loss (train) or prompt logits (generate); task 0 everywhere for
    check="task0"."""
    def build():
        ids = p.sample_ids if check == "same" else torch.zeros_like(p.sample_ids)
        _set_backend(p.cgc, "reference")
        train = p.case.kind == "train"
        with torch.no_grad():
            out = p.cgc(input_ids=p.input_ids, labels=p.input_ids if train else None, task_ids=ids)
        return out.loss if train else out.logits

    return p.cached(f"expected-{check}", build)


def run_model(benchmark, *, provider: str, case: ModelCase, size: str) -> None:
    """Check, then time, one model-level provider: tokens/s of a training step (forward + backward
    of the loss, no optimizer) or of greedy mixed-task generation."""
    import pytest

    if provider == "fused" and not torch.cuda.is_available():
        pytest.skip("fused runs the Triton kernels, which need a CUDA device")
    p = build_model_problem(case, size)
    call, check = model_call(provider, p)
    p.cgc.train(case.kind == "train")
    train = case.kind == "train"
    trainable = [q for q in _model_of(provider, p).parameters() if q.requires_grad]

    def clear():
        for q in trainable:
            q.grad = None

    def check_fn():
        if check == "none":
            return
        want = model_expected(p, check)
        if train:
            clear()
            loss = call(p.input_ids)
            assert_matches(loss.detach().reshape(1), want.reshape(1), f"{provider} model loss")
            loss.backward()
        else:
            with torch.no_grad():
                assert_matches(call(p.input_ids), want, f"{provider} model logits")

    benchmark.group = f"model-{case.name}"
    benchmark.name = provider
    if benchmark.disabled:
        benchmark.pedantic(check_fn)
        return
    check_fn()

    def target():
        if train:
            clear()
            call(p.input_ids).backward()
        else:
            call(p.input_ids, generate=True)
        _sync(p.device)

    rounds = SETTINGS["rounds"] or (10 if p.device.type == "cuda" else 5)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=1)
    peak = None
    if p.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        target()
        peak = torch.cuda.max_memory_allocated() - base_mem
    data = sorted(benchmark.stats.stats.data)
    row = dict(level=f"model-{case.kind}", mode="train" if train else "generate", provider=provider,
               case=case.name, T=case.T, median_s=statistics.median(data), p20_s=_quantile(data, 0.2),
               p80_s=_quantile(data, 0.8), rounds=len(data), peak_mem_bytes=peak,
               saved_activation_bytes=None, lora_bytes=None, tokens=p.tokens,
               dtype=str(p.dtype).replace("torch.", ""), device=p.device.type,
               model=dict(MODEL_SHAPES[size][0], S=MODEL_EXPERTS[0], K=MODEL_EXPERTS[1], r=MODEL_EXPERTS[2],
                          input_shape=list(p.input_ids.shape), new_tokens=None if train else p.new_tokens))
    row["tokens_per_s"] = p.tokens / row["median_s"]
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "model"})
    RESULTS.append(row)


def _model_of(provider: str, p: ModelProblem) -> nn.Module:
    if provider in OP_BACKENDS:
        return p.cgc
    if provider == "bare_model":
        return p.base
    return p.cache["moelora" if provider == "moelora_loop" else provider]
