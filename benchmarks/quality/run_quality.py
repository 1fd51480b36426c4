"""The numbers in QUALITY.md: task clustering and the method comparison on the demo's data and model.

    python benchmarks/quality/run_quality.py [--steps 40] [--seeds 0,1] [--out benchmarks/quality/results]

Loads SmolLM2-135M-Instruct once (CPU, fp32), measures task affinity and clusters the four demo
tasks into two, then trains and evaluates every method seed by seed, rewriting results.json,
compare.md and compare.png after each seed so that an interrupted run still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data.reader import read_jsonl, tasks_of
from cgc_kernels.multitask.clustering import cluster_summary, cluster_tasks, task_affinity, write_clusters
from cgc_kernels.multitask.compare import Comparison, compare_methods, plan_methods
from cgc_kernels.multitask.models import load_base
from cgc_kernels.multitask.recipe import DEMO_SYSTEM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out rows per task (default: all 50)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--clusters", type=int, default=2)
    ap.add_argument("--affinity-warmup", type=int, default=10)
    ap.add_argument("--affinity-batches", type=int, default=4)
    ap.add_argument("--with-clustered", action="store_true", help="also CGC-LoRA with the measured clusters")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True)
    train = read_jsonl(os.path.join(demo_data.data_dir(), demo_data.FILES[0]))
    held = read_jsonl(os.path.join(demo_data.data_dir(), demo_data.FILES[1]))
    if args.eval_limit:
        held = [r for t in tasks_of(held) for r in [r for r in held if r["task"] == t][: args.eval_limit]]
    tasks = tasks_of(train)
    base, tok = load_base(None)
    log(f"model loaded; torch threads {torch.get_num_threads()}")

    aff = task_affinity(base, tok, train, warmup_steps=args.affinity_warmup, batches=args.affinity_batches,
                        batch_size=8, system=DEMO_SYSTEM)
    clusters = cluster_tasks(aff.matrix, aff.tasks, args.clusters)
    write_clusters(clusters, os.path.join(args.out, "clusters.json"))
    with open(os.path.join(args.out, "affinity.json"), "w") as f:
        json.dump(aff.to_dict(), f, indent=2)
    log("affinity:\n" + aff.table() + "\n" + cluster_summary(clusters))

    methods = plan_methods(len(tasks), task_rank=8, clusters=clusters if args.with_clustered else None)
    merged: Comparison | None = None
    for seed in [int(s) for s in args.seeds.split(",")]:
        r = compare_methods(base, tok, train, held, methods=methods, steps=args.steps, seeds=(seed,),
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, system=DEMO_SYSTEM,
                            log=log, model_name="SmolLM2-135M-Instruct")
        if merged is None:
            merged = r
        else:
            merged.seeds.append(seed)
            for k in r.scores:
                merged.scores[k] += r.scores[k]
                merged.losses[k] += r.losses[k]
                merged.seconds[k] += r.seconds[k]
            merged.settings["wall_seconds"] += r.settings["wall_seconds"]
        merged.settings["total_seconds"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(merged.to_dict(), f, indent=2)
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(merged.markdown() + "\n")
        merged.plot(os.path.join(args.out, "compare.png"))
        log("seed done:\n" + merged.markdown())
    log("done")


if __name__ == "__main__":
    main()
