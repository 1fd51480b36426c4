"""What the model-level tests share: tiny random Llama (nn.Linear) and GPT-2 (Conv1D) bases in
float64, a CGCModel on them with random adapters, inputs, comparisons, and a few training steps."""

from __future__ import annotations

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCLoRAConfig, CGCModel

from .cases import TOLERANCES

TOL = TOLERANCES[torch.float64]
VOCAB = 96
ARCHS = ["llama", "gpt2"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
TASKS = ["qa", "sum", "cls"]


def tiny_base(arch: str, seed: int = 0, hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    return model.double().eval()


def randomize(cgc: CGCModel, seed: int = 1, clusters=None) -> None:
    """Nonzero B and uneven gates, so every task changes the output differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            for p in (layer.shared_a, layer.shared_b, layer.task_a, layer.task_b):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
            for p in layer.gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))


def randn_trainable(cgc: CGCModel, std: float, seed: int = 1) -> None:
    """Every trainable parameter (experts and gates) drawn from N(0, std^2), in parameter order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cgc.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def make(arch: str, seed: int = 1, **overrides):
    """(untouched copy of the base, CGCModel on another copy) with random adapters."""
    base = tiny_base(arch)
    cfg = dict(tasks=TASKS, num_shared_experts=2, num_task_experts=1, rank=2, alpha=4,
               target_modules=TARGETS[arch])
    cfg.update(overrides)
    cgc = CGCModel(copy.deepcopy(base), CGCLoRAConfig(**cfg))
    randomize(cgc, seed)
    return base, cgc


def inputs(batch=4, seq=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


def differ(a, b):
    assert (a - b).abs().max() > 1e-4, "adapters should change the output"


def train_steps(cgc: CGCModel, ids: torch.Tensor, tids, opt: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    """The LM loss (detached) of each of `steps` optimizer steps on one batch."""
    losses = []
    for _ in range(steps):
        loss = cgc(input_ids=ids, labels=ids, task_ids=tids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses



def check_checkpointing(build) -> None:
    """`build(checkpointing)`: a CGCModel in train mode, without / with activation checkpointing.
    One LM loss on a mixed batch (a row of two tasks, a task -1 row) gives the same gradients both
    ways; under checkpointing the first adapted layer ran once more (the recomputation, in the
    backward, after the forward's routing context has closed) and saw the forward's routing object."""
    ids = inputs(batch=4, seq=6)
    tids = torch.tensor([[0] * 6, [1] * 6, [2] * 3 + [0] * 3, [-1] * 6])
    grads = []
    for checkpointing in (False, True):
        cgc = build(checkpointing)
        calls = []
        first = next(iter(cgc.adapted_layers().values()))
        first.register_forward_hook(lambda mod, args, out, calls=calls: calls.append(mod.current_routing))
        loss = cgc(input_ids=ids, labels=ids, task_ids=tids).loss
        assert all(layer.current_routing is None for layer in cgc.adapted_layers().values())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        assert all(c is calls[0] for c in calls)
        grads.append({n: p.grad.clone() for n, p in cgc.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        close(grads[1][n], grads[0][n])
