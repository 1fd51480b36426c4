"""`cgc-lora train`: CGC-LoRA on a JSONL file with transformers.Trainer (adapter-only checkpoints).

Everything, checkpoints included, is written into a temporary sibling of --out that replaces it at
the end (output.py): a failed or interrupted run leaves no checkpoints and the old --out whole."""

from __future__ import annotations

import os

from ..data.reader import UserError
from ..multitask.models import TINY_MODEL
from .common import base_dtype, cgc_config_from_args, dtype_name, log, model_spec, save_trained, wrap
from .launcher import check_launch, is_main_process, launched_output


def cmd_train(args) -> int:
    import torch

    from ..adapter.gate_report import gate_movement, gate_snapshot
    from ..adapter.sharding import whole_adapter
    from ..adapter.targets import summarize_targets
    from ..adapter.trainer import ResumeError
    from ..data.formats import load_rows
    from ..data.reader import tasks_of
    from ..multitask.models import adapters_to_float32, load_base, model_fingerprint
    from ..multitask.recipe import accuracy_table, evaluate, interleave
    from .arguments import data_options

    spec = model_spec(args)
    if args.bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise UserError("--bf16 (autocast) needs a CUDA device with bfloat16; on this machine use --dtype bfloat16 "
                        "(the base in bfloat16, the adapters in float32)")
    if args.resume and not os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint directory")
    data = load_rows(args.data, **data_options(args))
    log(data.describe())
    rows, tasks = data.rows, tasks_of(data.rows)
    eval_rows = None
    if args.eval_data:  # checked where the file has them, before interleaving reorders them
        eval_rows = interleave(load_rows(args.eval_data, **data_options(args), known_tasks=tasks).rows)
    config = cgc_config_from_args(args, tasks)
    inputs = [args.data, args.eval_data, args.clusters, args.resume, spec if spec != TINY_MODEL else None]
    # Under a launcher every process runs this; the main one alone writes --out (launcher.py).
    with launched_output(args.out, overwrite=args.overwrite, inputs=inputs, keep_on_failure="checkpoints") as staging:
        out = os.path.abspath(args.out)
        dtype, dtype_reason = base_dtype(args, spec)
        log(f"base model in {dtype_name(dtype)} ({dtype_reason})")
        base, tokenizer = load_base(spec, dtype)
        _check_max_length(tokenizer, args)
        torch.manual_seed(args.seed)  # the experts' initial values: the same for every launch and rank
        cgc = wrap(base, config)
        adapters_to_float32(cgc)
        tasks = list(cgc.tasks)  # global task order (grouped by cluster): what task ids index
        log(f"adapting {summarize_targets(cgc.targeted_module_names)}")
        log(f"training CGC-LoRA on {len(rows)} rows of {len(tasks)} tasks: {', '.join(tasks)}")
        before = None
        if eval_rows:
            before, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out before")
        trainer = _make_trainer(cgc, tokenizer, rows, tasks, args, os.path.join(staging, "checkpoints"))
        check_launch(trainer.args.world_size)
        start = gate_snapshot(cgc)
        fingerprint = model_fingerprint(base)  # before FSDP shards the base
        try:
            trainer.train(resume_from_checkpoint=args.resume or None)
        except ResumeError as e:
            raise UserError(str(e)) from None
        if trainer.state.global_step == 0:
            raise UserError("no optimizer step ran (too few rows for --batch-size x --grad-accum?); nothing saved")
        cgc.eval()
        if start is not None:  # on every rank: under FSDP2 a gate's forward gathers its shards
            log("gate movement (what training changed in the task gates)")
            log(gate_movement(start, cgc).format())
        with whole_adapter(cgc):  # FSDP2: every rank gathers the sharded adapter; otherwise nothing
            if is_main_process():
                save_trained(cgc, tokenizer, staging, spec, base, args.system, dtype, dtype_reason, fingerprint)
        if eval_rows:
            after, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out after")
            counts = {t: sum(r["task"] == t for r in eval_rows) for t in after}
            log(accuracy_table(before, after, counts))
    log(f"adapter saved to {out} ({trainer.state.global_step} steps)")
    return 0


def _check_max_length(tokenizer, args) -> None:
    """UserError if --max-length leaves no room for a response once the chat template is applied."""
    from ..multitask.recipe import prompt_text

    template = len(tokenizer(prompt_text(tokenizer, "", args.system), add_special_tokens=False).input_ids)
    if args.max_length < template + 2:
        raise UserError(f"--max-length {args.max_length} leaves no room for a response: the chat template alone "
                        f"takes {template} tokens; use at least {template + 2}")


def _make_trainer(cgc, tokenizer, rows, tasks, args, checkpoints: str):
    import torch
    from transformers import TrainingArguments

    from ..adapter.collator import CGCDataCollator
    from ..adapter.trainer import CGCTrainer
    from ..multitask.recipe import encode_for_trainer

    try:
        dataset = encode_for_trainer(tokenizer, rows, tasks, args.system, args.max_length)
    except ValueError as e:  # a conversation whose answers all lie beyond --max-length
        raise UserError(f"{args.data}: {e}") from None
    targs = _training_arguments(
        TrainingArguments, output_dir=checkpoints, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.0,
        max_steps=args.steps or -1, num_train_epochs=args.epochs,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=2, save_only_model=False, bf16=args.bf16, seed=args.seed,
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return CGCTrainer(
        model=cgc, args=targs, train_dataset=dataset,
        data_collator=CGCDataCollator(tokenizer.pad_token_id, tasks=tasks, response_only=True),  # labels given
        gate_lr_ratio=args.gate_lr_ratio,
    )


def _training_arguments(cls, **kwargs):
    """TrainingArguments(**kwargs); what it refuses (a setting this machine cannot run) is the
    user's mistake: one line."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(f"transformers refuses the training settings: {str(e).splitlines()[0]}") from None
