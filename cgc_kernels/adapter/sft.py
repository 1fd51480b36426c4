"""CGCSFTTrainer: TRL's SFTTrainer for a CGCModel, with CGCTrainer's adapter-only checkpoints.

    trainer = CGCSFTTrainer(model=cgc, args=SFTConfig(output_dir="run", max_steps=100),
                            train_dataset=ds, processing_class=tokenizer)   # ds: a `task` column
    trainer.train()                                    # run/checkpoint-N/: the adapter only
    CGCModel.from_pretrained(fresh_base, "run/checkpoint-100")

TRL tokenizes the dataset as usual (its formats: prompt/completion, messages, text, or already
tokenized input_ids and labels, e.g. from `encode_dataset`); the `task` column (a task name per
row, or `task_ids`) stays beside the tokens, and a CGCDataCollator pads each batch with every
row's task. Everything else is CGCTrainerMixin's (trainer.py).

A plain `trl.SFTTrainer(model=cgc, ...)` trains a CGCModel too (CGCModel answers what TRL calls on
its model: see trl_support.py), given `data_collator=CGCDataCollator(pad, tasks=cgc.tasks)` and
`SFTConfig(remove_unused_columns=False)` so that the task column reaches the batches; its
checkpoints then hold the whole model's state dict, the frozen base included.

Refused, because a row's task must stay with its tokens: packing and padding-free batches (TRL
concatenates rows of different tasks into one sequence and keeps input_ids and labels only).
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from .trainer import CGCTrainerMixin


class CGCSFTTrainer(CGCTrainerMixin, SFTTrainer):
    """trl.SFTTrainer whose batches carry each row's task and whose checkpoints hold the CGC-LoRA
    adapter only; every SFTTrainer argument works as TRL documents it, except packing."""

    def __init__(self, model=None, args: SFTConfig | None = None, data_collator=None, **kwargs):
        for name in ("packing", "eval_packing", "padding_free"):
            if getattr(args, name, None):
                raise ValueError(
                    f"{type(self).__name__} does not support {name}=True: it joins rows of different tasks into "
                    f"one sequence and drops their task column, so no row would be trained as its task")
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
