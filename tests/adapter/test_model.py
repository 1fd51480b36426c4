"""CGCModel on tiny random Llama (nn.Linear) and GPT-2 (Conv1D) models: routing, generation,
deployment (merge, PEFT export), save/load, training, checkpointing, clusters, errors.

Models run in float64 so that "the same computation batched differently" compares to 1e-10 and
greedy / beam tokens are stable; every equality test also checks that adapters change the output,
so it can fail.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from cgc_kernels import CGCLoRAConfig, CGCLoRALinear, CGCModel
from cgc_kernels.adapter import save_load
from tests.models import (
    ARCHS,
    TARGETS,
    TASKS,
    VOCAB,
    check_checkpointing,
    close,
    differ,
    inputs,
    make,
    randomize,
    tiny_base,
    train_steps,
)


# ---- routing: mixed batches ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_per_task_batches_and_minus_one_is_base(arch):
    base, cgc = make(arch)
    ids = inputs(batch=6)
    tids = torch.tensor([0, 1, 2, 0, -1, 1])
    mixed = cgc(input_ids=ids, task_ids=tids).logits
    base_logits = base(input_ids=ids).logits
    for t in range(3):
        rows = (tids == t).nonzero().squeeze(1)
        alone = cgc(input_ids=ids[rows], task_ids=t).logits
        close(mixed[rows], alone)
        differ(alone, base_logits[rows])
    close(mixed[4], base_logits[4])  # task -1: the base model
    # task names are the same request
    by_name = cgc(input_ids=ids[:5], task_ids=["qa", "sum", "cls", "qa", None]).logits
    close(by_name, mixed[:5])
    close(cgc(input_ids=ids[:5], task_ids=["qa", 1, "cls", 0, -1]).logits, mixed[:5])


@pytest.mark.parametrize("arch", ARCHS)
def test_per_token_task_ids(arch):
    _, cgc = make(arch)
    ids = inputs(batch=2, seq=8)
    per_seq = cgc(input_ids=ids, task_ids=[1, 2]).logits
    close(cgc(input_ids=ids, task_ids=torch.tensor([[1] * 8, [2] * 8])).logits, per_seq)
    # A packed row, task 1 then task 0: causal attention means the first 5 positions see only
    # task-1 tokens, so they equal the all-task-1 row; the rest differ from it.
    packed = torch.tensor([[1] * 5 + [0] * 3, [2] * 8])
    out = cgc(input_ids=ids, task_ids=packed).logits
    close(out[0, :5], per_seq[0, :5])
    differ(out[0, 5:], per_seq[0, 5:])


def test_labels_give_loss_and_kwargs_pass_through():
    _, cgc = make("llama")
    ids = inputs()
    out = cgc(input_ids=ids, labels=ids, task_ids=[0, 1, 2, 0], attention_mask=torch.ones_like(ids))
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-6, rtol=1e-6)  # HF computes the loss in fp32


# ---- deployment --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_equals_unified_per_task(arch):
    base, cgc = make(arch)
    ids = inputs()
    before = cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits
    for task in TASKS:
        merged = cgc.merge_task(task)
        assert type(merged) is type(base)
        assert not any(isinstance(m, CGCLoRALinear) for m in merged.modules())
        unified = cgc(input_ids=ids, task_ids=task).logits
        close(merged(input_ids=ids).logits, unified)
        differ(merged(input_ids=ids).logits, base(input_ids=ids).logits)
    # the unified model is untouched: same outputs, base weights bit for bit
    assert torch.equal(cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits, before)
    for name, layer in cgc.adapted_layers().items():
        assert torch.equal(layer.base_layer.weight, base.get_submodule(name).weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_peft_adapter_equals_unified_per_task(arch, tmp_path):
    import json

    from peft import PeftModel

    base, cgc = make(arch)
    ids = inputs()
    for task in ["sum", "cls"]:
        d = tmp_path / task
        cgc.export_peft_adapter(task, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == (2 + 1) * 2 and cfg["fan_in_fan_out"] == (arch == "gpt2")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        close(peft_model(input_ids=ids).logits, cgc(input_ids=ids, task_ids=task).logits)
    assert sorted(os.listdir(tmp_path / "sum")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_token_gate_cannot_merge_or_export(tmp_path):
    _, cgc = make("llama", gate="token")
    ids = inputs()
    out = cgc(input_ids=ids, task_ids=[0, 1, 2, -1]).logits
    close(out[1], cgc(input_ids=ids[1:2], task_ids=1).logits[0])
    for call in (lambda: cgc.merge_task("qa"), lambda: cgc.export_peft_adapter("qa", tmp_path),
                 lambda: cgc.gate_weights("qa")):
        with pytest.raises(ValueError, match="token gate"):
            call()


# ---- save / load -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,gate", [
    ("llama", {}),                                    # per-layer task gates
    ("gpt2", {}),                                     # Conv1D base layers
    ("llama", {"gate_scope": "model"}),               # one gate for the whole model, saved once
    ("llama", {"gate_embedding_dim": 4}),             # gate from a task embedding
    ("gpt2", {"gate": "token"}),                      # token gate rows per task
])
def test_save_load_round_trip_is_exact(arch, gate, tmp_path):
    base, cgc = make(arch, **gate)
    ids = inputs()
    tids = [0, 1, 2, -1]
    cgc.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cgc_adapter.safetensors", "cgc_config.json"]
    loaded = CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.cgc_config == cgc.cgc_config
    assert torch.equal(loaded(input_ids=ids, task_ids=tids).logits, cgc(input_ids=ids, task_ids=tids).logits)
    from safetensors.torch import load_file

    keys = list(load_file(tmp_path / "cgc_adapter.safetensors"))
    kinds = ("shared_a[", "shared_b[", "task_a[", "task_b[", "gate[")
    assert all(any(kind in k for kind in kinds) for k in keys)  # adapter + gates only, no base weights
    if gate.get("gate_scope") == "model":
        assert [k for k in keys if "gate" in k] == ["gate[default].logits"]


def test_load_mismatch_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    base, cgc = make("llama")
    cgc.save_pretrained(tmp_path)
    other = tiny_base("llama", hidden=48)  # other base shapes
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.shared_a\[default\]"):
        CGCModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, CGCLoRALinear) for m in other.modules())  # left as it was
    path = tmp_path / "cgc_adapter.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.task_b[sum]"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.mlp\.down_proj\.task_b\[sum\]'"):
        CGCModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    _, cgc = make("llama")
    cgc.save_pretrained(tmp_path)
    old = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    randomize(cgc, seed=9)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(save_load, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cgc.save_pretrained(tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == old  # no temp files left


# ---- generation --------------------------------------------------------------------------------
def left_padded(batch=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 4, 2][:batch]
    L = max(lengths)
    ids = torch.zeros(batch, L, dtype=torch.long)
    mask = torch.zeros(batch, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, L - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, L - n:] = 1
    return ids, mask


GEN = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", [
    dict(do_sample=False),                                              # greedy, KV cache
    dict(do_sample=False, num_beams=3, num_return_sequences=2),         # beams repeat each row's task
    dict(do_sample=True, top_k=1, num_return_sequences=2),              # sampling path, made deterministic
])
def test_mixed_task_generation_equals_per_task(arch, mode):
    base, cgc = make(arch)
    ids, mask = left_padded()
    tids = torch.tensor([0, 2, 1, 2])
    mixed = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=tids, **GEN, **mode)
    n = mode.get("num_return_sequences", 1)
    assert mixed.shape == (4 * n, ids.shape[1] + GEN["max_new_tokens"])
    for t in range(3):
        rows = (tids == t).nonzero().squeeze(1)
        alone = cgc.generate(input_ids=ids[rows], attention_mask=mask[rows], task_ids=[t] * len(rows),
                             **GEN, **mode)
        out_rows = (rows[:, None] * n + torch.arange(n)).reshape(-1)
        assert torch.equal(mixed[out_rows], alone)
    plain = base.generate(input_ids=ids, attention_mask=mask, **GEN, **mode)
    assert not torch.equal(mixed, plain)


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_changes_only_adapters(arch):
    base, cgc = make(arch, seed=2)
    cgc.train()
    ids = inputs(batch=6, seq=8)
    tids = [0, 1, 2, 0, 1, 2]
    trainable = {n: p.detach().clone() for n, p in cgc.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in cgc.named_parameters() if not p.requires_grad}
    assert trainable and all(("shared_" in n or "task_" in n or ".gate." in n) for n in trainable)
    opt = torch.optim.Adam([p for p in cgc.parameters() if p.requires_grad], lr=1e-2)
    losses = train_steps(cgc, ids, tids, opt, 6)
    assert losses[-1] < losses[0] - 0.05
    for n, p in cgc.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, trainable[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    def build(checkpointing):
        _, cgc = make(arch)
        cgc.train()
        if checkpointing:
            cgc.activation_checkpointing_enable()
            assert cgc.is_gradient_checkpointing
        return cgc

    check_checkpointing(build)


# ---- gates -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "model"])
def test_gate_weights(scope):
    _, cgc = make("llama", gate_scope=scope)
    per_task = cgc.gate_weights("sum")
    every = cgc.gate_weights()
    assert list(per_task) == list(cgc.adapted_layers())
    for name, g in per_task.items():
        assert g.shape == (3,)
        close(g.sum(), torch.tensor(1.0, dtype=g.dtype))
        assert torch.equal(every[name][1], g) and every[name].shape == (3, 3)
    rows = torch.stack(list(per_task.values()))
    if scope == "model":  # one gate: every layer mixes its experts the same way
        assert torch.equal(rows, rows[:1].expand_as(rows))
        gates = {id(layer.gate.parts[0]) for layer in cgc.adapted_layers().values()}
        assert len(gates) == 1
    else:
        assert not torch.equal(rows[0], rows[1])


# ---- 1+N: clusters -----------------------------------------------------------------------------
def test_two_clusters_on_one_base_serve_a_mixed_batch(tmp_path):
    base = tiny_base("llama")
    shape = dict(num_shared_experts=2, num_task_experts=1, rank=2, alpha=4, target_modules=TARGETS["llama"])
    a = CGCModel(copy.deepcopy(base), CGCLoRAConfig(tasks=["qa", "sum"], **shape))
    randomize(a, seed=11)
    b = CGCModel(copy.deepcopy(base), CGCLoRAConfig(tasks=["cls", "tag", "mt"], **shape))
    randomize(b, seed=12)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")

    both = CGCModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with pytest.raises(ValueError, match="'default' .* already exists"):
        both.load_cluster(tmp_path / "b")  # both modules were saved as the default cluster
    assert both.load_cluster(tmp_path / "b", name="second") == ["second"]
    assert both.clusters == ["default", "second"]
    assert both.tasks == ["qa", "sum", "cls", "tag", "mt"]
    layer = next(iter(both.adapted_layers().values()))
    assert layer.shared_a.shape[0] == 2 and layer.task_a.shape[0] == 5

    ids = inputs(batch=6)
    names = ["cls", "qa", "mt", "sum", "tag", "qa"]
    out = both(input_ids=ids, task_ids=names).logits
    for i, t in enumerate(names):
        src = a if t in a.tasks else b
        close(out[i], src(input_ids=ids[i:i + 1], task_ids=t).logits[0])


def test_cluster_add_remove_and_plug_in(tmp_path):
    base, cgc = make("llama")  # cluster "default": qa, sum, cls
    ids = inputs()
    before = cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits
    shape = dict(num_shared_experts=2, num_task_experts=1, rank=2, alpha=4, target_modules=TARGETS["llama"])
    cgc.add_cluster("code", CGCLoRAConfig(tasks=["py", "sql"], **shape))
    assert cgc.clusters == ["default", "code"] and cgc.tasks == TASKS + ["py", "sql"]
    # existing tasks are untouched; a fresh cluster (B = 0) is the base model
    close(cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits, before)
    close(cgc(input_ids=ids, task_ids="py").logits, base(input_ids=ids).logits)
    randomize_cluster = next(iter(cgc.adapted_layers().values()))
    with torch.no_grad():
        randomize_cluster.task_b[3].fill_(0.5)
    py_out = cgc(input_ids=ids, task_ids="py").logits
    cgc.save_cluster("code", tmp_path / "code")

    cgc.remove_cluster("code")
    close(cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits, before)
    with pytest.raises(ValueError, match="unknown task 'py'"):
        cgc(input_ids=ids, task_ids="py")
    assert cgc.load_cluster(tmp_path / "code") == ["code"]
    close(cgc(input_ids=ids, task_ids="py").logits, py_out)

    with pytest.raises(ValueError, match="rank"):
        cgc.add_cluster("bad", CGCLoRAConfig(tasks=["x"], **{**shape, "rank": 4}))
    with pytest.raises(ValueError, match="already belong"):
        cgc.add_cluster("dup", CGCLoRAConfig(tasks=["qa"], **shape))
    with pytest.raises(ValueError, match="already exists"):
        cgc.load_cluster(tmp_path / "code")
    with pytest.raises(ValueError, match="only cluster"):
        CGCModel(tiny_base("llama"), CGCLoRAConfig(tasks=["x"], **shape)).remove_cluster("default")
    assert cgc.clusters == ["default", "code"]


def test_clusters_from_one_config_and_exports():
    # clusters given in the config: two clusters, each with its own shared experts
    base, cgc = make("gpt2", clusters={"qa": "read", "sum": "write", "cls": "read"})
    assert cgc.clusters == ["read", "write"] and cgc.tasks == ["qa", "cls", "sum"]
    ids = inputs()
    for task in ["cls", "sum"]:
        close(cgc.merge_task(task)(input_ids=ids).logits, cgc(input_ids=ids, task_ids=task).logits)


# ---- construction, unload, errors --------------------------------------------------------------
def test_injection_is_reversible_and_freezes_the_base():
    base = tiny_base("llama")
    model = copy.deepcopy(base)
    cgc = CGCModel(model, CGCLoRAConfig(tasks=TASKS, rank=2, target_modules=r".*\.(q|v)_proj"))
    assert len(cgc.adapted_layers()) == 4
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n or "embed" in n)
    restored = cgc.unload()
    assert restored is model and not any(isinstance(m, CGCLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    ids = inputs()
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_task_ids_as_ints_with_none_and_numpy_arrays():
    import numpy as np

    _, cgc = make("llama")
    ids = inputs()
    want = cgc(input_ids=ids, task_ids=torch.tensor([0, -1, 2, 1])).logits
    differ(want[0], want[1])
    for tids in ([0, None, 2, 1], ["qa", None, 2, "sum"], np.array([0, -1, 2, 1]),
                 np.array([0, -1, 2, 1], dtype=np.int32), np.array(["qa", None, "cls", 1], dtype=object),
                 (np.int64(0), None, 2, np.int32(1))):
        assert torch.equal(cgc(input_ids=ids, task_ids=tids).logits, want), tids
    per_token = np.array([[0] * 6, [-1] * 6, [2] * 6, [1] * 6])
    assert torch.equal(cgc(input_ids=ids, task_ids=per_token).logits, want)
    assert torch.equal(cgc(input_ids=ids, task_ids=[[0] * 6, [None] * 6, [2] * 6, [1] * 6]).logits, want)
    one = cgc(input_ids=ids, task_ids=np.int64(2)).logits
    assert torch.equal(one, cgc(input_ids=ids, task_ids=2).logits)
    with pytest.raises(ValueError, match="numpy array of float"):
        cgc(input_ids=ids, task_ids=np.array([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="names, ints or None"):
        cgc(input_ids=ids, task_ids=[0, True, 1, 0])


def test_bad_task_ids_give_clear_errors():
    _, cgc = make("llama")
    ids = inputs()
    cases = [
        (["qa", "sum", "nope", "qa"], "unknown task 'nope'"),
        ([0, 1, 3, 0], r"\[-1, 3\).*3"),
        ([0, 1, -2, 0], r"\[-1, 3\).*-2"),
        ([0, 1], "2 rows but the batch has 4"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer"),
        (torch.zeros(4, 5, dtype=torch.long), r"per-token task_ids are \(4, 5\)"),
        (None, "task_ids is required"),
        (["qa", [1], "sum", 0], "names, ints or None"),
        (["qa", 1, "sum", 7], r"\[-1, 3\).*7"),
    ]
    for tids, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cgc(input_ids=ids, task_ids=tids)
    with pytest.raises(ValueError, match="one task per sequence"):
        cgc.generate(input_ids=ids, task_ids=torch.zeros(4, 6, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="no task ids"):
        cgc.model(input_ids=ids)  # the base model called directly: no routing
    for layer in cgc.adapted_layers().values():
        assert layer.current_routing is None  # cleared after the failing forward too


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match="matches target_modules"):
        CGCModel(tiny_base("llama"), CGCLoRAConfig(tasks=["a"], target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="not nn.Linear or Conv1D"):
        CGCModel(tiny_base("llama"), CGCLoRAConfig(tasks=["a"], target_modules=["embed_tokens"]))
    _, cgc = make("llama")
    with pytest.raises(ValueError, match="already holds"):
        CGCModel(cgc.model, CGCLoRAConfig(tasks=["a"]))
