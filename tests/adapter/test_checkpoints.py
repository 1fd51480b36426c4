"""Checkpoints survive what happens in long runs: a save interrupted at any point leaves the previous
checkpoint loadable and equal; a damaged file or a checkpoint from another model fails with an
error naming the file or the tensor, and leaves the caller's model as it was.

(tests/adapter/test_model.py already checks the exact round trip, a crash inside the weights writer leaving
the old bytes, and a missing tensor / another hidden size named on load; these tests add the other
interruption points, damaged files, and the remaining mismatches.)
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCLoRAConfig, CGCLoRALinear, CGCModel
from cgc_kernels.adapter import save_load

VOCAB = 64
TASKS = ["qa", "sum", "cls"]
CFG = dict(num_shared_experts=2, num_task_experts=1, rank=2, alpha=4, target_modules=["q_proj", "v_proj"])


def tiny_base(hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=VOCAB)).double().eval()


def randomize(cgc: CGCModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cgc.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def make(seed: int = 1):
    """(untouched base, CGCModel on a copy with random adapters)."""
    base = tiny_base()
    cgc = CGCModel(copy.deepcopy(base), CGCLoRAConfig(tasks=TASKS, **CFG))
    randomize(cgc, seed)
    return base, cgc


IDS = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
TIDS = ["qa", "sum", "cls", None]


def logits(cgc: CGCModel) -> torch.Tensor:
    with torch.no_grad():
        return cgc(input_ids=IDS, task_ids=TIDS).logits


def fail_on_call(n: int, real, error: str = "killed mid-save"):
    """A stand-in for `real` that raises on its n-th call (1-based) and calls through otherwise."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(error)
        return real(*args, **kwargs)

    return wrapper


def _partial_weights(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a safetensors file")
    raise OSError("killed mid-save")


# Where the second save dies: inside either writer, or after the first os.replace (cgc_config.json
# is new by then; the weights file, the commit point, is not).
INTERRUPTIONS = {
    "while writing the config": lambda mp: mp.setattr(save_load, "write_text", fail_on_call(1, save_load.write_text)),
    "while writing the weights": lambda mp: mp.setattr(save_load, "save_file", _partial_weights),
    "between the two renames": lambda mp: mp.setattr(save_load.os, "replace", fail_on_call(2, os.replace)),
}


@pytest.mark.parametrize("where", list(INTERRUPTIONS))
def test_interrupted_save_keeps_the_previous_checkpoint(where, tmp_path, monkeypatch):
    base, cgc = make()
    cgc.save_pretrained(tmp_path)
    saved = logits(cgc)
    # The run goes on: the weights change and a cluster is plugged in, so the next checkpoint's
    # config differs too; then the save is interrupted.
    randomize(cgc, seed=9)
    cgc.add_cluster("code", CGCLoRAConfig(tasks=["py"], **CFG))
    with monkeypatch.context() as mp:
        INTERRUPTIONS[where](mp)
        with pytest.raises(OSError, match="killed mid-save"):
            cgc.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cgc_adapter.safetensors", "cgc_config.json"]  # no temp files
    loaded = CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.tasks == TASKS  # the previous checkpoint, not a mix of the two saves
    assert torch.equal(logits(loaded), saved)
    assert not torch.equal(logits(cgc), saved)  # the live model did move on
    # and the next, uninterrupted save is the new state
    cgc.save_pretrained(tmp_path)
    again = CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert again.tasks == TASKS + ["py"]
    assert torch.equal(logits(again), logits(cgc))


def _truncate_header(data: bytes) -> bytes:
    return data[:5]


def _truncate_data(data: bytes) -> bytes:
    return data[:-3]  # header intact, the last tensor's bytes cut short


def _garbage(data: bytes) -> bytes:
    return bytes((b * 7 + 13) % 256 for b in data[:200])


def _zero_header_length(data: bytes) -> bytes:
    return b"\x00" * 8 + data[8:]


DAMAGE = {"header cut": _truncate_header, "data cut": _truncate_data, "garbage": _garbage,
          "empty": lambda data: b"", "header length zeroed": _zero_header_length}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("entry", ["from_pretrained", "load_cluster"])
def test_damaged_weights_file_is_a_clear_error(damage, entry, tmp_path):
    base, cgc = make()
    cgc.save_cluster("default", tmp_path)
    path = tmp_path / "cgc_adapter.safetensors"
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    if entry == "from_pretrained":
        target = copy.deepcopy(base)
        with pytest.raises(ValueError, match="cgc_adapter.safetensors is not a readable safetensors file"):
            CGCModel.from_pretrained(target, tmp_path)
        assert not any(isinstance(m, CGCLoRALinear) for m in target.modules())
    else:
        before = logits(cgc)
        with pytest.raises(ValueError, match="cgc_adapter.safetensors is not a readable safetensors file"):
            cgc.load_cluster(tmp_path, name="other")
        assert cgc.clusters == ["default"] and torch.equal(logits(cgc), before)


def test_damaged_config_json(tmp_path):
    base, cgc = make()
    cgc.save_pretrained(tmp_path)
    (tmp_path / "cgc_config.json").write_text('{"tasks": ["qa", "su')  # cut mid-write
    # the weights file carries its own config: the checkpoint still loads, equal
    assert torch.equal(logits(CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)), logits(cgc))
    # a weights file without it (written by other tools) needs the JSON file: a clear error then
    save_file(load_file(tmp_path / "cgc_adapter.safetensors"), tmp_path / "cgc_adapter.safetensors")
    with pytest.raises(ValueError, match="cgc_config.json is not valid JSON"):
        CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)
    os.remove(tmp_path / "cgc_config.json")
    with pytest.raises(FileNotFoundError, match="cgc_config.json"):
        CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)


def _edit_tensors(path, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


KEY = "model.layers.1.self_attn.v_proj.task_a[cls]"
MISMATCH = {
    "reshaped tensor": (lambda t: t.__setitem__(KEY, t[KEY].reshape(-1)),
                        r"tensor 'model\.layers\.1\.self_attn\.v_proj\.task_a\[cls\]' is saved as \(64,\)"),
    "unexpected tensor": (lambda t: t.__setitem__("model.layers.1.mlp.up_proj.task_a[cls]", t[KEY].clone()),
                          r"unexpected tensor 'model\.layers\.1\.mlp\.up_proj\.task_a\[cls\]'"),
    "renamed tensor": (lambda t: t.__setitem__(KEY.replace("cls", "cls2"), t.pop(KEY)),
                       r"lacks tensor 'model\.layers\.1\.self_attn\.v_proj\.task_a\[cls\]'"),
}


@pytest.mark.parametrize("kind", list(MISMATCH))
def test_mismatched_tensor_is_named_and_model_left_as_it_was(kind, tmp_path):
    base, cgc = make()
    cgc.save_pretrained(tmp_path)
    edit, message = MISMATCH[kind]
    _edit_tensors(tmp_path / "cgc_adapter.safetensors", edit)
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        CGCModel.from_pretrained(target, tmp_path)
    assert not any(isinstance(m, CGCLoRALinear) for m in target.modules())


def test_cluster_from_another_base_is_named_and_rolled_back(tmp_path):
    _, other = make()
    other_base = tiny_base(hidden=48)
    donor = CGCModel(other_base, CGCLoRAConfig(tasks=["py"], **CFG))
    donor.save_pretrained(tmp_path)
    before = logits(other)
    with pytest.raises(ValueError, match=r"shared_a\[code\]' is saved as \(4, 48\) but this model needs"):
        other.load_cluster(tmp_path, name="code")
    assert other.clusters == ["default"] and other.tasks == TASKS
    assert torch.equal(logits(other), before)
