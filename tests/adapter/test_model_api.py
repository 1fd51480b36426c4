"""CGCModel's PEFT / transformers surface: task selection and pipelines, disable_adapter, PEFT's
calls, target_modules, in-place and tied-weight merges, adapter dtypes, checkpointing in either
order, from_pretrained for inference.

Each check compares against an independent computation: the base model's own outputs, explicit
task ids, PEFT's own counting and format, generate against pipeline, the merged model against the
unified one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCLoRAConfig, CGCModel
from cgc_kernels.adapter.checkpointing import enable_model_checkpointing
from cgc_kernels.adapter.targets import summarize_targets
from tests.models import TARGETS, TASKS, VOCAB, check_checkpointing, close, differ, inputs, make, randomize, tiny_base


# ---- task selection ----------------------------------------------------------------------------
def test_set_task_and_task_context_equal_explicit_ids():
    _, cgc = make("llama")
    ids = inputs()
    with pytest.raises(ValueError, match="set_task"):
        cgc(input_ids=ids)  # nothing selected: ids are required, and the error says how to select
    want = {t: cgc(input_ids=ids, task_ids=t).logits for t in TASKS}
    differ(want["qa"], want["sum"])
    cgc.set_task("sum")
    assert cgc.active_task == "sum"
    assert torch.equal(cgc(input_ids=ids).logits, want["sum"])
    assert torch.equal(cgc(input_ids=ids, task_ids="cls").logits, want["cls"])  # explicit ids win
    with cgc.task(0):
        assert cgc.active_task == "qa"
        assert torch.equal(cgc(input_ids=ids).logits, want["qa"])
    assert cgc.active_task == "sum"  # restored after the block
    gen = cgc.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, cgc.generate(input_ids=ids, task_ids="sum", max_new_tokens=3, do_sample=False,
                                         pad_token_id=0))
    cgc.set_task(None)
    assert cgc.active_task is None
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        cgc.set_task("nope")


def test_pipeline_gives_what_generate_gives():
    from transformers import pipeline

    from cgc_kernels.multitask.models import tiny_model

    base, tok = tiny_model()
    cgc = CGCModel(base, CGCLoRAConfig(tasks=TASKS, rank=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize(cgc, seed=2)
    cgc.set_task("cls")
    pipe = pipeline("text-generation", model=cgc, tokenizer=tok)
    prompt = "hello there"
    text = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    enc = tok(prompt, return_tensors="pt")
    out = cgc.generate(**enc, task_ids="cls", max_new_tokens=6, do_sample=False)
    assert text == tok.decode(out[0], skip_special_tokens=True)
    with cgc.disable_adapter():
        base_out = cgc.generate(**enc, max_new_tokens=6, do_sample=False)
    assert not torch.equal(out, base_out)  # the adapter changes the answer, so the check can fail


# ---- disable_adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_adapter_is_the_base_model_exactly(arch):
    base, cgc = make(arch)
    ids = inputs()
    want = base(input_ids=ids).logits
    differ(cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits, want)
    with cgc.disable_adapter():
        assert torch.equal(cgc(input_ids=ids).logits, want)  # no task ids needed
        assert torch.equal(cgc(input_ids=ids, task_ids="sum").logits, want)  # ids ignored
        with cgc.disable_adapter():  # nested
            assert torch.equal(cgc(input_ids=ids).logits, want)
        assert torch.equal(cgc.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0),
                           base.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0))
    differ(cgc(input_ids=ids, task_ids="sum").logits, want)  # enabled again after the block


# ---- PEFT's calls ------------------------------------------------------------------------------
def test_peft_calls_match_peft_on_the_same_counts(capsys):
    from peft import LoraConfig, get_peft_model

    base, cgc = make("llama")
    trainable = sum(p.numel() for p in cgc.parameters() if p.requires_grad)
    total = sum(p.numel() for p in cgc.parameters())
    assert cgc.get_nb_trainable_parameters() == (trainable, total)
    cgc.print_trainable_parameters()
    ours = capsys.readouterr().out
    # PEFT's own line for its own model, to compare the format against
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out
    n, m = peft_model.get_nb_trainable_parameters()
    assert theirs == f"trainable params: {n:,d} || all params: {m:,d} || trainable%: {100 * n / m:.4f}\n"
    assert ours == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " \
                   f"{100 * trainable / total:.4f}\n"
    assert cgc.base_model is cgc.model and cgc.get_base_model() is cgc.model
    assert cgc.get_output_embeddings() is cgc.model.lm_head
    assert cgc.dtype == torch.float64 and cgc.can_generate()
    assert cgc.num_parameters() == total and cgc.num_parameters(only_trainable=True) == trainable
    cgc.enable_input_require_grads()
    assert cgc.get_input_embeddings()(inputs()).requires_grad
    cgc.disable_input_require_grads()


# ---- target_modules ----------------------------------------------------------------------------
def test_all_linear_is_every_linear_but_the_head_as_in_peft():
    from peft import LoraConfig, get_peft_model

    for arch in ["llama", "gpt2"]:
        cgc = CGCModel(tiny_base(arch), CGCLoRAConfig(tasks=["a"], rank=2, target_modules="all-linear"))
        peft_model = get_peft_model(tiny_base(arch), LoraConfig(r=2, target_modules="all-linear"))
        theirs = sorted(n.removeprefix("base_model.model.") for n in peft_model.targeted_module_names)
        assert sorted(cgc.targeted_module_names) == theirs, arch
        assert not any(n.endswith("lm_head") for n in cgc.targeted_module_names)


def test_none_is_peft_default_for_the_architecture():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    for arch in ["llama", "gpt2"]:
        model = tiny_base(arch)
        cgc = CGCModel(model, CGCLoRAConfig(tasks=["a"], rank=2, target_modules=None))
        tails = {n.rpartition(".")[2] for n in cgc.targeted_module_names}
        assert tails == set(mapping[model.config.model_type]), arch


def test_none_without_a_peft_default_is_a_clear_error(monkeypatch):
    model = tiny_base("llama")
    model.config.model_type = "unheard_of"
    with pytest.raises(ValueError, match="no default target modules for model type 'unheard_of'.*q_proj, k_proj"):
        CGCModel(model, CGCLoRAConfig(tasks=["a"], target_modules=None))
    import sys

    monkeypatch.setitem(sys.modules, "peft.utils.constants", None)  # as if peft were not installed
    with pytest.raises(ValueError, match="needs peft"):
        CGCModel(tiny_base("llama"), CGCLoRAConfig(tasks=["a"], target_modules=None))


def test_list_entry_that_matches_nothing_is_an_error_listing_the_linear_modules():
    with pytest.raises(ValueError, match=r"entries \['qkv_proj'\] match no module of LlamaForCausalLM; "
                                         r"its linear modules are: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                         r"up_proj, down_proj, lm_head"):
        CGCModel(tiny_base("llama"), CGCLoRAConfig(tasks=["a"], target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match="its linear modules are: c_attn, c_proj, c_fc, lm_head"):
        CGCModel(tiny_base("gpt2"), CGCLoRAConfig(tasks=["a"], target_modules=["q_proj"]))
    model = tiny_base("llama")
    names = CGCModel(model, CGCLoRAConfig(tasks=["a"], target_modules=["q_proj", "down_proj"])).targeted_module_names
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert summarize_targets(names) == "4 modules: q_proj x2, down_proj x2"
    assert summarize_targets(["lm_head"]) == "1 module: lm_head"


# ---- merging: in place, tied weights -----------------------------------------------------------
def tied(arch: str) -> tuple[torch.nn.Module, list[str]]:
    """A tiny model whose LM head shares the input embedding, with lm_head among the targets."""
    torch.manual_seed(0)
    if arch == "gpt2":  # GPT-2 always ties
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB))
        targets = ["c_attn", "lm_head"]
    else:  # SmolLM2, Gemma, small Qwen models tie their embeddings like this
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             tie_word_embeddings=True))
        targets = ["q_proj", "lm_head"]
    model = model.double().eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model, targets


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("how", ["merge_task", "merge_and_unload"])
def test_merge_with_tied_weights_equals_the_unified_model(arch, how, tmp_path):
    from transformers import AutoModelForCausalLM

    model, targets = tied(arch)
    embedding = model.get_input_embeddings().weight.detach().clone()
    cgc = CGCModel(model, CGCLoRAConfig(tasks=TASKS, rank=2, alpha=4, target_modules=targets))
    randomize(cgc)
    ids = inputs()
    want = cgc(input_ids=ids, task_ids="sum").logits
    merged = getattr(cgc, how)("sum")
    if how == "merge_and_unload":
        assert merged is model  # in place: the base model object itself
    else:
        differ(cgc(input_ids=ids, task_ids="qa").logits, want)  # the wrapper still serves every task
    close(merged(input_ids=ids).logits, want)
    assert torch.equal(merged.get_input_embeddings().weight, embedding)  # the embedding is untouched
    assert merged.lm_head.weight is not merged.get_input_embeddings().weight
    merged.save_pretrained(tmp_path)  # and it stays merged through save / load
    close(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)(input_ids=ids).logits, want)


def test_layer_unmerge_reties_the_weight():
    model, targets = tied("llama")
    cgc = CGCModel(model, CGCLoRAConfig(tasks=TASKS, rank=2, alpha=4, target_modules=targets))
    randomize(cgc)
    head = cgc.adapted_layers()["lm_head"]
    original = head.base_layer.weight
    head.merge(1)
    assert head.base_layer.weight is not original
    assert model.get_input_embeddings().weight is original  # the merge did not write into it
    head.unmerge()
    assert head.base_layer.weight is original is model.get_input_embeddings().weight
    assert "_weight_before_merge" not in dict(head.named_parameters())


def test_merge_and_unload_returns_the_base_model_with_grads_restored():
    base, cgc = make("llama")
    model = cgc.model
    ids = inputs()
    want = cgc(input_ids=ids, task_ids="cls").logits
    merged = cgc.merge_and_unload("cls")
    assert merged is model
    assert not any(type(m).__name__ == "CGCLoRALinear" for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    close(merged(input_ids=ids).logits, want)
    assert cgc.targeted_module_names == []


# ---- adapter dtype -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_are_float32_over_a_low_precision_base(dtype):
    base = tiny_base("llama").to(dtype)
    cgc = CGCModel(copy.deepcopy(base), CGCLoRAConfig(tasks=TASKS, rank=2, target_modules=["q_proj"]))
    assert {p.dtype for p in cgc.parameters() if p.requires_grad} == {torch.float32}
    ids = inputs()
    assert torch.equal(cgc(input_ids=ids, task_ids="qa").logits, base(input_ids=ids).logits)  # B = 0: the base
    cgc.train()
    cgc(input_ids=ids, labels=ids, task_ids=[0, 1, 2, 0]).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cgc.parameters() if p.requires_grad)
    kept = CGCModel(copy.deepcopy(base), CGCLoRAConfig(tasks=TASKS, rank=2, target_modules=["q_proj"]),
                    autocast_adapter_dtype=False)
    layer = next(iter(kept.adapted_layers().values()))
    assert layer.task_a.dtype == dtype and layer.gate.parts[0].logits.dtype == torch.float32


def test_gates_stay_float32_through_to_dtype():
    _, cgc = make("llama", gate_scope="model")
    ids = inputs()
    want = cgc(input_ids=ids, task_ids=[0, 1, 2, -1]).logits
    cgc.to(torch.bfloat16)
    layer = next(iter(cgc.adapted_layers().values()))
    assert layer.task_a.dtype == torch.bfloat16  # .to() casts the experts, as PEFT's
    assert {p.dtype for n, p in cgc.named_parameters() if ".gate." in n} == {torch.float32}
    got = cgc(input_ids=ids, task_ids=[0, 1, 2, -1]).logits  # the op takes fp32 gates with bf16 experts
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0.1, atol=0.15)
    _, token = make("llama", gate="token")
    token.half()
    assert {p.dtype for n, p in token.named_parameters() if ".gate." in n} == {torch.float32}


# ---- gradient checkpointing in either order ----------------------------------------------------
@pytest.mark.parametrize("order", ["through the wrapper", "on the base before wrapping", "on cgc.model"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_in_either_order_gives_the_same_gradients(order, reentrant):
    cfg = CGCLoRAConfig(tasks=TASKS, rank=2, alpha=4, target_modules=TARGETS["llama"])
    kw = {"use_reentrant": reentrant}

    def build(checkpointing):
        base = tiny_base("llama")
        if checkpointing and order == "on the base before wrapping":  # prepare_model_for_kbit_training's order
            enable_model_checkpointing(base, kw)
        cgc = CGCModel(base, cfg)
        randomize(cgc)
        cgc.train()
        if checkpointing and order == "through the wrapper":
            cgc.activation_checkpointing_enable(kw)
        if checkpointing and order == "on cgc.model":
            enable_model_checkpointing(cgc.model, kw)
        assert cgc.is_activation_checkpointing == checkpointing
        return cgc

    check_checkpointing(build)


def test_unload_gives_back_the_plain_checkpoint_functions():
    base = tiny_base("llama")
    enable_model_checkpointing(base)
    layer = base.model.layers[0]
    plain = layer._gradient_checkpointing_func
    cgc = CGCModel(base, CGCLoRAConfig(tasks=TASKS, rank=2, target_modules=["q_proj"]))
    cgc.train()
    cgc(input_ids=inputs(), labels=inputs(), task_ids="qa").loss.backward()
    assert layer._gradient_checkpointing_func is not plain
    copy.deepcopy(cgc.model)  # a copy (merge_task) gets plain functions, not the wrapper's state
    cgc.unload()
    assert layer._gradient_checkpointing_func is plain


# ---- from_pretrained ---------------------------------------------------------------------------
def test_from_pretrained_is_for_inference_unless_trainable(tmp_path):
    base, cgc = make("llama")
    cgc.save_pretrained(tmp_path)
    ids = inputs()
    want = cgc(input_ids=ids, task_ids="sum").logits
    train_mode_base = copy.deepcopy(base).train()
    loaded = CGCModel.from_pretrained(train_mode_base, tmp_path)
    assert not loaded.training and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(input_ids=ids, task_ids="sum").logits, want)
    trainable = CGCModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == cgc.get_nb_trainable_parameters()
