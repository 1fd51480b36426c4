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
* The columns a CGCDataCollator reads survive `remove_unused_columns`: besides the forward's
  arguments (input_ids, labels, task_ids, ...), `task` (a task name) and `prompt_length`.
* `gate_lr_ratio`: the task gates train in an AdamW group of their own at that multiple of the
  learning rate (param_groups.parameter_groups), when no optimizer is given.

Under several processes (torchrun, accelerate launch; docs/distributed.md):

* `train` first copies rank 0's adapter to every rank (sharding.broadcast_adapter), so every rank
  starts from the same experts and gates whatever random state each built them in;
* only the main process writes a checkpoint's adapter (`args.should_save`); under FSDP2 and
  DeepSpeed ZeRO-3 every rank first takes part in gathering the sharded adapter tensors
  (sharding.whole_adapter), and resuming under FSDP2 shards the loaded adapter back.
  accelerate's own copy of the whole model (the frozen base included) is not written into FSDP
  checkpoints: the adapter is what resuming loads;
* the task gates are FSDP2 groups of their own, also when the accelerate config names the decoder
  block class to wrap (FSDP2 flattens one dtype per group; the gates are float32).

CGCTrainerMixin holds all of it, for other Trainer subclasses too: sft.py mixes it into TRL's
SFTTrainer.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from .collator import CGCDataCollator
from .model import CGCModel
from .param_groups import DEFAULT_GATE_LR_RATIO, parameter_groups
from .save_load import read_checkpoint
from .sharding import GATE_CLASSES, broadcast_adapter, whole_adapter

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the same file


class ResumeError(ValueError):
    """A checkpoint directory that holds no CGC-LoRA adapter of this model."""


# Columns a CGCDataCollator reads that are not arguments of the model's forward.
COLLATOR_COLUMNS = ("task", "task_ids", "prompt_length")


class CGCTrainerMixin:
    """A Trainer subclass's changes for a CGCModel (see the module docstring); mix it in before
    the Trainer class: `class T(CGCTrainerMixin, Trainer)`."""

    def __init__(self, model: CGCModel | None = None, args=None, data_collator=None, *,
                 gate_lr_ratio: float = DEFAULT_GATE_LR_RATIO, **kwargs):
        name = type(self).__name__
        if not isinstance(model, CGCModel):
            raise ValueError(f"{name} trains a CGCModel, got {type(model).__name__}")
        if data_collator is None:
            tokenizer = kwargs.get("processing_class")
            pad = getattr(tokenizer, "pad_token_id", None)
            if pad is None:  # Llama-style tokenizers have none: pad with end-of-text, as TRL does
                pad = getattr(tokenizer, "eos_token_id", None)
            if pad is None:
                raise ValueError(f"{name} needs a data_collator, or a processing_class with a pad or "
                                 "end-of-text token to build a CGCDataCollator from")
            data_collator = CGCDataCollator(pad_token_id=pad, tasks=model.tasks)
        self.gate_lr_ratio = gate_lr_ratio
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self._wrap_gates_alone()

    def _wrap_gates_alone(self) -> None:
        """An FSDP config that names the classes to wrap (fsdp_transformer_layer_cls_to_wrap) gets
        the gate classes added: without it, CGCModel._no_split_modules names them already."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        names = getattr(plugin, "transformer_cls_names_to_wrap", None)
        if names is None:
            return
        names = [names] if isinstance(names, str) else list(names)
        present = {type(m).__name__ for m in self.model.modules()}
        plugin.transformer_cls_names_to_wrap = names + [
            c.__name__ for c in GATE_CLASSES if c.__name__ in present and c.__name__ not in names]

    def train(self, *args, **kwargs):
        """transformers' train, after giving every rank rank 0's adapter (a no-op in one process)."""
        broadcast_adapter(self._cgc(), self.args.device)
        return super().train(*args, **kwargs)

    @property
    def _fsdp2(self) -> bool:
        return bool(self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 or DeepSpeed every rank gathers the sharded adapter (ZeRO-3; nothing to gather
        for ZeRO-1/2), then the main process writes it; otherwise transformers' save_model (which
        calls _save on the main process)."""
        if not (self._fsdp2 or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        with whole_adapter(self.model):
            self._save(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # transformers saves the whole FSDP model here (the frozen base too) next to the optimizer;
        # the checkpoint's adapter is what resuming loads, so only the optimizer and scheduler go.
        import transformers.trainer as hf_trainer

        save_fsdp_model = hf_trainer.save_fsdp_model
        hf_trainer.save_fsdp_model = lambda *a, **k: None
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            hf_trainer.save_fsdp_model = save_fsdp_model

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *COLLATOR_COLUMNS]))

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
            with whole_adapter(cgc, write_back=True):  # FSDP2: gathered on every rank, sharded back
                cgc._load_adapter_tensors(tensors, cgc.clusters)
        except ValueError as e:
            raise ResumeError(f"cannot resume from {directory}: {e}") from None


class CGCTrainer(CGCTrainerMixin, Trainer):
    """transformers.Trainer whose checkpoints hold the CGC-LoRA adapter only (see the module
    docstring); every Trainer argument works as documented by transformers."""
