"""CGCTrainer: adapter-only checkpoints that CGCModel.from_pretrained reads, and a resumed run that
ends where the uninterrupted one ends."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from cgc_kernels import CGCDataCollator, CGCLoRAConfig, CGCModel, CGCTrainer
from cgc_kernels.adapter.trainer import ResumeError
from tests.models import TARGETS, TASKS, VOCAB, inputs, tiny_base


def examples(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, VOCAB, (4 + i % 4,), generator=g).tolist(), "task_ids": TASKS[i % 3]}
            for i in range(n)]


def fresh(base) -> CGCModel:
    torch.manual_seed(7)  # the same A initialisation in every run
    return CGCModel(copy.deepcopy(base), CGCLoRAConfig(tasks=TASKS, rank=2, alpha=4, target_modules=TARGETS["llama"]))


def trainer_for(cgc, out, **overrides):
    from transformers import TrainingArguments

    kw = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
              save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, dataloader_num_workers=0,
              lr_scheduler_type="linear", seed=0, disable_tqdm=True)
    kw.update(overrides)
    return CGCTrainer(model=cgc, args=TrainingArguments(**kw), train_dataset=examples(),
                      data_collator=CGCDataCollator(pad_token_id=0, tasks=cgc.tasks))


def adapter(cgc) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cgc.named_parameters() if p.requires_grad}


def test_checkpoints_hold_the_adapter_only_and_load_with_from_pretrained(tmp_path):
    base = tiny_base("llama").float()
    cgc = fresh(base)
    trainer_for(cgc, tmp_path).train()
    for step in (2, 4):
        files = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert {"cgc_config.json", "cgc_adapter.safetensors", "optimizer.pt", "trainer_state.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}  # the frozen base is never written
    loaded = CGCModel.from_pretrained(copy.deepcopy(base), tmp_path / "checkpoint-4")
    ids = inputs()
    cgc.eval()
    assert torch.equal(loaded(input_ids=ids, task_ids=[0, 1, 2, 0]).logits,
                       cgc(input_ids=ids, task_ids=[0, 1, 2, 0]).logits)


def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path):
    base = tiny_base("llama").float()
    straight = fresh(base)
    trainer_for(straight, tmp_path / "a").train()
    resumed = fresh(base)
    assert not all(torch.equal(v, adapter(straight)[k]) for k, v in adapter(resumed).items())
    trainer_for(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want = adapter(straight)
    for k, v in adapter(resumed).items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)


def test_resume_from_a_directory_without_an_adapter_is_a_clear_error(tmp_path):
    cgc = fresh(tiny_base("llama").float())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="is not a CGC-LoRA checkpoint: no cgc_adapter.safetensors"):
        trainer_for(cgc, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "empty"))
    other = CGCModel(tiny_base("llama"), CGCLoRAConfig(tasks=["x", "y"], rank=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ResumeError, match=r"saved for tasks \['x', 'y'\]"):
        trainer_for(cgc, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "other"))


def test_default_collator_from_the_tokenizer_and_bad_models(tmp_path):
    from transformers import TrainingArguments

    from cgc_kernels.multitask.models import tiny_model

    base, tok = tiny_model()
    cgc = CGCModel(base, CGCLoRAConfig(tasks=TASKS, rank=2, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             per_device_train_batch_size=4)
    rows = [{"input_ids": tok("abc")["input_ids"], "task_ids": t} for t in TASKS + ["qa"]]
    trainer = CGCTrainer(model=cgc, args=args, train_dataset=rows, processing_class=tok)
    assert isinstance(trainer.data_collator, CGCDataCollator) and trainer.data_collator.tasks == TASKS
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert {"cgc_adapter.safetensors", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "final"))
    with pytest.raises(ValueError, match="trains a CGCModel"):
        CGCTrainer(model=base, args=args, train_dataset=rows)
    # A tokenizer without a pad token (Llama-style) pads with its end-of-text token, as TRL does.
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    trainer = CGCTrainer(model=cgc, args=args, train_dataset=rows, processing_class=tok)
    assert trainer.data_collator.pad_token_id == tok.eos_token_id
