"""The model level: a small Llama-shaped model with CGC-LoRA on every linear layer of every
block, built from a config (random weights). Training: one forward + backward of the LM loss on a
mixed-task batch. Generation: greedy decoding of a batch whose sequences belong to T tasks
(T in {1, 4, 16}). Checked against the reference CGC model, then timed, as at the op level."""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.baselines import MOELoRALinear
from benchmarks.cases import TASK_COUNTS, Memo, device_for, dtype_for
from benchmarks.measure import RESULTS, SETTINGS, checked_only, quantile, sync
from benchmarks.providers import OP_BACKENDS, assert_matches

# The linear layers of a Llama block, adapted by every model-level provider.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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
class ModelProblem(Memo):
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
        alpha=2.0 * r, target_modules=LLAMA_PROJECTIONS))
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
        config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=LLAMA_PROJECTIONS)
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

    if checked_only(benchmark, f"model-{case.name}", provider, check_fn):
        return

    def target():
        if train:
            clear()
            call(p.input_ids).backward()
        else:
            call(p.input_ids, generate=True)
        sync(p.device)

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
               case=case.name, T=case.T, median_s=statistics.median(data), p20_s=quantile(data, 0.2),
               p80_s=quantile(data, 0.8), rounds=len(data), peak_mem_bytes=peak,
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
