"""CGC-LoRA on a real model (SmolLM2-135M, the demo's GGUF) against one PEFT LoRA of equal total rank.

    python -m benchmarks.real_model [--rounds 5] [--out benchmarks/results/real_model_cpu.json]

Setup: float32, eager attention, adapters (S=2, K=1, r=8) on q/v/o/down_proj of
every layer, 4 tasks mixed in every batch. Candidates run interleaved, round by round, in one
process; the table gives medians and ratios of medians (a shared machine moves absolute times).

Training step (forward + backward of the LM loss, 16 sequences x 64 tokens, no optimizer):
  cgc_grouped    rows grouped by task at batch construction (the collator and training loop do this)
  cgc_restored   caller's order; CGCModel-style: sort the batch by task, run, restore logits' order
  cgc_as_given   caller's order (tasks interleaved sequence by sequence): each sequence a slice
  peft_lora      one PEFT LoRA of rank (S+K) r = 24 on the same modules
  base           the frozen base alone, backward through every layer (input embeddings need grad)
Decode (16 rows, 4 tasks, 16 new greedy tokens after 16 prompt tokens, tokens/s):
  cgc_grouped / cgc_as_given, peft_mixed (PEFT adapter_names=, the CGC export of each task), base
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from benchmarks.environment import environment
from benchmarks.measure import quantile
from cgc_kernels import CGCLoRAConfig, CGCModel
from cgc_kernels.multitask.models import load_base

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
S, K, R = 2, 1, 8
TASKS = 4
TRAIN_SHAPE = (16, 64)
DECODE = (16, 16, 16)  # rows, prompt tokens, new tokens


def build(base):
    cgc = CGCModel(copy.deepcopy(base), CGCLoRAConfig(
        tasks=[f"task{t}" for t in range(TASKS)], num_shared_experts=S, num_task_experts=K, rank=R,
        alpha=2.0 * R, target_modules=TARGETS))
    with torch.no_grad():  # nonzero B and uneven gates: a trained adapter's work, not a fresh one's
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(0.0, 0.02)
            layer.task_b.normal_(0.0, 0.02)
            for q in layer.gate.parameters():
                q.normal_()
    return cgc


def peft_model(base, cgc, tasks: list[int]):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pm = None
    for t in tasks:
        cfg, tensors = cgc.peft_adapter_state(t)
        config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=TARGETS)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base), config, adapter_name=f"task{t}")
        else:
            pm.add_adapter(f"task{t}", config)
        set_peft_model_state_dict(pm, tensors, adapter_name=f"task{t}")
    pm.set_adapter("task0")
    return pm


def train_candidates(base, cgc, ids, tids):
    grouped = torch.sort(tids, stable=True).indices
    inverse = torch.argsort(grouped)
    pm = peft_model(base, cgc, [0]).train()
    cgc.train()

    def cgc_step(rows, restore=None):
        def run():
            out = cgc(input_ids=ids[rows], labels=ids[rows], task_ids=tids[rows])
            if restore is not None:
                out.logits = out.logits[restore]  # what a model-level restore of the order costs
            out.loss.backward()
        return run

    def peft_step():
        pm(input_ids=ids, labels=ids).loss.backward()

    embed = base.get_input_embeddings()

    def base_step():
        emb = embed(ids).detach().requires_grad_()
        base(inputs_embeds=emb, labels=ids).loss.backward()

    everything = [p for m in (cgc, pm) for p in m.parameters() if p.requires_grad]
    return {
        "cgc_grouped": cgc_step(grouped),
        "cgc_restored": cgc_step(grouped, restore=inverse),
        "cgc_as_given": cgc_step(torch.arange(len(tids))),
        "peft_lora": peft_step,
        "base": base_step,
    }, everything


def decode_candidates(base, cgc, ids, tids):
    rows, _, new = DECODE
    grouped = torch.sort(tids, stable=True).indices
    pm = peft_model(base, cgc, list(range(TASKS))).eval()
    cgc.eval()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    names = [f"task{int(t)}" for t in tids]
    with torch.no_grad():
        return {
            "cgc_grouped": lambda: cgc.generate(input_ids=ids[grouped], task_ids=tids[grouped], **kw),
            "cgc_as_given": lambda: cgc.generate(input_ids=ids, task_ids=tids, **kw),
            "peft_mixed": lambda: pm.generate(input_ids=ids, adapter_names=names, **kw),
            "base": lambda: base.generate(input_ids=ids, **kw),
        }


def interleaved(candidates: dict, rounds: int, params=(), no_grad=False) -> dict[str, list[float]]:
    times = {k: [] for k in candidates}
    for i in range(rounds + 1):  # round 0 warms up
        for name, fn in candidates.items():
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            with torch.set_grad_enabled(not no_grad):
                fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times


def summary(times: dict[str, list[float]], ref: str, tokens: int | None = None) -> list[dict]:
    med_ref = statistics.median(times[ref])
    out = []
    for name, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        out.append(dict(candidate=name, median_s=med, p20_s=quantile(ts, 0.2), p80_s=quantile(ts, 0.8),
                        vs_ref=med / med_ref, tokens_per_s=tokens / med if tokens else None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/real_model_cpu.json")
    ap.add_argument("--model", default=None, help="model spec for load_base (default: the SmolLM2 GGUF)")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    base, _ = load_base(args.model, torch.float32, with_tokenizer=False)
    for p in base.parameters():
        p.requires_grad_(False)
    cgc = build(base)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    b, L = TRAIN_SHAPE
    ids = torch.randint(0, vocab, (b, L), generator=gen)
    tids = torch.arange(b) % TASKS  # tasks interleaved sequence by sequence, as a shuffled loader gives
    cands, params = train_candidates(base, cgc, ids, tids)
    train = summary(interleaved(cands, args.rounds, params), "peft_lora")
    result = {"environment": environment("cpu"), "rounds": args.rounds, "train": train}
    _print("training step (x peft_lora)", train)
    _write(args.out, result)  # now, so a run stopped during the decode keeps the training table
    if not args.skip_decode:
        rows, prompt, new = DECODE
        dids = torch.randint(0, vocab, (rows, prompt), generator=gen)
        dtids = torch.arange(rows) % TASKS
        decode = summary(interleaved(decode_candidates(base, cgc, dids, dtids), args.rounds, no_grad=True),
                         "peft_mixed", tokens=rows * new)
        result["decode"] = decode
        _print("decode (time x peft_mixed)", decode)
        _write(args.out, result)


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}", flush=True)
    for r in rows:
        tps = f"  {r['tokens_per_s']:.1f} tok/s" if r["tokens_per_s"] else ""
        print(f"  {r['candidate']:<14} {r['median_s']:8.3f} s  (p20 {r['p20_s']:.3f}, p80 {r['p80_s']:.3f})"
              f"  x{r['vs_ref']:.2f}{tps}", flush=True)


if __name__ == "__main__":
    main()
