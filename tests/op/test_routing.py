"""build_routing against a plain-Python computation of the same sort, segments and tile table."""

from __future__ import annotations

import pytest
import torch

from cgc_kernels.op.routing import build_routing


def python_routing(ids: list[int], T: int, cluster: list[int] | None, tile_rows: int):
    """Order, counts, starts and tile table computed one token at a time."""
    cl = cluster or [0] * T
    task_seq = sorted(range(T), key=lambda t: (cl[t], t))  # segment order of the tasks
    order = []
    for t in task_seq:
        order += [m for m, i in enumerate(ids) if i == t]
    order += [m for m, i in enumerate(ids) if i == -1]  # no adapter: last
    counts = [sum(1 for i in ids if i == t) for t in range(T)]
    starts, pos = [0] * T, 0
    for t in task_seq:
        starts[t], pos = pos, pos + counts[t]
    tiles = []
    for t in task_seq:
        for s in range(starts[t], starts[t] + counts[t], tile_rows):
            tiles.append((t, s, min(s + tile_rows, starts[t] + counts[t])))
    max_tiles = -(-len(ids) // tile_rows) + T
    tiles += [(-1, 0, 0)] * (max_tiles - len(tiles))
    return order, counts, starts, tiles


@pytest.mark.parametrize(
    "ids, T, cluster, tile_rows",
    [
        ([2, 0, 1, 0, 2, 2, 1], 3, None, 2),  # unsorted ids, partial tiles
        ([1, -1, 0, -1, 1], 2, None, 4),  # task -1 rows go last and get no tile
        ([-1, -1, -1], 2, None, 4),  # no routed token: every slot unused
        ([2, 2, 0, 2], 3, None, 1),  # task 1 has no tokens; one row per tile
        ([0] * 9, 1, None, 4),  # T = 1, all tokens one task, several tiles
        ([3, 0, 1, 2, 3, 1, 0, -1, 2], 4, [1, 0, 1, 0], 2),  # clusters: cluster-major, task-minor
        ([], 3, None, 4),  # no tokens at all
        ([5, 4, 3, 2, 1, 0, 5, 4], 6, [0, 1, 2, 0, 1, 2], 3),  # more clusters than one task each
    ],
)
def test_routing_matches_python(ids, T, cluster, tile_rows):
    tids = torch.tensor(ids, dtype=torch.int64)
    tc = torch.tensor(cluster) if cluster is not None else None
    rt = build_routing(tids, T, tc, tile_rows=tile_rows)
    order, counts, starts, tiles = python_routing(ids, T, cluster, tile_rows)
    assert rt.order.tolist() == order
    assert rt.counts.tolist() == counts
    assert rt.starts.tolist() == starts
    got = list(zip(rt.tile_task.tolist(), rt.tile_start.tolist(), rt.tile_end.tolist(), strict=True))
    assert got == tiles
    assert rt.max_tiles == -(-len(ids) // tile_rows) + T  # depends on M, T, block only


def test_routing_grid_size_independent_of_ids():
    # Same M and T, very different id patterns: same table size (a CUDA graph can replay it).
    a = build_routing(torch.zeros(50, dtype=torch.int64), 4)
    b = build_routing(torch.arange(50) % 4, 4)
    assert a.max_tiles == b.max_tiles


@pytest.mark.parametrize("bad", [[0, 3], [-2, 0]])
def test_routing_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match="task id"):
        build_routing(torch.tensor(bad), 3)


def test_routing_block_m_must_be_positive():
    with pytest.raises(ValueError, match="tile_rows"):
        build_routing(torch.tensor([0]), 1, tile_rows=0)


def test_routing_on_another_device_is_copied_once_and_cached():
    """Layers split over devices (device_map="auto") read the routing's copy on their own device:
    made by the first layer there, then reused; the host ids stay on the host."""
    rt = build_routing(torch.tensor([1, 0, -1, 1, 0]), 2, torch.tensor([0, 1]), tile_rows=2)
    assert rt.on(torch.device("cpu")) is rt
    moved = rt.on(torch.device("meta"))
    assert moved is rt.on(torch.device("meta"))  # cached
    assert moved.device == torch.device("meta") and moved.tile_rows == 2 and moved.num_tasks == 2
    for name in ("task_ids", "order", "counts", "starts", "tile_task", "tile_start", "tile_end"):
        src, dst = getattr(rt, name), getattr(moved, name)
        assert dst.device.type == "meta" and dst.shape == src.shape and dst.dtype == src.dtype, name
    assert moved.host_task_ids is rt.host_task_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_op_and_layer_take_a_routing_from_another_device():
    from cgc_kernels import CGCLoRALinear, cgc_lora

    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, -1, 0, 1])
    layer = CGCLoRALinear(torch.nn.Linear(16, 8), num_tasks=2, num_shared_experts=1, num_task_experts=1,
                          rank=4, alpha=8).to("cuda:1")
    torch.nn.init.normal_(layer.task_b)
    x = torch.randn(6, 16, device="cuda:1")
    want = layer(x, ids.to("cuda:1"))
    routing = build_routing(ids.to("cuda:0"), 2)
    torch.testing.assert_close(layer(x, routing), want)
    args = (torch.rand(2, 2, device="cuda:1"), *(torch.randn(s, device="cuda:1") for s in
                                                 ((1, 4, 16), (1, 8, 4), (2, 4, 16), (2, 8, 4))), 0.5)
    torch.testing.assert_close(cgc_lora(x, routing, *args), cgc_lora(x, ids.to("cuda:1"), *args))
