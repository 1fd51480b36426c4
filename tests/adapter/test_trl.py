"""TRL's SFTTrainer (and transformers.Trainer) training a CGCModel on a mixed-task dataset with a
`task` column: each row trains its own task's experts, checkpoints hold the adapter only and
reload with CGCModel.from_pretrained to the same outputs, and TRL's fused-LM-head loss equals the
model's own loss on the same batch."""

import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from cgc_kernels import CGCDataCollator, CGCLoRAConfig, CGCModel, CGCSFTTrainer, CGCTrainer, encode_dataset  # noqa: E402
from cgc_kernels.multitask.models import tiny_model  # noqa: E402

TASKS = ["add", "upper", "unused"]  # "unused" has no row: its experts must not move


def chat_rows(n: int = 8) -> list[dict]:
    return [{"task": "add" if i % 2 else "upper",
             "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def make_cgc() -> CGCModel:
    base, tok = tiny_model()
    return CGCModel(base, CGCLoRAConfig(tasks=TASKS, rank=4, target_modules=["q_proj", "v_proj"])), tok


def sft_args(out, **kw) -> SFTConfig:
    """Two steps of 4 rows, a checkpoint after the second; float32 (TRL's default bf16 autocast
    would make the reloaded adapter's float32 outputs differ in their last digits)."""
    return SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                     learning_rate=1e-2, save_steps=2, report_to=[], logging_steps=1, max_length=64, use_cpu=True,
                     bf16=False, disable_tqdm=True, seed=0, **kw)


def task_b_moves(cgc, before) -> list[float]:
    """Per task, the largest change of the task experts' B in the first adapted layer."""
    name, p = next((n, p) for n, p in cgc.named_parameters() if n.endswith("task_b"))
    return (p.detach() - before[name]).abs().amax(dim=(1, 2)).tolist()


def trainable_copy(cgc) -> dict:
    return {n: p.detach().clone() for n, p in cgc.named_parameters() if p.requires_grad}


def test_cgc_sft_trainer_trains_each_row_as_its_task_and_saves_the_adapter_only(tmp_path):
    cgc, tok = make_cgc()
    before = trainable_copy(cgc)
    ds = Dataset.from_list(chat_rows())
    trainer = CGCSFTTrainer(model=cgc, args=sft_args(tmp_path), train_dataset=ds, eval_dataset=ds,
                            processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    moved = task_b_moves(cgc, before)
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0, moved  # add, upper trained; unused untouched

    # TRL's loss (the fused LM head on the wrapped model, routed by task) equals the model's own
    # loss on the same batch (the full logits, transformers' cross entropy).
    metrics = trainer.evaluate()
    batch = next(iter(trainer.get_eval_dataloader()))
    assert sorted(batch["task_ids"].tolist()) == [0] * 4 + [1] * 4
    cgc.eval()
    with torch.no_grad():
        own = cgc(**{k: v for k, v in batch.items()}).loss.item()
    assert metrics["eval_loss"] == pytest.approx(own, rel=1e-5)

    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"cgc_adapter.safetensors", "cgc_config.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files  # the frozen base is not written
    fresh, _ = tiny_model()
    reloaded = CGCModel.from_pretrained(fresh, str(ckpt)).eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        want = cgc(input_ids=ids, attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]).logits
        got = reloaded(input_ids=ids, attention_mask=batch["attention_mask"], task_ids=batch["task_ids"]).logits
    torch.testing.assert_close(got, want)
    assert "trl" in (cgc.model_tags or []) and "sft" in cgc.model_tags


def test_plain_sft_trainer_with_the_collator_and_the_task_column_kept(tmp_path):
    cgc, tok = make_cgc()
    before = trainable_copy(cgc)
    rows = [{"task": r["task"], "prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
            for r in chat_rows()]
    trainer = SFTTrainer(model=cgc, args=sft_args(tmp_path, remove_unused_columns=False),
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         data_collator=CGCDataCollator(tok.pad_token_id, tasks=cgc.tasks))
    trainer.train()
    moved = task_b_moves(cgc, before)
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0, moved


def test_plain_sft_trainer_without_the_task_column_refuses_to_train(tmp_path):
    cgc, tok = make_cgc()
    trainer = SFTTrainer(model=cgc, args=sft_args(tmp_path), train_dataset=Dataset.from_list(chat_rows()),
                         processing_class=tok)
    with pytest.raises(ValueError, match="task_ids is required"):  # TRL's collator drops the task column
        trainer.train()


@pytest.mark.parametrize("option", [{"packing": True}, {"padding_free": True}])
def test_packing_across_tasks_is_refused(tmp_path, option):
    cgc, tok = make_cgc()
    with pytest.raises(ValueError, match="no row would be trained as its task"):
        CGCSFTTrainer(model=cgc, args=sft_args(tmp_path, **option), train_dataset=Dataset.from_list(chat_rows()),
                      processing_class=tok)


def test_transformers_trainer_and_the_task_column(tmp_path):
    """encode_dataset's columns survive any Trainer; a `task` column survives CGCTrainer, and a plain
    Trainer that drops it is told why."""
    cgc, tok = make_cgc()
    encoded = encode_dataset(chat_rows(), tok, cgc.tasks, max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    collator = CGCDataCollator(tok.pad_token_id, tasks=cgc.tasks)
    before = trainable_copy(cgc)
    Trainer(model=cgc, args=args, train_dataset=encoded, data_collator=collator).train()
    moved = task_b_moves(cgc, before)
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0, moved

    named = encoded.remove_columns("task_ids").add_column("task", [r["task"] for r in chat_rows()])
    CGCTrainer(model=cgc, args=args, train_dataset=named, processing_class=tok).train()
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        Trainer(model=cgc, args=args, train_dataset=named, data_collator=collator).train()
