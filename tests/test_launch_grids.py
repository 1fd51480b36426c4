"""Launch grids of the GPU-filling kernels at a real layer's shapes, recorded without running them.

d_in = d_out = 4096, T = 16 tasks, S = 2, K = 1, r = 8, bf16 (a 7B model's q/v projection), at
decode (M = 16, one token per task) and training (M = 8192 in 128-token sequences, uniform and
Zipf task mixes). The launchers run for real with the GPU block configs; only the kernel launches
are replaced by a recorder, so the grids checked are the ones a GPU would get.
"""

from __future__ import annotations

import math

import pytest
import torch

from cgc_kernels.op.routing import build_routing
from cgc_kernels.op.triton import backward_grid, common, forward_grid

WAVES = 2 * 132  # two waves of an H200's 132 SMs
D, T, S, K, R = 4096, 16, 2, 1, 8


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
    for mod, name in ((forward_grid, "_fwd_kernel"), (forward_grid, "_shrink_kernel"),
                      (backward_grid, "_bwd_rows_kernel"), (backward_grid, "_bwd_weight_kernel"),
                      (backward_grid, "_bwd_reduce_kernel")):
        monkeypatch.setattr(mod, name, Recorder(name, log))
    return log


def task_ids(M: int, mix: str) -> torch.Tensor:
    if M == 16:
        return torch.arange(16)  # decode: one token per task
    seq = 128
    g = torch.Generator().manual_seed(0)
    w = torch.ones(T) if mix == "uniform" else torch.arange(1, T + 1, dtype=torch.float64) ** -1.5
    return torch.multinomial(w / w.sum(), M // seq, replacement=True, generator=g).repeat_interleave(seq)


def record(M: int, mix: str, backward: bool) -> None:
    """Run the launchers at the issue's shapes (empty tensors: nothing is computed)."""
    bf = dict(dtype=torch.bfloat16)
    x = torch.empty(M, D, **bf)
    ids = task_ids(M, mix)
    rt = build_routing(ids, T)
    gates = torch.full((T, S + K), 1.0 / (S + K))
    sa, sb = torch.empty(1, S * R, D, **bf), torch.empty(1, D, S * R, **bf)
    ta, tb = torch.empty(T, K * R, D, **bf), torch.empty(T, D, K * R, **bf)
    base = torch.empty(M, D, **bf)
    _, z = forward_grid.cgc_lora_forward_grid(
        x, gates, sa, sb, ta, tb, None, rt.order, rt.tile_task, rt.tile_start, rt.tile_end, rt.counts,
        rt.tile_rows, 2.0, False, 0.0, 0, base=base)
    if backward:
        backward_grid.cgc_lora_backward_grid(
            torch.empty(M, D, **bf), x, gates, sa, sb, ta, tb, None, rt.order, rt.tile_task, rt.tile_start,
            rt.tile_end, rt.counts, rt.starts, rt.tile_rows, z, 2.0, False, 0.0, 0, True, True, True, True)


@pytest.mark.parametrize("M, mix, backward", [
    (16, "uniform", False),  # decode: inference only
    (8192, "uniform", True),  # training, every task about 512 rows
    (8192, "zipf", True),  # training, one task holds most rows: chunked weight gradients
])
def test_every_launch_fills_two_waves(launches, M, mix, backward):
    record(M, mix, backward)
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
