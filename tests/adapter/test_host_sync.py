"""No host sync in a CGCModel forward + backward: the aten ops of a training step, recorded with a
TorchDispatchMode on CPU, hold no op that reads a device value on the host (`_local_scalar_dense`,
behind `.item()`, `int(t)`, `bool(t)`; `nonzero` and the other ops whose output size depends on
values) and no blocking copy between devices. On a GPU each of those would stall the stream once
per layer; here the task ids are checked and planned on the host, where they already are.

Also: a plain id tensor handed to the op is checked once per tensor, not once per layer; a
decode-shaped call with beams (the request's ids repeated row by row) records none either.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCLoRAConfig, CGCModel, cgc_lora
from cgc_kernels.op import routing as routing_mod

# Ops that make the host wait for a device value (or size an output by values, which does too).
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
            "_unique2", "unique_consecutive", "unique_dim", "bincount", "repeat_interleave", "allclose"}


class SyncRecorder(TorchDispatchMode):
    """Counts the sync ops and the blocking cross-device copies dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if name in ("_to_copy", "copy_") and not kwargs.get("non_blocking", False):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and torch.device(dst) != src.device:
                self.syncs[f"blocking {name} {src.device}->{dst}"] += 1
        return func(*args, **kwargs)


def _model(num_clusters: int) -> CGCModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    clusters = {"a": "x", "b": "x", "c": "y"} if num_clusters == 2 else None
    cgc = CGCModel(LlamaForCausalLM(config), CGCLoRAConfig(
        tasks=["a", "b", "c"], clusters=clusters, num_shared_experts=1, num_task_experts=1, rank=4,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            layer.task_b.normal_(0.0, 0.1)
    return cgc.train()


@pytest.mark.parametrize("num_clusters", [1, 2])
@pytest.mark.parametrize("tasks", [[0, 0, 1, 2], [2, 0, 1, -1]], ids=["grouped", "interleaved"])
def test_model_forward_backward_has_no_host_sync(num_clusters, tasks):
    cgc = _model(num_clusters)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    cgc(input_ids=ids, labels=ids, task_ids=tasks).loss.backward()  # first call: per-model setup
    with SyncRecorder() as rec:
        loss = cgc(input_ids=ids, labels=ids, task_ids=tasks).loss
        loss.backward()
    assert rec.ops > 100  # the recorder saw the step
    assert not rec.syncs, dict(rec.syncs)
    grads = [p.grad for p in cgc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_generate_with_beams_has_no_host_sync_per_step():
    cgc = _model(1).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    calls = []
    cgc.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with torch.no_grad(), SyncRecorder() as rec:
        request = cgc.resolve_task_ids(["c", "a"], 2)
        with cgc.task_context(request):
            for step in range(3):  # a decode step: [batch * beams, 1], the request's rows repeated
                # (an attention mask given, as generate gives one: without it transformers looks
                # for packed sequences in the position ids, a host read of its own)
                cgc.model(input_ids=ids.repeat_interleave(2, 0)[:, step:step + 1], use_cache=False,
                          attention_mask=torch.ones(4, 1, dtype=torch.long))
    assert len(calls) == 3
    assert not rec.syncs, dict(rec.syncs)
    assert request.device_ids is not None  # copied once, reused by every step


def test_request_rows_repeat_like_generate():
    """The request's [B] ids expanded to a call on [B * k, L] repeat each row k times in place,
    as generate repeats a row for beams and num_return_sequences (torch.repeat_interleave)."""
    cgc = _model(1)
    request = cgc.resolve_task_ids([2, -1, 0], 3)
    want = torch.tensor([2, -1, 0]).repeat_interleave(2)[:, None].expand(6, 4).reshape(-1)
    assert torch.equal(request.expand(6, 4), want)
    assert torch.equal(request.expand(6, 4, request.on(torch.device("cpu"))), want)


def test_plain_ids_are_checked_once_per_tensor(monkeypatch):
    """A plain id tensor passed to several layers' op calls is range-checked on its first call only;
    changing it in place (its version) checks it again, and a bad id still fails there."""
    seen = []
    real = routing_mod.check_task_ids
    monkeypatch.setattr(routing_mod, "check_task_ids", lambda *a, **k: (seen.append(1), real(*a, **k)))
    import cgc_kernels.op.validation as validation
    monkeypatch.setattr(validation, "check_task_ids", routing_mod.check_task_ids)
    torch.manual_seed(0)
    M, d, T, r = 6, 8, 3, 2
    x = torch.randn(M, d)
    args = (torch.rand(T, 2), torch.randn(1, r, d), torch.randn(1, d, r), torch.randn(T, r, d),
            torch.randn(T, d, r), 0.5)
    ids = torch.tensor([0, 1, 2, 0, -1, 1])
    first = cgc_lora(x, ids, *args)
    for _ in range(3):
        torch.testing.assert_close(cgc_lora(x, ids, *args), first)
    assert len(seen) == 1
    ids[4] = 7
    with pytest.raises(ValueError, match="found task id 7"):
        cgc_lora(x, ids, *args)
    assert len(seen) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a CUDA device")
@pytest.mark.parametrize("backend", [None, "torch"], ids=["triton", "torch"])
def test_cuda_forward_backward_does_not_synchronize(backend):
    """On a GPU, CUDA itself says so: under torch.cuda.set_sync_debug_mode("error") a synchronizing
    call raises. The request's ids were copied once (pinned, non-blocking) by the warm-up call's
    request; the recorded step is the base model's call inside a second request's context."""
    cgc = _model(2).to("cuda")
    for layer in cgc.adapted_layers().values():
        layer.backend = backend
    ids = torch.randint(0, 64, (4, 12), device="cuda")
    mask = torch.ones_like(ids)
    cgc(input_ids=ids, attention_mask=mask, task_ids=[2, 0, 1, -1]).logits.sum().backward()  # warm-up
    request = cgc.resolve_task_ids([2, 0, 1, -1], 4, 12)
    torch.cuda.synchronize()
    with cgc.task_context(request):
        torch.cuda.set_sync_debug_mode("error")
        try:
            cgc.model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cached_checks_go_with_their_tensor():
    """What is kept for a plain id tensor (its check, its routing) is dropped when it is."""
    before = len(routing_mod._CHECKED_IDS)
    ids = torch.tensor([0, 1, 1])
    checks = []
    routing_mod.checked_once(ids, ("task_ids", 2, 3), lambda: checks.append(1))
    assert len(routing_mod._CHECKED_IDS) == before + 1 and checks == [1]
    del ids
    assert len(routing_mod._CHECKED_IDS) == before
