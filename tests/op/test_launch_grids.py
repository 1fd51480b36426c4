"""Launch grids and compiled variants of the kernels at a real layer's shapes, recorded without
running them.

d_in = d_out = 4096, S = 2, K = 1, r = 8, bf16 (a 7B model's q/v projection). The launchers run
for real with the GPU block configs; only the kernel launches are replaced by a recorder, so the
grids and variants checked are the ones a GPU would get.
"""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from cgc_kernels.op.routing import build_routing
from cgc_kernels.op.triton import backward, common, forward

WAVES = 2 * 132  # two waves of an H200's 132 SMs
D, T, S, K, R = 4096, 16, 2, 1, 8


# Every kernel the launchers start, by module.
LAUNCHED = ((forward, "_fwd_kernel"), (forward, "_shrink_kernel"), (backward, "_bwd_rows_kernel"),
            (backward, "_bwd_weight_kernel"), (backward, "_bwd_reduce_kernel"))


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records (name, grid) and returns."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid)))
        return launch


@pytest.fixture
def launches(monkeypatch):
    log: list = []
    monkeypatch.setattr(common, "GPU_CONFIGS_IN_INTERPRETER", True)
    monkeypatch.setattr(common, "_pinned", False)
    for mod, name in LAUNCHED:
        monkeypatch.setattr(mod, name, Recorder(name, log))
    return log


def task_ids(M: int, mix: str) -> torch.Tensor:
    if M == 16:
        return torch.arange(16)  # decode: one token per task
    seq = 128
    g = torch.Generator().manual_seed(0)
    w = torch.ones(T) if mix == "uniform" else torch.arange(1, T + 1, dtype=torch.float64) ** -1.5
    return torch.multinomial(w / w.sum(), M // seq, replacement=True, generator=g).repeat_interleave(seq)


def record(M: int, mix: str, with_backward: bool) -> None:
    """Run the launchers at the issue's shapes (empty tensors: nothing is computed)."""
    bf = dict(dtype=torch.bfloat16)
    x = torch.empty(M, D, **bf)
    ids = task_ids(M, mix)
    rt = build_routing(ids, T)
    gates = torch.full((T, S + K), 1.0 / (S + K))
    sa, sb = torch.empty(1, S * R, D, **bf), torch.empty(1, D, S * R, **bf)
    ta, tb = torch.empty(T, K * R, D, **bf), torch.empty(T, D, K * R, **bf)
    base = torch.empty(M, D, **bf)
    _, z = forward.cgc_lora_forward(
        x, gates, sa, sb, ta, tb, None, rt.order, rt.tile_task, rt.tile_start, rt.tile_end, rt.counts,
        rt.tile_rows, 2.0, False, 0.0, 0, base=base)
    if with_backward:
        backward.cgc_lora_backward(
            torch.empty(M, D, **bf), x, gates, sa, sb, ta, tb, None, rt.order, rt.tile_task, rt.tile_start,
            rt.tile_end, rt.counts, rt.starts, rt.tile_rows, z, 2.0, False, 0.0, 0, True, True, True, True)


@pytest.mark.parametrize("M, mix, with_backward", [
    (16, "uniform", False),  # decode: inference only
    (8192, "uniform", True),  # training, every task about 512 rows
    (8192, "zipf", True),  # training, one task holds most rows: chunked weight gradients
])
def test_every_launch_fills_two_waves(launches, M, mix, with_backward):
    record(M, mix, with_backward)
    names = [n for n, _ in launches]
    fwd = [n for n in names if n in ("_fwd_kernel", "_shrink_kernel")]
    print(f"\nM={M} {mix}: " + ", ".join(f"{n}{g}={math.prod(g)}" for n, g in launches))
    if M == 8192:
        assert fwd == ["_fwd_kernel"]  # one forward launch at training shapes
        # dB + dz partials, rows (dz, dgates, dx), dA, reduce
        assert names[1:] == ["_bwd_weight_kernel", "_bwd_rows_kernel", "_bwd_weight_kernel", "_bwd_reduce_kernel"]
    else:
        assert 1 <= len(fwd) <= 2  # at most shrink + expand at decode
    for name, grid in launches:
        assert math.prod(grid) >= WAVES, (name, grid)


class VariantRecorder:
    """Stands in for a @triton.jit kernel and records the variant a GPU launch would compile: the
    constexprs, num_warps / num_stages, and Triton's own specialization of every other argument
    (`native_specialize_impl`: an int equal to 1 or divisible by 16, a pointer's alignment), except
    where the kernel lists the argument in `do_not_specialize`."""

    def __init__(self, name: str, kernel, seen: dict):
        self.name, self.seen = name, seen
        params = list(inspect.signature(kernel.fn).parameters.values())
        self.names = [p.name for p in params]
        self.const = {p.name for p in params if "constexpr" in str(p.annotation)}
        dns = getattr(kernel, "do_not_specialize", None)  # a JITFunction; the interpreter keeps kwargs
        dns = dns if dns is not None else kernel.kwargs.get("do_not_specialize") or []
        self.dns = {self.names[d] if isinstance(d, int) else d for d in dns}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            opts = (kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3))
            bound = dict(zip(self.names, args, strict=False)) | kwargs
            key = tuple((n, bound[n]) if n in self.const else
                        (n, native_specialize_impl(BaseBackend, bound[n], False, n not in self.dns, True))
                        for n in self.names)
            self.seen.setdefault(self.name, set()).add((key, opts))
        return launch


def test_training_and_decode_sweep_compiles_at_most_16_variants(monkeypatch):
    # A 7B q/v projection (T 8, S 2, K 1, r 8): forward + backward at 40 training batch sizes
    # M = B x L (B in {1, 4, 8, 16}, L drawn from 96..1024, one task per sequence), then decode
    # forwards (in place, nothing saved) at M = 1..64. Each new variant is a 1-2 s compile on a GPU,
    # paid again per captured CUDA graph batch size. Before M and the per-call sizes left the
    # specialized arguments and the M-dependent constexprs became run-time values: 40 variants.
    seen: dict = {}
    monkeypatch.setattr(common, "GPU_CONFIGS_IN_INTERPRETER", True)
    monkeypatch.setattr(common, "_pinned", False)
    for mod, name in LAUNCHED:
        monkeypatch.setattr(mod, name, VariantRecorder(name, getattr(mod, name), seen))
    T_, bf = 8, dict(dtype=torch.bfloat16)
    gates = torch.full((T_, S + K), 1.0 / (S + K))
    sa, sb = torch.empty(1, S * R, D, **bf), torch.empty(1, D, S * R, **bf)
    ta, tb = torch.empty(T_, K * R, D, **bf), torch.empty(T_, D, K * R, **bf)
    g = torch.Generator().manual_seed(0)

    def step(ids: torch.Tensor, train: bool) -> None:
        M = ids.numel()
        x, base = torch.empty(M, D, **bf), torch.empty(M, D, **bf)
        rt = build_routing(ids, T_)
        route = (None, rt.order, rt.tile_task, rt.tile_start, rt.tile_end, rt.counts)
        if not train:
            forward.cgc_lora_forward(x, gates, sa, sb, ta, tb, *route, rt.tile_rows, 2.0, False, 0.0, None,
                                     base=base, out=base, save_z=False)
            return
        _, z = forward.cgc_lora_forward(x, gates, sa, sb, ta, tb, *route, rt.tile_rows, 2.0, False, 0.0, None,
                                        base=base)
        backward.cgc_lora_backward(torch.empty(M, D, **bf), x, gates, sa, sb, ta, tb, *route, rt.starts,
                                   rt.tile_rows, z, 2.0, False, 0.0, None, True, True, True, True)

    rng = random.Random(0)
    for b, L in [(b, rng.randint(96, 1024)) for _ in range(10) for b in (1, 4, 8, 16)]:
        step(torch.randint(0, T_, (b,), generator=g).repeat_interleave(L), train=True)
    training = {k: len(v) for k, v in seen.items()}
    for M in range(1, 65):
        step(torch.randint(0, T_, (M,), generator=g), train=False)
    total = {k: len(v) for k, v in seen.items()}
    print(f"\nvariants: training {training} = {sum(training.values())}; "
          f"with decode {total} = {sum(total.values())}")
    assert sum(total.values()) <= 16
    # One forward plan per kind and one launch each in the backward: every kernel at most twice
    # (the weight kernel runs as dA and dB; the forward as fused, split expand, and decode).
    assert all(n <= 2 for k, n in total.items() if k != "_fwd_kernel"), total
