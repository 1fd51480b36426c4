"""`cgc-lora train`: CGC-LoRA on a JSONL file with transformers.Trainer (adapter-only checkpoints).

Everything, checkpoints included, is written into a temporary sibling of --out that replaces it at
the end (output.py): a failed or interrupted run leaves the old --out whole and its checkpoints in
OUT.interrupted-*/ (--resume takes that folder). A GGUF base is dequantized once and written into
OUT/base/ as plain weights, which generate, export and export-base then load in seconds."""

from __future__ import annotations

import os

from ..data.reader import UserError
from ..multitask.models import TINY_MODEL
from .arguments import (
    DATA_HELP,
    add_cgc_args,
    add_data_args,
    add_gate_form_args,
    add_model_args,
    add_overwrite,
    max_length,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from .common import (
    PLAIN_BASE,
    base_dtype,
    cgc_config_from_args,
    dtype_name,
    log,
    model_spec,
    needs_plain_copy,
    save_trained,
    wrap,
    write_plain_base,
)
from .launcher import check_launch, is_main_process, launched_output


def register(subparsers) -> None:
    """`cgc-lora train`: its parser, run by cmd_train."""
    p = subparsers.add_parser("train", help="fine-tune CGC-LoRA on a data file of multi-task rows (chat, Alpaca, "
                                            "prompt/completion; JSONL, JSON, CSV, Parquet, a saved dataset)")
    add_model_args(p, default_help="the demo's SmolLM2-135M-Instruct")
    p.add_argument("--data", required=True, help=f"training rows: {DATA_HELP}")
    p.add_argument("--eval-data", help="held-out rows, the same formats: exact-match accuracy per task before and "
                                       "after (default: no evaluation)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="output directory (adapter, tokenizer, checkpoints/)")
    add_overwrite(p)
    p.add_argument("--clusters", help="JSON file {task: cluster}: one shared-expert group per cluster, 1+N "
                                      "(default: one cluster of every task)")
    add_cgc_args(p)
    g = p.add_argument_group("CGC-LoRA, more")
    g.add_argument("--dropout", type=probability, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--gate", choices=("task", "token"), default="task",
                   help="task: one softmax per task (mergeable); token: per token (cannot be exported)")
    add_gate_form_args(g)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data, when --steps is not given")
    t.add_argument("--batch-size", type=positive_int, default=16, help="rows per device step")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine decay)")
    t.add_argument("--warmup-steps", type=non_negative_int, default=6, help="linear warm-up steps")
    t.add_argument("--max-length", type=max_length, default=256,
                   help="tokens per row, prompt + response (a long prompt keeps its end)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast (a CUDA device with bfloat16)")
    t.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps")
    t.add_argument("--save-steps", type=positive_int, default=500, help="checkpoint every N steps (the last 2 kept)")
    t.add_argument("--resume", help="resume from the latest checkpoint of an earlier run: its --out folder, its "
                                    "checkpoints/ folder, an OUT.interrupted-* folder, or one checkpoint-N "
                                    "(default: a fresh start)")
    t.add_argument("--eval-steps", type=positive_int, default=None,
                   help="with --eval-data: the loss of each task's held-out rows every N steps (default: none)")
    t.add_argument("--report-to", default="none",
                   help="where transformers sends the logs: none, all, or comma-separated integrations "
                        "(tensorboard, wandb, mlflow, ...; each needs its package)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="seed of the adapter's init and the data order")
    t.add_argument("--system", help="system prompt for the chat template (default: none)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import torch

    from ..adapter.gate_report import gate_movement, gate_snapshot
    from ..adapter.sharding import whole_adapter
    from ..adapter.targets import summarize_targets
    from ..adapter.trainer import ResumeError
    from ..data.formats import load_rows
    from ..data.reader import tasks_of
    from ..multitask.models import adapters_to_float32, load_base, model_fingerprint, stored_dtype
    from ..multitask.recipe import accuracy_table, evaluate, interleave
    from .arguments import data_options

    spec = model_spec(args)
    if args.bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise UserError("--bf16 (autocast) needs a CUDA device with bfloat16; on this machine use --dtype bfloat16 "
                        "(the base in bfloat16, the adapters in float32)")
    if args.eval_steps and not args.eval_data:
        raise UserError("--eval-steps needs --eval-data (the held-out rows whose loss it logs)")
    resume = latest_checkpoint(args.resume) if args.resume else None
    data = load_rows(args.data, **data_options(args))
    log(data.describe())
    rows, tasks = data.rows, tasks_of(data.rows)
    eval_rows = None
    if args.eval_data:  # checked where the file has them, before interleaving reorders them
        eval_rows = interleave(load_rows(args.eval_data, **data_options(args), known_tasks=tasks).rows)
    config = cgc_config_from_args(args, tasks)
    if resume:
        _check_resume(resume, config, args)
    inputs = [args.data, args.eval_data, args.clusters, args.resume, spec if spec != TINY_MODEL else None]
    # Under a launcher every process runs this; the main one alone writes --out (launcher.py).
    with launched_output(args.out, overwrite=args.overwrite, inputs=inputs, keep_on_failure="checkpoints") as staging:
        out = os.path.abspath(args.out)
        dtype, dtype_reason = base_dtype(args, spec)
        log(f"base model in {dtype_name(dtype)} ({dtype_reason})")
        plain = PLAIN_BASE if needs_plain_copy(spec) else None
        if plain:  # dequantized once, written as plain weights that later commands load in seconds
            base, tokenizer = load_base(spec, stored_dtype(spec))
            _check_max_length(tokenizer, args, base.config)
            if is_main_process():  # the staging folder is shared by every rank of a launch
                write_plain_base(base, tokenizer, os.path.join(staging, plain))
            base = base.to(dtype)
        else:
            base, tokenizer = load_base(spec, dtype)
            _check_max_length(tokenizer, args, base.config)
        torch.manual_seed(args.seed)  # the experts' initial values: the same for every launch and rank
        cgc = wrap(base, config)
        adapters_to_float32(cgc)
        tasks = list(cgc.tasks)  # global task order (grouped by cluster): what task ids index
        log(f"adapting {summarize_targets(cgc.targeted_module_names)}")
        log(f"training CGC-LoRA on {len(rows)} rows of {len(tasks)} tasks: {', '.join(tasks)}")
        before = None
        if eval_rows:
            before, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out before")
        trainer = _make_trainer(cgc, tokenizer, rows, tasks, args, os.path.join(staging, "checkpoints"), eval_rows)
        check_launch(trainer.args.world_size)
        start = gate_snapshot(cgc)
        fingerprint = model_fingerprint(base)  # before FSDP shards the base
        if resume:
            log(f"resuming from {resume}")
        try:
            trainer.train(resume_from_checkpoint=resume)
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
                save_trained(cgc, tokenizer, staging, spec, base, args.system, dtype, dtype_reason, fingerprint,
                             plain_base=plain)
        if eval_rows:
            after, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out after")
            counts = {t: sum(r["task"] == t for r in eval_rows) for t in after}
            log(accuracy_table(before, after, counts))
    log(f"adapter saved to {out} ({trainer.state.global_step} steps)")
    return 0


def _check_max_length(tokenizer, args, model_config) -> None:
    """UserError if --max-length exceeds the model's context, or leaves no room for a response once
    the chat template is applied."""
    from ..multitask.recipe import prompt_text

    context = getattr(model_config, "max_position_embeddings", None)
    if context and args.max_length > context:
        raise UserError(f"--max-length {args.max_length} exceeds the model's context of {context} tokens "
                        f"(max_position_embeddings)")

    template = len(tokenizer(prompt_text(tokenizer, "", args.system), add_special_tokens=False).input_ids)
    if args.max_length < template + 2:
        raise UserError(f"--max-length {args.max_length} leaves no room for a response: the chat template alone "
                        f"takes {template} tokens; use at least {template + 2}")


def _make_trainer(cgc, tokenizer, rows, tasks, args, checkpoints: str, eval_rows=None):
    import torch
    from transformers import TrainingArguments

    from ..adapter.collator import CGCDataCollator
    from ..adapter.trainer import CGCTrainer
    from ..multitask.recipe import encode_for_trainer

    try:
        dataset = encode_for_trainer(tokenizer, rows, tasks, args.system, args.max_length)
    except ValueError as e:  # a conversation whose answers all lie beyond --max-length
        raise UserError(f"{args.data}: {e}") from None
    eval_sets, evaluation = None, {}
    if args.eval_steps:  # one set per task: the Trainer logs eval_<task>_loss for each
        eval_sets = {t: encode_for_trainer(tokenizer, [r for r in eval_rows if r["task"] == t], tasks, args.system,
                                           args.max_length) for t in tasks if any(r["task"] == t for r in eval_rows)}
        evaluation = dict(eval_strategy="steps", eval_steps=args.eval_steps,
                          per_device_eval_batch_size=args.batch_size)
    targs = _training_arguments(
        TrainingArguments, output_dir=checkpoints, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=0.0,
        max_steps=args.steps or -1, num_train_epochs=args.epochs,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=2, save_only_model=False, bf16=args.bf16, seed=args.seed,
        report_to=_report_to(args.report_to), remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=False, dataloader_pin_memory=torch.cuda.is_available(), **evaluation,
    )
    try:
        return CGCTrainer(
            model=cgc, args=targs, train_dataset=dataset, eval_dataset=eval_sets,
            data_collator=CGCDataCollator(tokenizer.pad_token_id, tasks=tasks, response_only=True),
            gate_lr_ratio=args.gate_lr_ratio,
        )
    except (RuntimeError, ImportError) as e:  # an integration of --report-to whose package is missing
        raise UserError(f"--report-to {args.report_to}: {str(e).splitlines()[0]}") from None


def _report_to(text: str) -> list[str] | str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    return "all" if names == ["all"] else names


# The settings an adapter's tensors depend on, as the options that set them.
_RESUME_SETTINGS = {"rank": "--rank", "num_shared_experts": "--shared-experts", "num_task_experts": "--task-experts",
                    "target_modules": "--target-modules", "gate": "--gate", "gate_scope": "--gate-scope",
                    "gate_embedding_dim": "--gate-embedding-dim", "clusters": "--clusters", "tasks": "--data's tasks"}


def latest_checkpoint(path: str) -> str:
    """The checkpoint to resume from: `path` itself if it is one (checkpoint-N), else the newest
    checkpoint-N in it, in its checkpoints/, or (an OUT.interrupted-* folder) its checkpoints/."""
    import re

    if not os.path.isdir(path):
        raise UserError(f"--resume {path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    found = []
    for folder in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                m = re.fullmatch(r"checkpoint-(\d+)", name)
                if m and os.path.isfile(os.path.join(folder, name, "trainer_state.json")):
                    found.append((int(m.group(1)), os.path.join(folder, name)))
    if not found:
        raise UserError(f"--resume {path}: no checkpoint-N folder in it or in its checkpoints/ (give a run's --out, "
                        f"its checkpoints/, an OUT.interrupted-* folder, or a checkpoint-N)")
    return max(found)[1]


def _check_resume(checkpoint: str, config, args) -> None:
    """UserError naming the option if the checkpoint was trained with other settings, or if
    --steps would not train past it."""
    import json

    from ..adapter.config import CONFIG_NAME

    try:
        with open(os.path.join(checkpoint, CONFIG_NAME), encoding="utf-8") as f:
            saved = json.load(f)
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            step = int(json.load(f).get("global_step", 0))
    except (OSError, ValueError, AttributeError):
        raise UserError(f"--resume {checkpoint}: not a CGC-LoRA checkpoint (no readable {CONFIG_NAME} / "
                        f"trainer_state.json)") from None
    ours = config.to_dict()
    for key, option in _RESUME_SETTINGS.items():
        mine = ours.get(key)
        if key == "tasks" and isinstance(saved.get(key), list) and isinstance(mine, list):
            saved[key], mine = sorted(saved[key]), sorted(mine)  # a model orders its tasks by cluster
        if key in saved and saved[key] != mine:
            raise UserError(f"--resume {checkpoint} was trained with {option} {_shown(saved[key])}, this run has "
                            f"{_shown(mine)}; pass the checkpoint's settings")
    if args.steps is not None and args.steps <= step:
        raise UserError(f"--resume {checkpoint} is at step {step}: --steps {args.steps} trains nothing more; "
                        f"give --steps above {step}")


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def _training_arguments(cls, **kwargs):
    """TrainingArguments(**kwargs); what it refuses (a setting this machine cannot run) is the
    user's mistake: one line."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(f"transformers refuses the training settings: {str(e).splitlines()[0]}") from None
