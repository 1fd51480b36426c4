"""Decode tokens/s of a CGCModel, eager against compiled: transformers' static cache, and
`torch.compile` of the decode step (on a GPU `mode="reduce-overhead"`: the step as a CUDA graph).

    from benchmarks.decode_speed import time_decode
    row = time_decode(cgc, input_ids, attention_mask, task_ids, new_tokens=64)

Both runs decode the same prompts greedily with one task mix; `same_tokens` says whether they
agree (they should: the compiled step is the eager one). The first compiled call (the compile) is
a warm-up and not timed. Times are wall clock around `generate`, synchronized on CUDA.
"""

from __future__ import annotations

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
            "same_tokens": bool(torch.equal(eager, compiled))}
