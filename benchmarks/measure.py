"""Measurement: check one provider on one case, then (unless disabled) time it with
pytest-benchmark, measure its memory, and append one row to `RESULTS` (conftest.py writes them
to a JSON file at the end).

1. The provider's result is always checked against the reference backend on the same inputs
   (outputs, and the input gradient when a backward runs; with dropout, given the mask the op
   drew: providers.check_dropout); under `--benchmark-disable` (CI) that is all that happens.
2. Otherwise it is timed (fixed warm-up and rounds, CUDA synchronized), its CUDA peak memory and
   the activation memory kept for the backward (any device) are measured.

Benchmarks measure; they never pass or fail on a time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict

import torch

from benchmarks.cases import BenchCase, build_problem, device_for, dtype_for
from benchmarks.providers import PROVIDERS, assert_matches, check_dropout, expected, make_runner

# ---- timing, memory, results ---------------------------------------------------------------

RESULTS: list[dict] = []
SETTINGS = {"rounds": None, "warmup": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd saves for the backward during `fn()`, not counting the
    storages of `exclude` (inputs and parameters, which live anyway)."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return total


def run(benchmark, *, provider: str, level: str, mode: str, case: BenchCase, size: str) -> None:
    """Check, then (unless disabled) time one provider on one case. mode: forward | backward | full."""
    reason = PROVIDERS[provider].skip_reason(level, case, size, mode)
    if reason:
        import pytest

        pytest.skip(reason)
    device, dtype = device_for(size), dtype_for(size)
    p = build_problem(case, device, dtype)
    runner = make_runner(provider, level, p)
    training = level != "infer"
    backward = mode in ("backward", "full")
    x = p.x.clone().requires_grad_(training)

    def clear():
        x.grad = None
        for q in runner.params:
            q.grad = None

    def forward():
        if training:
            return runner.fn(x)
        with torch.no_grad():
            return runner.fn(x)

    # 1. Correctness, always; under --benchmark-disable (CI) this is all, run through the fixture.
    def check():
        if runner.check == "dropout":  # a backward in every mode: the mask is read off the input gradient
            clear()
            y = forward()
            y.backward(p.dy)
            check_dropout(p, y.detach(), x.grad, f"{provider} {level}")
            return
        y_ref, dx_ref = expected(p, level, runner.check, backward) if runner.check != "none" else (None, None)
        clear()
        y = forward()
        if y_ref is not None:
            assert_matches(y, y_ref, f"{provider} {level} output")
        if backward:
            y.backward(p.dy)
            if dx_ref is not None:
                assert_matches(x.grad, dx_ref, f"{provider} {level} input gradient")

    if checked_only(benchmark, f"{level}-{mode} {case.name}", provider, check):
        return

    # 2. Timing.
    def target_forward():
        y = forward()
        sync(device)
        return y

    def target_full():
        clear()
        forward().backward(p.dy)
        sync(device)

    def setup_backward():
        clear()
        y = forward()
        sync(device)
        return (y,), {}

    def target_backward(y):
        y.backward(p.dy)
        sync(device)

    rounds = SETTINGS["rounds"] or (30 if device.type == "cuda" else 10)
    warmup = SETTINGS["warmup"]
    if mode == "forward":
        benchmark.pedantic(target_forward, rounds=rounds, warmup_rounds=warmup)
    elif mode == "backward":
        benchmark.pedantic(target_backward, setup=setup_backward, rounds=rounds, warmup_rounds=warmup)
    else:
        benchmark.pedantic(target_full, rounds=rounds, warmup_rounds=warmup)

    # 3. Memory: CUDA peak over one more call; activation bytes kept for the backward.
    peak = None
    if device.type == "cuda":
        clear()
        args = setup_backward()[0] if mode == "backward" else ()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (target_backward if mode == "backward" else target_full if mode == "full" else target_forward)(*args)
        peak = torch.cuda.max_memory_allocated() - base
        del args
    saved = None
    if training and mode != "backward":
        clear()
        saved = saved_activation_bytes(forward, [x, *runner.params, *p.layer.base_layer.parameters()])

    data = sorted(benchmark.stats.stats.data)
    row = dict(
        level=level, mode=mode, provider=provider, case=case.name, **asdict(case),
        median_s=statistics.median(data), p20_s=quantile(data, 0.2), p80_s=quantile(data, 0.8),
        rounds=len(data), peak_mem_bytes=peak, saved_activation_bytes=saved,
        lora_bytes=lora_branch_bytes(case, mode, dtype) if level == "op" else None,
        dtype=str(dtype).replace("torch.", ""), device=device.type,
    )
    row["tokens_per_s"] = case.M / row["median_s"]
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in asdict(case)})
    RESULTS.append(row)


def checked_only(benchmark, group: str, name: str, check: Callable[[], None]) -> bool:
    """Name the benchmark and run `check`: through the fixture when timing is disabled (CI), which
    is then all there is to do (True); otherwise directly, before the timing (False)."""
    benchmark.group, benchmark.name = group, name
    if benchmark.disabled:
        benchmark.pedantic(check)
        return True
    check()
    return False


def quantile(sorted_data: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted data."""
    if len(sorted_data) == 1:
        return sorted_data[0]
    pos = q * (len(sorted_data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def lora_branch_bytes(case: BenchCase, mode: str, dtype: torch.dtype) -> int:
    """The least memory traffic of the LoRA branch (activations only; experts are small):
    forward reads x and writes y; backward reads dy and x (for dA) and writes dx."""
    es = torch.empty((), dtype=dtype).element_size()
    fwd = case.M * (case.d_in + case.d_out) * es
    bwd = case.M * (2 * case.d_in + case.d_out) * es
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
