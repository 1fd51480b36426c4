"""CGCDataCollator: pads multi-task examples into a CGCModel batch (for transformers.Trainer too).

Each example is a dict:

    input_ids      list[int]                    the tokens (prompt + response)
    task_ids       str | int | None | list[int] its task (name or id; None or -1 = the base model),
                                                or one id per token (packing); or, without
                                                task_ids, `task` (a task name, a data file's column)
    labels         list[int], optional          targets; default: input_ids
    attention_mask list[int], optional          kept as given (padded with 0); default: all ones
    prompt_length  int, optional                tokens of the prompt: their labels become -100

The batch: input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 on padding and, with
prompt lengths, on the prompt), task_ids [B] (or [B, L] with per-token ids, padded with -1).

Trainer keeps only the columns that the model's forward names: CGCModel.forward names task_ids
and labels, so they survive; `task` and `prompt_length` are not forward arguments, so with a plain
transformers.Trainer either pass TrainingArguments(remove_unused_columns=False), or use CGCTrainer
(which keeps them), or examples from `encode_dataset` (input_ids, labels, task_ids).
`response_only=True` makes an example with neither labels nor prompt_length an error instead of a
silent full-sequence loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class CGCDataCollator:
    """Pad examples to the longest one (or a multiple of `pad_to_multiple_of`).

    Attributes:
        pad_token_id: id written into padded input positions.
        tasks: task names, in global order (CGCModel.tasks), to turn names into ids; None = ids only.
        padding_side: "right" (training) or "left" (generation).
        label_pad_token_id: label of padded and prompt positions.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        response_only: every example must give prompt_length (loss on the response only).
        group_by_task: order the batch's rows by task (stable; one id per sequence only), so that
            every task is a contiguous slice of each adapted layer's input (no gather). Every
            column moves with its row, so a loss or a metric over the batch is unchanged.
    """

    pad_token_id: int
    tasks: Sequence[str] | None = None
    padding_side: str = "right"
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    response_only: bool = False
    group_by_task: bool = True

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {self.pad_to_multiple_of}")
        if self.tasks is not None:
            self.tasks = list(self.tasks)

    def _task_id(self, task) -> int:
        if isinstance(task, torch.Tensor) or type(task).__module__ == "numpy":
            task = task.item()
        if task is None:
            return -1  # the base model, as CGCModel reads -1
        if isinstance(task, str):
            if self.tasks is None or task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise ValueError(f"task_ids must be a task name or int, got {task!r}")
        return task

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        rows = []
        for i, f in enumerate(features):
            if "input_ids" not in f:
                raise ValueError(f"example {i} needs input_ids, has {sorted(f)}")
            if "task_ids" not in f and "task" not in f:
                raise ValueError(
                    f"example {i} has no task_ids and no task column (it has {sorted(f)}): transformers.Trainer "
                    f"drops the columns that the model's forward does not name, `task` among them; use CGCTrainer, "
                    f"or TrainingArguments(remove_unused_columns=False), or name the column task_ids (TRL's packing "
                    f"keeps input_ids and labels only: it cannot train several tasks)")
            ids = [int(t) for t in _as_list(f["input_ids"])]
            labels = [int(t) for t in _as_list(f["labels"])] if f.get("labels") is not None else list(ids)
            if len(labels) != len(ids):
                raise ValueError(f"example {i}: labels has {len(labels)} tokens, input_ids {len(ids)}")
            if f.get("attention_mask") is not None:
                mask = [int(t) for t in _as_list(f["attention_mask"])]
                if len(mask) != len(ids):
                    raise ValueError(f"example {i}: attention_mask has {len(mask)} entries, input_ids {len(ids)}")
            else:
                mask = [1] * len(ids)
            prompt = f.get("prompt_length")
            if prompt is None and self.response_only and f.get("labels") is None:
                raise ValueError(
                    f"example {i} has neither labels nor prompt_length but response_only=True (with Trainer, pass "
                    f"TrainingArguments(remove_unused_columns=False): it drops columns forward does not name)"
                )
            if prompt is not None:
                prompt = int(prompt)
                if not 0 <= prompt <= len(ids):
                    raise ValueError(f"example {i}: prompt_length {prompt} outside [0, {len(ids)}]")
                labels[:prompt] = [self.label_pad_token_id] * prompt
            task = f["task_ids"] if "task_ids" in f else f["task"]
            if isinstance(task, torch.Tensor) and task.dim() == 0:
                task = task.item()
            if type(task).__module__ == "numpy":
                task = task.tolist()
            if isinstance(task, (list, tuple, torch.Tensor)):
                task = [self._task_id(t) for t in _as_list(task)]
                if len(task) != len(ids):
                    raise ValueError(
                        f"example {i}: per-token task_ids has {len(task)} entries, input_ids {len(ids)}"
                    )
            else:
                task = self._task_id(task)
            rows.append((ids, labels, task, mask))

        per_token = [isinstance(t, list) for _, _, t, _ in rows]
        if any(per_token) and not all(per_token):
            raise ValueError("either every example gives one task id per token or none does")
        if self.group_by_task and not any(per_token):
            rows.sort(key=lambda row: row[2])  # stable: a task's examples keep their order
        length = max(len(ids) for ids, _, _, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(seq, value):
            fill = [value] * (length - len(seq))
            return fill + seq if self.padding_side == "left" else seq + fill

        long = lambda seqs: torch.tensor(seqs, dtype=torch.long)
        batch = {
            "input_ids": long([pad(ids, self.pad_token_id) for ids, _, _, _ in rows]),
            "attention_mask": long([pad(mask, 0) for _, _, _, mask in rows]),
            "labels": long([pad(lab, self.label_pad_token_id) for _, lab, _, _ in rows]),
        }
        if all(per_token):
            batch["task_ids"] = long([pad(t, -1) for _, _, t, _ in rows])
        else:
            batch["task_ids"] = long([t for _, _, t, _ in rows])
        return batch


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)
