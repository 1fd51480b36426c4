"""Do the gates move? Short CGC-LoRA runs on the multi-task suite, one per gate setting.

    python benchmarks/quality/gate_pilot.py --ratios 1,10,100 --gates logits,moelora --steps 30
    python benchmarks/quality/gate_pilot.py --tiny --steps 4          # a quick try on a tiny random Llama

Each run trains CGC-LoRA (S shared + K task experts, one cluster) on the same rows in the same order
and reports how far training moved the task gates: per task, the weight on the shared experts,
min..max over layers, at the start and at the end, and the largest change of any gate weight.
Gate settings (--gates):

    logits         free per-task logits per layer, starting at an even mixture (the package default)
    logits-model   one set of per-task logits shared by every layer
    moelora        MOELoRA's gate per layer: a task embedding (64) through a randomly initialised
                   linear map without bias (tasks start from different, uneven mixtures)
    moelora-model  the same, one gate for the whole model (mmoeloraS, the variant CGC-LoRA builds on)

Writes pilot.json (every number) and pilot.md (one table) into --out after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from cgc_kernels.adapter.config import CGCLoRAConfig
from cgc_kernels.adapter.gate_report import gate_movement, gate_snapshot
from cgc_kernels.adapter.model import CGCModel
from cgc_kernels.data import suite_tasks
from cgc_kernels.data.reader import read_jsonl, tasks_of
from cgc_kernels.multitask.compare import DEFAULT_TARGETS
from cgc_kernels.multitask.models import TINY_MODEL, load_base
from cgc_kernels.multitask.recipe import TrainSettings, evaluate, interleave, train_loop

HERE = os.path.dirname(os.path.abspath(__file__))
GATES = {"logits": dict(), "logits-model": dict(gate_scope="model"),
         "moelora": dict(gate_embedding_dim=64, gate_init="random"),
         "moelora-model": dict(gate_embedding_dim=64, gate_init="random", gate_scope="model")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M-Instruct")
    ap.add_argument("--ratios", default="1,10,100", help="gate learning-rate ratios, comma-separated")
    ap.add_argument("--gates", default="logits", help=f"gate settings, comma-separated, of {', '.join(GATES)}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--shared-experts", type=int, default=2)
    ap.add_argument("--task-experts", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out rows per task to score (0: no scoring)")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "gate_pilot"))
    args = ap.parse_args(argv)
    unknown = [g for g in args.gates.split(",") if g not in GATES]
    if unknown:
        ap.error(f"unknown --gates {unknown}; choose from {', '.join(GATES)}")
    return args


def table(runs: list[dict], tasks: list[str]) -> str:
    head = ["gate", "lr ratio", "final loss", *tasks, "largest change", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = []
        for t in tasks:
            m = r["movement"][t]
            score = f", held-out {r['scores'][t]:.2f}" if r.get("scores") else ""
            cells.append(f"{m['start_min']:.2f}..{m['start_max']:.2f} → {m['end_min']:.2f}..{m['end_max']:.2f}"
                         + score)
        lines.append("| " + " | ".join([r["gate"], f"{r['ratio']:g}", f"{r['final_loss']:.3f}", *cells,
                                        f"{r['largest_change']:.3f}", f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train_path, eval_path = suite_tasks.paths()
    train = read_jsonl(train_path)
    all_held = read_jsonl(eval_path)
    held = [r for t in suite_tasks.TASKS for r in [r for r in all_held if r["task"] == t][:args.eval_limit]]
    held = interleave(held) if held else []
    tasks = tasks_of(train)
    base, tok = load_base(TINY_MODEL if args.tiny else None)
    targets = ["q_proj", "v_proj"] if args.tiny else DEFAULT_TARGETS
    print(f"model loaded in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}", flush=True)
    runs: list[dict] = []
    for gate in args.gates.split(","):
        for ratio in [float(x) for x in args.ratios.split(",")]:
            t1 = time.perf_counter()
            config = CGCLoRAConfig(tasks=tasks, num_shared_experts=args.shared_experts,
                                   num_task_experts=args.task_experts, rank=args.rank, alpha=2.0 * args.rank,
                                   target_modules=targets, **GATES[gate])
            with torch.random.fork_rng():
                torch.manual_seed(args.seed)
                cgc = CGCModel(base, config)
            try:
                order = list(cgc.tasks)
                start = gate_snapshot(cgc)
                settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                         warmup_steps=args.warmup_steps, seed=args.seed, gate_lr_ratio=ratio)
                losses = train_loop(cgc, tok, train, order, settings, system=suite_tasks.SYSTEM, progress=False)
                moved = gate_movement(start, cgc)
                scores = None
                if held:
                    scores, _ = evaluate(cgc, tok, held, order, system=suite_tasks.SYSTEM,
                                         max_new_tokens=args.max_new_tokens, progress=False)
            finally:
                cgc.unload()
            run = dict(gate=gate, ratio=ratio, final_loss=sum(losses[-5:]) / len(losses[-5:]), losses=losses,
                       movement=moved.summary(), largest_change=moved.largest_change(), scores=scores,
                       seconds=time.perf_counter() - t1)
            runs.append(run)
            print(f"{gate} x{ratio:g}: loss {run['final_loss']:.3f}, gates moved <= {run['largest_change']:.3f} "
                  f"({run['seconds']:.0f} s)\n{moved.format()}", flush=True)
            settings_out = dict(vars(args), model="tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct",
                                targets=targets, total_seconds=round(time.perf_counter() - t0, 1))
            with open(os.path.join(args.out, "pilot.json"), "w") as f:
                json.dump({"settings": settings_out, "runs": runs}, f, indent=2)
            with open(os.path.join(args.out, "pilot.md"), "w") as f:
                f.write("Weight on the shared experts, min..max over layers: start → end of training.\n\n"
                        + table(runs, tasks) + "\n")
    print(table(runs, tasks))
    return runs


if __name__ == "__main__":
    main()
