"""`cgc-lora train`: CGC-LoRA on a JSONL file with transformers.Trainer (adapter-only checkpoints)."""

from __future__ import annotations

import os

from ..data.reader import UserError
from .common import base_dtype, cgc_config_from_args, log, model_spec, save_trained, wrap


def cmd_train(args) -> int:
    from ..adapter.gate_report import gate_movement, gate_snapshot
    from ..adapter.targets import summarize_targets
    from ..adapter.trainer import ResumeError
    from ..data.reader import check_tasks, read_jsonl, tasks_of
    from ..multitask.models import adapters_to_float32, load_base
    from ..multitask.recipe import accuracy_table, evaluate, interleave

    spec = model_spec(args)
    rows = read_jsonl(args.data)
    tasks = tasks_of(rows)
    eval_rows = None
    if args.eval_data:
        eval_rows = interleave(read_jsonl(args.eval_data))
        check_tasks(eval_rows, tasks, args.eval_data)
    config = cgc_config_from_args(args, tasks)
    dtype = base_dtype(args, spec)
    base, tokenizer = load_base(spec, dtype)
    cgc = wrap(base, config)
    adapters_to_float32(cgc)
    tasks = list(cgc.tasks)  # global task order (grouped by cluster): what task ids index
    log(f"adapting {summarize_targets(cgc.targeted_module_names)}")
    log(f"training CGC-LoRA on {len(rows)} rows of {len(tasks)} tasks: {', '.join(tasks)}")
    before = None
    if eval_rows:
        before, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out before")
    trainer = _make_trainer(cgc, tokenizer, rows, tasks, args)
    start = gate_snapshot(cgc)
    try:
        trainer.train(resume_from_checkpoint=args.resume or None)
    except ResumeError as e:
        raise UserError(str(e)) from None
    cgc.eval()
    if start is not None:
        log("gate movement (what training changed in the task gates)")
        log(gate_movement(start, cgc).format())
    out = os.path.abspath(args.out)
    save_trained(cgc, tokenizer, out, spec, base, args.system, dtype)
    if eval_rows:
        after, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out after")
        counts = {t: sum(r["task"] == t for r in eval_rows) for t in after}
        log(accuracy_table(before, after, counts))
    log(f"adapter saved to {out}")
    return 0


def _make_trainer(cgc, tokenizer, rows, tasks, args):
    import torch
    from transformers import TrainingArguments

    from ..adapter.collator import CGCDataCollator
    from ..adapter.trainer import CGCTrainer
    from ..multitask.recipe import encode_for_trainer

    dataset = encode_for_trainer(tokenizer, rows, tasks, args.system, args.max_length)
    targs = TrainingArguments(
        output_dir=os.path.join(args.out, "checkpoints"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.0,
        max_steps=args.steps if args.steps else -1, num_train_epochs=args.epochs,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=2, save_only_model=False, bf16=args.bf16, seed=args.seed,
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return CGCTrainer(
        model=cgc, args=targs, train_dataset=dataset,
        data_collator=CGCDataCollator(tokenizer.pad_token_id, tasks=tasks, response_only=True),
        gate_lr_ratio=args.gate_lr_ratio,
    )
