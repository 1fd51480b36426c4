"""`cgc-lora compare`: shared LoRA, per-task LoRA, MOELoRA and CGC-LoRA at an equal budget."""

from __future__ import annotations

import json
import os
import time

from ..adapter.config import CGCLoRAConfig
from ..adapter.param_groups import DEFAULT_GATE_LR_RATIO
from ..data import demo_tasks, suite_tasks
from ..data.formats import load_rows
from ..data.reader import UserError, tasks_of
from ..multitask.clustering import read_clusters
from ..multitask.compare import DEFAULT_TARGETS, compare_methods, plan_methods
from ..multitask.models import TINY_MODEL, load_base
from ..multitask.recipe import DEMO_SYSTEM, format_seconds
from .arguments import (
    add_data_args,
    add_gate_form_args,
    add_overwrite,
    data_options,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_list,
    split_targets,
    target_modules,
)
from .common import first_per_task, log, model_spec
from .output import check_output, staged_output


def register(subparsers) -> None:
    """`cgc-lora compare`: its parser, run by cmd_compare (shared vs per-task LoRA vs MOELoRA vs
    CGC-LoRA at equal parameters)."""
    p = subparsers.add_parser("compare", help="shared LoRA, per-task LoRA, MOELoRA and CGC-LoRA at equal trainable "
                                       "parameters: held-out scores, seesaw, table and plot")
    p.add_argument("--model", help="a local transformers model directory or a .gguf file "
                                   "(default: the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (for trying the command quickly)")
    p.add_argument("--data", help="training rows, any format that train reads (default: the demo's)")
    p.add_argument("--eval-data", help="held-out rows (default: the demo's held-out set; needed with --data)")
    add_data_args(p)
    p.add_argument("--suite", action="store_true",
                   help="the shipped multi-task suite (transfer, conflict, an unrelated task; QUALITY.md) "
                        "instead of the demo's tasks")
    p.add_argument("--out", default="cgc-lora-compare", help="output directory: compare.md, .png, .json")
    add_overwrite(p)
    p.add_argument("--clusters", help="a clusters file {task: cluster}: also compare CGC-LoRA with one shared "
                                      "group per cluster (default: not compared)")
    p.add_argument("--rank", type=positive_int, default=8, help="rank of each per-task LoRA; the budget is "
                                                                "T x rank rank units per layer")
    p.add_argument("--cgc-shared", type=non_negative_int, default=4, help="S of CGC-LoRA")
    p.add_argument("--cgc-task", type=non_negative_int, default=1, help="K of CGC-LoRA")
    p.add_argument("--moe-experts", type=positive_int, default=8, help="E of MOELoRA")
    p.add_argument("--target-modules", type=target_modules, default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module names, or re:REGEX")
    p.add_argument("--steps", type=positive_int, default=40, help="optimizer steps per method and seed")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per step, tasks mixed")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=6, help="linear warm-up steps")
    p.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated seeds")
    p.add_argument("--eval-limit", type=non_negative_int, default=0, help="held-out rows per task (default 0: all)")
    p.add_argument("--system", help="system prompt (default: the demo's, with the demo data; else none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=12, help="greedy tokens per answer, at most")
    g = p.add_argument_group("gates (the same for every method)")
    g.add_argument("--gate-lr-ratio", type=non_negative_float, default=DEFAULT_GATE_LR_RATIO,
                   help="the gates' learning rate over the experts'")
    add_gate_form_args(g)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:

    t0 = time.perf_counter()
    spec = model_spec(args)
    if args.suite:
        if args.data or args.eval_data:
            raise UserError("--suite and --data / --eval-data exclude each other")
        args.data, args.eval_data = suite_tasks.paths()
        if args.system is None:
            args.system = suite_tasks.SYSTEM
    use_demo = args.data is None
    train_path = args.data or os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[0])
    eval_path = args.eval_data or (os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[1]) if use_demo else None)
    if eval_path is None:
        raise UserError("--eval-data is needed with --data")
    inputs = [train_path, eval_path, args.clusters, None if spec in (None, TINY_MODEL) else spec]
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)
    train_data = load_rows(train_path, **data_options(args))
    log(train_data.describe())
    train_rows, tasks = train_data.rows, tasks_of(train_data.rows)
    eval_rows = load_rows(eval_path, **data_options(args), known_tasks=tasks).rows
    eval_rows = first_per_task(eval_rows, args.eval_limit)
    seeds = args.seeds
    targets = split_targets(args.target_modules)
    try:
        clusters = read_clusters(args.clusters, tasks) if args.clusters else None
        methods = plan_methods(len(tasks), task_rank=args.rank, cgc_shared=args.cgc_shared, cgc_task=args.cgc_task,
                               moe_experts=args.moe_experts, clusters=clusters)
        # The gate settings checked now, before the model loads.
        CGCLoRAConfig(tasks=tasks, gate_scope=args.gate_scope, gate_embedding_dim=args.gate_embedding_dim,
                      gate_init=args.gate_init)
    except ValueError as e:
        raise UserError(str(e)) from None
    system = args.system if args.system is not None else (DEMO_SYSTEM if use_demo else None)
    names = {None: "SmolLM2-135M-Instruct", TINY_MODEL: "tiny random Llama"}
    name = names.get(spec, os.path.basename(str(spec)))
    log(f"comparing {len(methods)} methods on {len(tasks)} tasks ({', '.join(tasks)}) with {name}: "
         f"{args.steps} steps x batch {args.batch_size}, seeds {seeds}")
    base, tokenizer = load_base(spec)
    try:
        result = compare_methods(base, tokenizer, train_rows, eval_rows, methods=methods, task_rank=args.rank,
                                 target_modules=targets, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 warmup_steps=args.warmup_steps, seeds=seeds, system=system,
                                 max_new_tokens=args.max_new_tokens, log=log, model_name=name,
                                 gate_lr_ratio=args.gate_lr_ratio, gate_scope=args.gate_scope,
                                 gate_embedding_dim=args.gate_embedding_dim, gate_init=args.gate_init)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = os.path.abspath(args.out)
    table = result.markdown() + "\n\nGate weight on the shared experts at the end, min..max over layers " \
        "(largest change of any gate weight):\n\n" + result.gate_markdown()
    with staged_output(args.out, overwrite=args.overwrite, inputs=inputs) as staging:
        with open(os.path.join(staging, "compare.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        with open(os.path.join(staging, "compare.json"), "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
        result.plot(os.path.join(staging, "compare.png"))
    log("")
    log(table)
    log(f"\nwritten to {out}/ (compare.md, compare.png, compare.json) in "
         f"{format_seconds(time.perf_counter() - t0)}")
    return 0
