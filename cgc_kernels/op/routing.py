"""Token -> task routing, computed once per model forward and shared by every adapted layer.

A mixed-task batch carries one task id per token. The kernels want tokens grouped by task
(so a tile of rows shares one task's experts) and, for the shared experts, grouped by cluster.
`build_routing` produces, on the ids' device and without a host sync:

    order       [M]          token indices, stably sorted by (cluster(task), task); task -1 last
    counts      [T]          tokens per task
    starts      [T]          where each task's segment starts in `order`
    tile_task   [max_tiles]  task of each tile of BLOCK_M sorted rows, -1 for an unused slot
    tile_start  [max_tiles]  first row (into `order`) of each tile
    tile_end    [max_tiles]  one past its last row

`max_tiles = cdiv(M, block_m) + T` depends only on M, T and the block size, so a launch over the
tile table has a fixed grid (CUDA-graph safe); unused slots exit at once.

Validation (ids in [-1, T)) is the one step that needs the host: `build_routing(validate=True)`
does it once; layers given a `TaskRouting` skip it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_BLOCK_M = 64


def check_task_ids(task_ids: torch.Tensor, num_tasks: int, num_rows: int | None = None) -> None:
    """Raise ValueError unless `task_ids` is a 1-D integer tensor with values in [-1, num_tasks).

    One reduction; on a GPU a host sync. Callers on a hot path check once and pass a TaskRouting.
    """
    if not isinstance(task_ids, torch.Tensor):
        raise ValueError(f"task_ids must be a torch.Tensor, got {type(task_ids).__name__}")
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1:
        raise ValueError(f"task_ids must be 1-D [M], got shape {tuple(task_ids.shape)}")
    if num_rows is not None and task_ids.shape[0] != num_rows:
        raise ValueError(f"task_ids has {task_ids.shape[0]} entries but x has {num_rows} rows")
    if task_ids.numel() == 0:
        return
    lo, hi = torch.aminmax(task_ids)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= num_tasks:
        bad = lo if lo < -1 else hi
        raise ValueError(
            f"task_ids must lie in [-1, {num_tasks}) (-1 = no adapter); found task id {bad}"
        )


@dataclass(frozen=True)
class TaskRouting:
    """Checked task ids plus their sorted segments and tile table (see module docstring)."""

    task_ids: torch.Tensor  # [M] int64, checked to lie in [-1, num_tasks)
    num_tasks: int
    block_m: int
    order: torch.Tensor  # [M] int64
    counts: torch.Tensor  # [T] int64
    starts: torch.Tensor  # [T] int64
    tile_task: torch.Tensor  # [max_tiles] int32
    tile_start: torch.Tensor  # [max_tiles] int32
    tile_end: torch.Tensor  # [max_tiles] int32
    # The ids on the CPU when the builder had them there (CGCModel does): backends that plan on
    # the host (the PyTorch backend's row runs) read them without a device-to-host copy.
    host_task_ids: torch.Tensor | None = None
    # Per-routing results that every layer of one forward shares (e.g. a backend's row plan).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_rows(self) -> int:
        return self.task_ids.shape[0]

    @property
    def max_tiles(self) -> int:
        return self.tile_task.shape[0]

    @property
    def device(self) -> torch.device:
        return self.task_ids.device

    def to(self, device: torch.device | str) -> TaskRouting:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "cache"}
        for k, v in fields.items():
            if isinstance(v, torch.Tensor) and k != "host_task_ids":
                fields[k] = v.to(device)
        return TaskRouting(**fields)


def build_routing(
    task_ids: torch.Tensor,
    num_tasks: int,
    task_cluster: torch.Tensor | None = None,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    validate: bool = True,
    host_task_ids: torch.Tensor | None = None,
) -> TaskRouting:
    """Sort tokens by (cluster, task) and cut each task's segment into tiles of `block_m` rows.

    Args:
        task_ids: [M] integer, values in [-1, num_tasks); -1 = no adapter.
        num_tasks: T.
        task_cluster: [T] integer cluster of each task, or None (one cluster).
        block_m: rows per tile.
        validate: check the ids (one host sync); pass False only for ids already checked.
        host_task_ids: the same ids on the CPU, if the caller has them (kept for host-side planning;
            CPU ids are their own host copy).
    """
    if validate:
        check_task_ids(task_ids, num_tasks)
    if block_m <= 0:
        raise ValueError(f"block_m must be positive, got {block_m}")
    device = task_ids.device
    ids = task_ids.to(torch.int64)
    M, T = ids.shape[0], num_tasks

    # Sort key: cluster-major so each cluster's tokens are contiguous (shared-expert reductions),
    # task-minor so each task's are too; task -1 sorts after everything.
    if task_cluster is None:
        key = ids
    else:
        cluster = task_cluster.to(device=device, dtype=torch.int64)
        key = cluster[ids.clamp(min=0)] * T + ids
    key = torch.where(ids < 0, torch.full_like(key, torch.iinfo(torch.int64).max), key)
    order = torch.sort(key, stable=True).indices

    # Shift by one so task -1 lands in bin 0, which is dropped. scatter_add rather than bincount:
    # its output size is fixed (T + 1), which torch.compile can trace; integer adds are deterministic.
    counts = torch.zeros(T + 1, dtype=torch.int64, device=device).scatter_add_(
        0, ids + 1, torch.ones_like(ids))[1:]
    # Segment starts follow the sort order of tasks (by cluster, then id), not the task index.
    if task_cluster is None:
        task_order = torch.arange(T, device=device)
    else:
        task_order = torch.sort(cluster * T + torch.arange(T, device=device), stable=True).indices
    seg_start_sorted = torch.cumsum(counts[task_order], 0) - counts[task_order]
    starts = torch.empty_like(counts)
    starts[task_order] = seg_start_sorted

    # Tile table of fixed size: tiles are laid out task by task in sort order.
    max_tiles = -(-M // block_m) + T
    tiles_per_task = torch.div(counts[task_order] + block_m - 1, block_m, rounding_mode="floor")
    tile_cum = torch.cumsum(tiles_per_task, 0)  # inclusive
    slot = torch.arange(max_tiles, device=device)
    which = torch.searchsorted(tile_cum, slot, right=True)  # index into task_order
    used = which < T
    which_c = which.clamp(max=max(T - 1, 0))
    first_tile = tile_cum[which_c] - tiles_per_task[which_c]
    task = task_order[which_c]
    tile_start = seg_start_sorted[which_c] + (slot - first_tile) * block_m
    tile_end = torch.minimum(tile_start + block_m, seg_start_sorted[which_c] + counts[task_order][which_c])
    neg = torch.full_like(slot, -1)
    if host_task_ids is None and ids.device.type == "cpu":
        host_task_ids = ids
    elif host_task_ids is not None:
        host_task_ids = host_task_ids.to("cpu", torch.int64).reshape(-1)
    return TaskRouting(
        task_ids=ids,
        host_task_ids=host_task_ids,
        num_tasks=T,
        block_m=block_m,
        order=order,
        counts=counts,
        starts=starts,
        tile_task=torch.where(used, task, neg).to(torch.int32),
        tile_start=torch.where(used, tile_start, torch.zeros_like(slot)).to(torch.int32),
        tile_end=torch.where(used, tile_end, torch.zeros_like(slot)).to(torch.int32),
    )
