"""Decode tokens/s of a CGCModel, eager against compiled: transformers' static cache, and
`torch.compile` of the decode step (on a GPU `mode="reduce-overhead"`: the step as a CUDA graph).

    from benchmarks.decode_speed import time_decode
    row = time_decode(cgc, input_ids, attention_mask, task_ids, new_tokens=64)

    python -m benchmarks.decode_speed --json decode.json [--size gpu] [--backend eager --repeats 1]

The command (gpu_check's step f) times the model and mixed-task batch of the benchmarks'
generate-T4 rows (benchmarks/model_harness.py: on a GPU a 4-layer Llama-shaped model, d=2048,
bf16, 16 prompts of 64 tokens over 4 tasks, 32 new tokens) and writes the row with the model's shape.

Both runs decode the same prompts greedily with one task mix; `same_tokens` says whether they
agree (they should: the compiled step is the eager one). The first compiled call (the compile) is
a warm-up and not timed. Times are wall clock around `generate`, synchronized on CUDA.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import CompileConfig


def _generate(cgc, input_ids, attention_mask, task_ids, new_tokens: int, compile_config):
    kw = dict(compile_config=compile_config) if compile_config is not None else dict(disable_compile=True)
    return cgc.generate(input_ids=input_ids, attention_mask=attention_mask, task_ids=task_ids,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        cache_implementation="static", **kw)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """(best seconds of `repeats` calls, the last call's output)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def time_decode(cgc, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids, new_tokens: int = 64,
                *, mode: str | None = None, backend: str = "inductor", repeats: int = 3) -> dict:
    """{"batch", "new_tokens", "eager_tok_s", "compiled_tok_s", "speedup", "same_tokens"} for one
    prompt batch. mode None picks "reduce-overhead" on CUDA and the default elsewhere (CUDA graphs
    need a GPU); the compile is allowed on every device, so a CPU dry run works."""
    device = input_ids.device
    if mode is None and device.type == "cuda":
        mode = "reduce-overhead"
    config = CompileConfig(fullgraph=True, backend=backend, mode=mode, dynamic=False)
    config._compile_all_devices = True
    run = lambda cc: _generate(cgc, input_ids, attention_mask, task_ids, new_tokens, cc)  # noqa: E731
    with torch.no_grad():
        run(None)  # warm-up: the kernels' first launches
        eager_s, eager = _timed(lambda: run(None), device, repeats)
        run(config)  # the compile
        compiled_s, compiled = _timed(lambda: run(config), device, repeats)
    tokens = input_ids.shape[0] * new_tokens
    return {"batch": input_ids.shape[0], "new_tokens": new_tokens, "eager_tok_s": tokens / eager_s,
            "compiled_tok_s": tokens / compiled_s, "speedup": eager_s / compiled_s,
            "same_tokens": bool(torch.equal(eager, compiled)), "backend": backend, "mode": mode}


DECODE_TASKS = 4  # the generate-T4 rows' mix: sequence i has task i % 4


def main(argv=None) -> int:
    from benchmarks.cases import SIZES, default_size
    from benchmarks.model_harness import MODEL_EXPERTS, MODEL_SHAPES, ModelCase, build_model_problem

    ap = argparse.ArgumentParser(description="compiled against eager decode tokens/s of a CGCModel, mixed tasks")
    ap.add_argument("--json", required=True, help="file for the row")
    ap.add_argument("--size", choices=SIZES, default=None, help="model size (default: CGC_BENCH_SIZE, else by device)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick CPU rehearsal)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls of each kind (the best is kept)")
    a = ap.parse_args(argv)
    size = a.size or default_size()
    p = build_model_problem(ModelCase("generate", DECODE_TASKS), size)
    cgc = p.cgc.eval()
    row = time_decode(cgc, p.input_ids, torch.ones_like(p.input_ids), p.sample_ids, new_tokens=p.new_tokens,
                      backend=a.backend, repeats=a.repeats)
    S, K, r = MODEL_EXPERTS
    row.update(size=size, tasks=DECODE_TASKS, prompt=p.input_ids.shape[1], device=str(p.device),
               dtype=str(p.dtype).replace("torch.", ""), model=dict(MODEL_SHAPES[size][0], S=S, K=K, r=r))
    with open(a.json, "w") as f:
        json.dump(row, f, indent=1)
    print(f"decode {size}: eager {row['eager_tok_s']:.0f} tok/s, compiled ({a.backend}, mode={row['mode']}) "
          f"{row['compiled_tok_s']:.0f} tok/s, x{row['speedup']:.2f}, same tokens: {row['same_tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
