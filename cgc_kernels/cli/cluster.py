"""`cgc-lora cluster`: task affinity on a model, then N clusters written as a JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import time

from ..data.formats import load_rows
from ..data.reader import UserError, tasks_of
from ..multitask.clustering import LINKAGES, cluster_summary, cluster_tasks, task_affinity, write_clusters
from ..multitask.models import TINY_MODEL, load_base
from ..multitask.recipe import format_seconds
from .arguments import (
    DATA_HELP,
    add_data_args,
    add_overwrite,
    data_options,
    non_negative_int,
    positive_float,
    positive_int,
)
from .common import log, model_spec
from .output import check_output, staged_output


def register(subparsers) -> None:
    """`cgc-lora cluster`: its parser, run by cmd_cluster (task affinity, then a clusters file)."""
    p = subparsers.add_parser("cluster", help="group the tasks of a data file into N clusters (task affinity)")
    p.add_argument("--model", help="a local transformers model directory or a .gguf file "
                                   "(default: the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (for trying the command quickly)")
    p.add_argument("--data", required=True, help=f"training rows: {DATA_HELP}")
    add_data_args(p)
    p.add_argument("--num-clusters", type=positive_int, required=True, help="N, the number of clusters")
    p.add_argument("--clusters-out", default="clusters.json",
                   help="clusters file to write, JSON {task: cluster} (what train --clusters reads)")
    p.add_argument("--affinity-out", help="also write the affinity matrix (JSON) here (default: not written)")
    add_overwrite(p)
    p.add_argument("--linkage", choices=LINKAGES, default="average", help="hierarchical clustering linkage")
    p.add_argument("--warmup-steps", type=non_negative_int, default=10, help="shared LoRA steps before measuring")
    p.add_argument("--batches", type=positive_int, default=4, help="batches per task for its mean gradient")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per batch")
    p.add_argument("--rank", type=positive_int, default=8, help="rank of the shared LoRA")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="learning rate of the warm-up")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the LoRA init and the batches")
    p.add_argument("--system", help="system prompt for the chat template (default: none)")
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(args) -> int:
    t0 = time.perf_counter()
    data = load_rows(args.data, **data_options(args))
    log(data.describe())
    rows, tasks = data.rows, tasks_of(data.rows)
    if len(tasks) < 2:
        raise UserError(f"{args.data} holds one task ({tasks[0]}): nothing to cluster")
    if args.num_clusters > len(tasks):
        raise UserError(f"--num-clusters must lie in [1, {len(tasks)}] for the {len(tasks)} tasks of {args.data}")
    spec = model_spec(args)
    inputs = [args.data, None if spec in (None, TINY_MODEL) else spec]
    outputs = [args.clusters_out] + ([args.affinity_out] if args.affinity_out else [])
    if len({os.path.realpath(o) for o in outputs}) < len(outputs):
        raise UserError("--clusters-out and --affinity-out name the same file")
    for path, option in zip(outputs, ("--clusters-out", "--affinity-out"), strict=False):
        check_output(path, overwrite=args.overwrite, inputs=inputs, kind="file", option=option)
    model, tokenizer = load_base(spec)
    log(f"measuring task affinity: {args.warmup_steps} warm-up steps of a shared LoRA, then {args.batches} "
        f"batches of {args.batch_size} rows per task ({len(tasks)} tasks)")
    try:
        aff = task_affinity(model, tokenizer, rows, warmup_steps=args.warmup_steps, batches=args.batches,
                            batch_size=args.batch_size, rank=args.rank, lr=args.lr, seed=args.seed,
                            system=args.system, progress=True)
        clusters = cluster_tasks(aff.matrix, aff.tasks, args.num_clusters, method=args.linkage)
    except ValueError as e:
        raise UserError(str(e)) from None
    log("task affinity (cosine of per-task gradients of a shared LoRA):")
    log(aff.table())
    log(cluster_summary(clusters))
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(staged_output(args.clusters_out, overwrite=args.overwrite, inputs=inputs,
                                                kind="file", option="--clusters-out"))
        write_clusters(clusters, tmp)
        if args.affinity_out:
            tmp = stack.enter_context(staged_output(args.affinity_out, overwrite=args.overwrite, inputs=inputs,
                                                    kind="file", option="--affinity-out"))
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(aff.to_dict(), f, indent=2)
    log(f"clusters written to {os.path.abspath(args.clusters_out)} in {format_seconds(time.perf_counter() - t0)}")
    return 0
