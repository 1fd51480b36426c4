"""`cgc-lora cluster`: task affinity on a model, then N clusters written as a JSON file."""

from __future__ import annotations

import json
import os
import time

from ..data.reader import UserError, read_jsonl, tasks_of
from ..multitask.clustering import LINKAGES, cluster_summary, cluster_tasks, task_affinity, write_clusters
from ..multitask.models import load_base
from ..multitask.recipe import format_seconds
from .common import log, model_spec


def add_cluster_command(sub) -> None:
    """`cgc-lora cluster`: measure task affinity on a model and write a clusters file."""
    p = sub.add_parser("cluster", help="group the tasks of a data file into N clusters (task affinity)")
    p.add_argument("--model", help="a local transformers model directory or a .gguf file "
                                   "(default: the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (for trying the command quickly)")
    p.add_argument("--data", required=True, help="training rows, JSONL {task, prompt, response}")
    p.add_argument("--clusters", type=int, required=True, help="N, the number of clusters")
    p.add_argument("--out", default="clusters.json", help="clusters file to write (default clusters.json)")
    p.add_argument("--affinity-out", help="also write the affinity matrix (JSON) here")
    p.add_argument("--linkage", choices=LINKAGES, default="average")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--batches", type=int, default=4, help="batches per task for its mean gradient")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system prompt for the chat template")
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(args) -> int:

    t0 = time.perf_counter()
    rows = read_jsonl(args.data)
    tasks = tasks_of(rows)
    if not 1 <= args.clusters <= len(tasks):
        raise UserError(f"--clusters must lie in [1, {len(tasks)}] for the {len(tasks)} tasks of {args.data}")
    if len(tasks) < 2:
        raise UserError(f"{args.data} holds one task ({tasks[0]}): nothing to cluster")
    model, tokenizer = load_base(model_spec(args))
    try:
        aff = task_affinity(model, tokenizer, rows, warmup_steps=args.warmup_steps, batches=args.batches,
                            batch_size=args.batch_size, rank=args.rank, lr=args.lr, seed=args.seed,
                            system=args.system)
        clusters = cluster_tasks(aff.matrix, aff.tasks, args.clusters, method=args.linkage)
    except ValueError as e:
        raise UserError(str(e)) from None
    log("task affinity (cosine of per-task gradients of a shared LoRA):")
    log(aff.table())
    log(cluster_summary(clusters))
    write_clusters(clusters, args.out)
    if args.affinity_out:
        with open(args.affinity_out, "w", encoding="utf-8") as f:
            json.dump(aff.to_dict(), f, indent=2)
    log(f"clusters written to {os.path.abspath(args.out)} in {format_seconds(time.perf_counter() - t0)}")
    return 0
