"""CGCDataCollator, and CGCModel trained through transformers.Trainer (task_ids survive its
column filtering; loss on the response only)."""

from __future__ import annotations

import functools

import pytest
import torch

from cgc_kernels import CGCDataCollator
from cgc_kernels.adapter.checkpointing import checkpointing_training_argument
from tests.models import TASKS, VOCAB, make


def test_collator_pads_masks_prompts_and_maps_names():
    collate = CGCDataCollator(pad_token_id=0, tasks=TASKS)
    batch = collate([
        {"input_ids": [5, 6, 7, 8], "task_ids": "sum", "prompt_length": 2},
        {"input_ids": [9, 10], "task_ids": 2},
    ])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 7, 8], [9, 10, -100, -100]]))
    assert torch.equal(batch["task_ids"], torch.tensor([1, 2]))


def test_collator_left_padding_per_token_ids_and_multiple_of():
    collate = CGCDataCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    batch = collate([
        {"input_ids": [5, 6, 7], "task_ids": [0, 0, 1], "labels": [-100, 6, 7]},
        {"input_ids": [9], "task_ids": [2]},
    ])
    assert torch.equal(batch["input_ids"], torch.tensor([[0, 5, 6, 7], [0, 0, 0, 9]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 6, 7], [-100, -100, -100, 9]]))
    assert torch.equal(batch["task_ids"], torch.tensor([[-1, 0, 0, 1], [-1, -1, -1, 2]]))


def test_collator_keeps_a_given_attention_mask_and_takes_none_as_the_base_model():
    import numpy as np

    collate = CGCDataCollator(pad_token_id=0, tasks=TASKS)
    batch = collate([
        {"input_ids": [5, 6, 7], "attention_mask": [0, 1, 1], "task_ids": None},  # a masked first token
        {"input_ids": [9, 10], "task_ids": np.int64(2)},
        {"input_ids": [4], "attention_mask": torch.tensor([1]), "task_ids": "qa"},
    ])
    # Rows come grouped by task (group_by_task, stable), each with its own ids and mask.
    assert torch.equal(batch["task_ids"], torch.tensor([-1, 0, 2]))
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [4, 0, 0], [9, 10, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[0, 1, 1], [1, 0, 0], [1, 1, 0]]))
    per_token = CGCDataCollator(pad_token_id=0)([{"input_ids": [5, 6], "task_ids": [None, 1]}])
    assert torch.equal(per_token["task_ids"], torch.tensor([[-1, 1]]))
    with pytest.raises(ValueError, match="attention_mask has 1 entries, input_ids 2"):
        collate([{"input_ids": [5, 6], "attention_mask": [1], "task_ids": 0}])


def test_collator_errors():
    collate = CGCDataCollator(pad_token_id=0, tasks=TASKS, response_only=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collate([{"input_ids": [1, 2], "task_ids": 0}])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        collate([{"input_ids": [1, 2], "task_ids": "nope", "prompt_length": 1}])
    with pytest.raises(ValueError, match="prompt_length 5"):
        collate([{"input_ids": [1, 2], "task_ids": 0, "prompt_length": 5}])
    with pytest.raises(ValueError, match="per-token"):
        CGCDataCollator(pad_token_id=0)([{"input_ids": [1, 2], "task_ids": [0]}])
    with pytest.raises(ValueError, match="padding_side"):
        CGCDataCollator(pad_token_id=0, padding_side="middle")


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_trainer_trains_with_task_ids(remove_unused_columns, tmp_path):
    from transformers import Trainer, TrainingArguments

    _, cgc = make("llama", seed=4)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(16):
        n = 4 + i % 4
        ex = {"input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist(), "task_ids": TASKS[i % 3]}
        if not remove_unused_columns:  # Trainer keeps prompt_length only when told not to filter
            ex["prompt_length"] = 2
        examples.append(ex)
    collate = CGCDataCollator(pad_token_id=0, tasks=cgc.tasks, response_only=not remove_unused_columns)
    before = {n: p.detach().clone() for n, p in cgc.named_parameters() if p.requires_grad}
    seen = []
    original_forward = cgc.forward

    @functools.wraps(original_forward)  # keeps forward's signature, which Trainer filters columns by
    def spy(**kw):  # what reaches the model after Trainer's column filtering
        seen.append(kw)
        return original_forward(**kw)

    cgc.forward = spy
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], logging_steps=1,
                             remove_unused_columns=remove_unused_columns, use_cpu=True,
                             dataloader_num_workers=0,
                             **checkpointing_training_argument(not remove_unused_columns))  # via CGCModel's hook
    trainer = Trainer(model=cgc, args=args, train_dataset=examples, data_collator=collate)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(kw["task_ids"].shape == (4,) for kw in seen) and len(seen) == 4
    assert cgc.is_activation_checkpointing == (not remove_unused_columns)
    if not remove_unused_columns:
        assert all((kw["labels"][:, :2] == -100).all() for kw in seen)  # loss on the response only
    changed = [n for n, p in cgc.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
