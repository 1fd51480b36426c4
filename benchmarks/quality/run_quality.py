"""The numbers in QUALITY.md: task clustering and the method comparison, on the demo's data or on
the multi-task suite (cgc_kernels/data/suite_tasks.py), with SmolLM2-135M-Instruct.

    python benchmarks/quality/run_quality.py [--steps 40] [--seeds 0,1] [--out benchmarks/quality/results]
    python benchmarks/quality/run_quality.py --suite --with-clustered --gate-lr-ratio 50 --seeds 0,1,2

Loads the model once (CPU, fp32; `--tiny` for a tiny random Llama, to try the script), measures
task affinity and clusters the tasks, then trains and evaluates every method seed by seed,
rewriting results.json, compare.md and compare.png after each seed so that an interrupted run
still leaves its numbers. With --suite, compare.md also has each part's average (transfer,
conflict, unrelated), the low-resource task's gain from sharing, and the gate movement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data import suite_tasks
from cgc_kernels.data.reader import read_jsonl, tasks_of
from cgc_kernels.multitask.clustering import cluster_summary, cluster_tasks, task_affinity, write_clusters
from cgc_kernels.multitask.compare import REFERENCE, Comparison, Method, compare_methods, plan_methods
from cgc_kernels.multitask.models import TINY_MODEL, load_base
from cgc_kernels.multitask.recipe import DEMO_SYSTEM

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--suite", action="store_true", help="the multi-task suite instead of the demo's four tasks")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (a quick try)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out rows per task (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rank", type=int, default=8, help="rank of each per-task LoRA: the budget is T x rank")
    ap.add_argument("--clusters", type=int, default=2)
    ap.add_argument("--affinity-warmup", type=int, default=10)
    ap.add_argument("--affinity-batches", type=int, default=4)
    ap.add_argument("--with-clustered", action="store_true", help="also CGC-LoRA with the measured clusters")
    g = ap.add_argument_group("gates (the same for every method)")
    g.add_argument("--gate-lr-ratio", type=float, default=1.0, help="the gates' learning rate over the experts'")
    g.add_argument("--cgc-gate-lr-ratios", default="",
                   help="extra CGC-LoRA rows (one cluster) at these gate learning-rate ratios, e.g. 1,10")
    g.add_argument("--cgc-moelora-gate", action="store_true",
                   help="an extra CGC-LoRA row (one cluster) with MOELoRA's gate: one model-wide gate from a "
                        "task embedding of 64 through a random linear map, at gate lr x1")
    g.add_argument("--gate-scope", choices=("layer", "model"), default="layer")
    g.add_argument("--gate-embedding-dim", type=int, default=None)
    g.add_argument("--gate-init", choices=("uniform", "random"), default="uniform")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rewrite compare.md and compare.png from --out's results.json, with "
                         "MTL-LoRA's scores (mtl_lora.json from mtl_lora.py) when they are there")
    ap.add_argument("--out", default=None,
                    help="output directory (default benchmarks/quality/results, or suite_results with --suite)")
    return ap.parse_args(argv)


def load_rows(suite: bool, eval_limit: int) -> tuple[list[dict], list[dict]]:
    module = suite_tasks if suite else demo_data
    train, held = (read_jsonl(os.path.join(module.data_dir(), name)) for name in module.FILES)
    if eval_limit:
        held = [r for t in tasks_of(held) for r in [r for r in held if r["task"] == t][:eval_limit]]
    return train, held


def suite_summary(result: Comparison) -> str:
    """Per method: each part's average score, and the low-resource task's gain from sharing (its
    score minus per-task LoRA's, which learns it from its own 30 rows alone)."""
    parts = {p: [t for t in ts if t in result.tasks] for p, ts in suite_tasks.PARTS.items()}
    low = suite_tasks.LOW_RESOURCE
    head = ["method"] + [f"{p} ({', '.join(ts)})" for p, ts in parts.items()] + [f"{low} gain over per-task LoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result.methods:
        if m.key not in result.scores:
            continue
        cells = [f"{sum(result.mean_score(m.key, t) for t in ts) / len(ts):.3f}" for ts in parts.values()]
        gain = "(reference)" if m.key == REFERENCE or REFERENCE not in result.scores else \
            f"{result.mean_score(m.key, low) - result.mean_score(REFERENCE, low):+.3f}"
        lines.append("| " + " | ".join([m.label, *cells, gain]) + " |")
    return "\n".join(lines)


def report(result: Comparison, suite: bool) -> str:
    text = result.markdown()
    if suite:
        text += "\n\nBy part (mean over seeds):\n\n" + suite_summary(result)
    text += ("\n\nGate weight on the shared experts at the end, min..max over layers and seeds "
             "(largest change of any gate weight):\n\n" + result.gate_markdown())
    return text


def add_mtl_lora(result: Comparison, path: str) -> Comparison:
    """result with MTL-LoRA's run (mtl_lora.py's JSON) as one more method, over the seeds both have."""
    with open(path) as f:
        mtl = json.load(f)
    seeds = [s for s in result.seeds if s in mtl["seeds"]]
    keep = [result.seeds.index(s) for s in seeds]
    for key in result.scores:
        for table in (result.scores, result.losses, result.seconds, result.gates):
            if key in table:
                table[key] = [table[key][i] for i in keep]
    result.seeds = seeds
    pick = [mtl["seeds"].index(s) for s in seeds]
    result.methods.append(Method("mtl_lora", "MTL-LoRA (adapters)", 0, 0, mtl["rank"], description=(
        f"A r={mtl['rank']} + {mtl['n_up_projection']} B shared, diagonal Λ and w per task; q, v, down")))
    result.params["mtl_lora"] = mtl["params"]
    result.scores["mtl_lora"] = [mtl["scores"][i] for i in pick]
    result.losses["mtl_lora"] = [mtl["losses"][i] for i in pick]
    result.seconds["mtl_lora"] = [mtl["seconds"][i] for i in pick]
    return result


def write_report(result: Comparison, out: str, suite: bool) -> str:
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(report(result, suite) + "\n")
    result.plot(os.path.join(out, "compare.png"))
    return report(result, suite)


def main(argv=None) -> Comparison:
    args = parse_args(argv)
    out = args.out or os.path.join(HERE, "suite_results" if args.suite else "results")
    if args.report_only:
        with open(os.path.join(out, "results.json")) as f:
            result = Comparison.from_dict(json.load(f))
        mtl = os.path.join(out, "mtl_lora.json")
        if os.path.exists(mtl):
            result = add_mtl_lora(result, mtl)
        print(write_report(result, out, args.suite))
        return result
    os.makedirs(out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(m):
        print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True)

    train, held = load_rows(args.suite, args.eval_limit)
    system = suite_tasks.SYSTEM if args.suite else DEMO_SYSTEM
    tasks = tasks_of(train)
    model_name = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct"
    base, tok = load_base(TINY_MODEL if args.tiny else None)
    log(f"{model_name} loaded; torch threads {torch.get_num_threads()}")

    clusters = None
    if args.with_clustered:
        aff = task_affinity(base, tok, train, warmup_steps=args.affinity_warmup, batches=args.affinity_batches,
                            batch_size=8, system=system)
        clusters = cluster_tasks(aff.matrix, aff.tasks, args.clusters)
        write_clusters(clusters, os.path.join(out, "clusters.json"))
        with open(os.path.join(out, "affinity.json"), "w") as f:
            json.dump(aff.to_dict(), f, indent=2)
        log("affinity:\n" + aff.table() + "\n" + cluster_summary(clusters))

    methods = plan_methods(len(tasks), task_rank=args.rank, clusters=clusters)
    cgc = next(m for m in methods if m.key == "cgc_lora")
    for ratio in [float(x) for x in args.cgc_gate_lr_ratios.split(",") if x]:
        methods.insert(methods.index(cgc), dataclasses.replace(
            cgc, key=f"cgc_lora_gate_lr_{ratio:g}", label=f"CGC-LoRA (gate lr x{ratio:g})", gate_lr_ratio=ratio))
    if args.cgc_moelora_gate:
        methods.insert(methods.index(cgc), dataclasses.replace(
            cgc, key="cgc_lora_moelora_gate", label="CGC-LoRA (MOELoRA gate)", gate_lr_ratio=1.0,
            gate=dict(gate_scope="model", gate_embedding_dim=64, gate_init="random")))
    gate = dict(gate_lr_ratio=args.gate_lr_ratio, gate_scope=args.gate_scope,
                gate_embedding_dim=args.gate_embedding_dim, gate_init=args.gate_init)
    merged: Comparison | None = None
    for seed in [int(s) for s in args.seeds.split(",")]:
        r = compare_methods(base, tok, train, held, methods=methods, task_rank=args.rank, steps=args.steps,
                            seeds=(seed,), batch_size=args.batch_size, lr=args.lr, max_new_tokens=args.max_new_tokens,
                            system=system, log=log, model_name=model_name, **gate)
        if merged is None:
            merged = r
        else:
            merged.seeds.append(seed)
            for k in r.scores:
                merged.scores[k] += r.scores[k]
                merged.losses[k] += r.losses[k]
                merged.seconds[k] += r.seconds[k]
                merged.gates[k] += r.gates[k]
            merged.settings["wall_seconds"] += r.settings["wall_seconds"]
        merged.settings["total_seconds"] = round(time.perf_counter() - t0, 1)
        merged.settings["data"] = "suite" if args.suite else "demo"
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(merged.to_dict(), f, indent=2)
        log("seed done:\n" + write_report(merged, out, args.suite))
    log(f"done; results in {out}/")
    return merged


if __name__ == "__main__":
    main()
