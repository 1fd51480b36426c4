"""CGCTrainer: transformers.Trainer for a CGCModel, with adapter-only checkpoints.

    trainer = CGCTrainer(model=cgc, args=TrainingArguments(output_dir="run", save_steps=50),
                         train_dataset=examples, processing_class=tokenizer)
    trainer.train()                                   # run/checkpoint-50/ ... adapter only
    trainer.train(resume_from_checkpoint=True)        # the last checkpoint-N: adapter, optimizer, step
    CGCModel.from_pretrained(fresh_base, "run/checkpoint-50")

What changes from the stock Trainer (which saves a model that is not a PreTrainedModel as its
whole state dict, the frozen base included, and cannot load it back into a CGCModel):

* `_save` (every checkpoint-N/ and `save_model`) writes `cgc_config.json` +
  `cgc_adapter.safetensors` (CGCModel.save_pretrained), the tokenizer / processor when given,
  and training_args.bin; the optimizer, scheduler, RNG and trainer state are the Trainer's own.
* `_load_from_checkpoint` (resume) and `_load_best_model` (load_best_model_at_end) copy a
  checkpoint's adapter into the live model; a checkpoint of another configuration is a
  `ResumeError` naming the directory and the tensor.
* With no data_collator, a CGCDataCollator padding with the processing class's pad token.
* `gate_lr_ratio`: the task gates train in an AdamW group of their own at that multiple of the
  learning rate (param_groups.parameter_groups), when no optimizer is given.

Sharded training (FSDP, DeepSpeed ZeRO-3) is not handled here: the adapter is saved from the
unwrapped model of each writing process (DDP and single-device training).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from .collator import CGCDataCollator
from .model import CGCModel
from .param_groups import DEFAULT_GATE_LR_RATIO, parameter_groups
from .save_load import read_checkpoint

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the same file


class ResumeError(ValueError):
    """A checkpoint directory that holds no CGC-LoRA adapter of this model."""


class CGCTrainer(Trainer):
    """transformers.Trainer whose checkpoints hold the CGC-LoRA adapter only (see the module
    docstring); every Trainer argument works as documented by transformers."""

    def __init__(self, model: CGCModel | None = None, args=None, data_collator=None, *,
                 gate_lr_ratio: float = DEFAULT_GATE_LR_RATIO, **kwargs):
        if not isinstance(model, CGCModel):
            raise ValueError(f"CGCTrainer trains a CGCModel, got {type(model).__name__}")
        if data_collator is None:
            pad = getattr(kwargs.get("processing_class"), "pad_token_id", None)
            if pad is None:
                raise ValueError("CGCTrainer needs a data_collator, or a processing_class with a pad token "
                                 "to build a CGCDataCollator from")
            data_collator = CGCDataCollator(pad_token_id=pad, tasks=model.tasks)
        self.gate_lr_ratio = gate_lr_ratio
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)

    def create_optimizer(self, model=None):
        """AdamW over the trainable parameters, the gates in a group of their own at
        gate_lr_ratio x the learning rate (no weight decay on them)."""
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(parameter_groups(
                self._cgc(), self.args.learning_rate, gate_lr_ratio=self.gate_lr_ratio,
                weight_decay=self.args.weight_decay))
        return self.optimizer

    def _cgc(self) -> CGCModel:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._cgc().save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter(self.state.best_model_checkpoint)

    def _load_adapter(self, directory: str) -> None:
        cgc = self._cgc()
        try:
            config, tensors = read_checkpoint(directory)
        except (FileNotFoundError, ValueError) as e:
            raise ResumeError(f"{directory} is not a CGC-LoRA checkpoint: {e}") from None
        if config.tasks != cgc.cgc_config.tasks:
            raise ResumeError(f"cannot resume from {directory}: it was saved for tasks {config.tasks}, "
                              f"the model has {cgc.cgc_config.tasks}")
        try:
            cgc._load_adapter_tensors(tensors, cgc.clusters)
        except ValueError as e:
            raise ResumeError(f"cannot resume from {directory}: {e}") from None
