"""Token -> task routing, computed once per model forward and shared by every adapted layer.

A mixed-task batch carries one task id per token. The kernels want tokens grouped by task
(so a tile of rows shares one task's experts) and, for the shared experts, grouped by cluster.
`build_routing` produces, on the ids' device and without a host sync:

    order       [M]          token indices, stably sorted by (cluster(task), task); task -1 last
    counts      [T]          tokens per task
    starts      [T]          where each task's segment starts in `order`
    tile_task   [max_tiles]  task of each tile of `tile_rows` sorted rows, -1 for an unused slot
    tile_start  [max_tiles]  first row (into `order`) of each tile
    tile_end    [max_tiles]  one past its last row

`tile_rows` (rows per tile) is the name of that size everywhere outside the kernels, where it is a
kernel's BLOCK_M. `max_tiles = cdiv(M, tile_rows) + T` depends only on M, T and the tile size, so
a launch over the tile table has a fixed grid (CUDA-graph safe; under torch.compile, fixed graph
input shapes whatever the task mix); unused slots exit at once.

Validation (ids in [-1, T)) is the one step that needs the host: `build_routing(validate=True)`
does it once; layers given a `TaskRouting` skip it, and a plain id tensor is checked once per
tensor (`checked_once`), not once per layer.

A model whose layers sit on several devices gets one copy of the routing per device
(`TaskRouting.on`), made by the first layer there and cached on the routing.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

DEFAULT_TILE_ROWS = 64


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
    if task_ids.device.type == "cpu":  # host values: read them without a dispatched op
        values = task_ids.detach().numpy()
        lo, hi = int(values.min()), int(values.max())
    else:
        lo, hi = (int(v) for v in torch.aminmax(task_ids))
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
    tile_rows: int
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
        # Onto a GPU the copies are stream-ordered (no host wait); onto the host they must finish.
        non_blocking = torch.device(device).type == "cuda"
        for k, v in fields.items():
            if isinstance(v, torch.Tensor) and k != "host_task_ids":
                fields[k] = v.to(device, non_blocking=non_blocking)
        return TaskRouting(**fields)

    def on(self, device: torch.device) -> TaskRouting:
        """This routing on `device`: itself, or a copy made once and cached (layers split over
        several devices, `device_map="auto"`, each read the copy on their own device)."""
        if device == self.device:
            return self
        key = ("device", device)
        if key not in self.cache:
            self.cache[key] = self.to(device)
        return self.cache[key]


def build_routing(
    task_ids: torch.Tensor,
    num_tasks: int,
    task_cluster: torch.Tensor | None = None,
    *,
    tile_rows: int = DEFAULT_TILE_ROWS,
    validate: bool = True,
    host_task_ids: torch.Tensor | None = None,
) -> TaskRouting:
    """Sort tokens by (cluster, task) and cut each task's segment into tiles of `tile_rows` rows.

    Args:
        task_ids: [M] integer, values in [-1, num_tasks); -1 = no adapter.
        num_tasks: T.
        task_cluster: [T] integer cluster of each task, or None (one cluster).
        tile_rows: rows per tile.
        validate: check the ids (one host sync); pass False only for ids already checked.
        host_task_ids: the same ids on the CPU, if the caller has them (kept for host-side planning;
            CPU ids are their own host copy).
    """
    if validate:
        check_task_ids(task_ids, num_tasks)
    if tile_rows <= 0:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
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
    max_tiles = -(-M // tile_rows) + T
    tiles_per_task = torch.div(counts[task_order] + tile_rows - 1, tile_rows, rounding_mode="floor")
    tile_cum = torch.cumsum(tiles_per_task, 0)  # inclusive
    slot = torch.arange(max_tiles, device=device)
    which = torch.searchsorted(tile_cum, slot, right=True)  # index into task_order
    used = which < T
    which_c = which.clamp(max=max(T - 1, 0))
    first_tile = tile_cum[which_c] - tiles_per_task[which_c]
    task = task_order[which_c]
    tile_start = seg_start_sorted[which_c] + (slot - first_tile) * tile_rows
    tile_end = torch.minimum(tile_start + tile_rows, seg_start_sorted[which_c] + counts[task_order][which_c])
    neg = torch.full_like(slot, -1)
    if host_task_ids is None and ids.device.type == "cpu":
        host_task_ids = ids
    elif host_task_ids is not None:
        host_task_ids = host_task_ids.to("cpu", torch.int64).reshape(-1)
    return TaskRouting(
        task_ids=ids,
        host_task_ids=host_task_ids,
        num_tasks=T,
        tile_rows=tile_rows,
        order=order,
        counts=counts,
        starts=starts,
        tile_task=torch.where(used, task, neg).to(torch.int32),
        tile_start=torch.where(used, tile_start, torch.zeros_like(slot)).to(torch.int32),
        tile_end=torch.where(used, tile_end, torch.zeros_like(slot)).to(torch.int32),
    )


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host wait: on CUDA one non-blocking copy from pinned
    memory (the pinned buffer is held by PyTorch's caching host allocator until the copy is done),
    elsewhere `.to` (a CPU tensor is returned as is)."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# Plain id tensors already checked, with what was derived from them (their routing): a model that
# passes one id tensor to every layer pays one check (a host sync on a GPU) and one routing build
# per tensor, not per layer. Keyed by id() with a weak reference to tell a reused id apart (a dict
# keyed by the tensor itself would compare tensors elementwise); the version counter notices an
# in-place change.
_CHECKED_IDS: dict[int, tuple] = {}


def tensor_cache(t: torch.Tensor) -> dict:
    """A dict kept for `t` while it lives and is not changed in place (its version counter), for
    what callers derive from its values once: checks passed, a routing, a host copy."""
    key = (t._version, t.shape, t.dtype, t.device)
    entry = _CHECKED_IDS.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == key:
        return entry[2]
    cache: dict = {}
    _CHECKED_IDS[id(t)] = (weakref.ref(t, functools.partial(_forget, id(t))), key, cache)  # dropped with t
    return cache


def _forget(key: int, ref: weakref.ref, entries: dict = _CHECKED_IDS) -> None:
    """A cached tensor is gone: drop its entry (and the routing it may hold), unless its id()
    already serves a newer tensor. `entries` is bound at definition: at interpreter exit the
    module's globals may already be None when the last tensors die."""
    entry = entries.get(key)
    if entry is not None and entry[0] is ref:
        del entries[key]


def checked_once(t: torch.Tensor, what: tuple, check) -> dict:
    """Run `check()` (which validates `t`'s values for `what`) once per tensor, version and `what`;
    returns `tensor_cache(t)`. Under torch.compile the check runs at trace time only."""
    if not isinstance(t, torch.Tensor) or torch.compiler.is_compiling():
        check()
        return {}
    cache = tensor_cache(t)
    passed = cache.setdefault("checked", set())
    if what not in passed:
        check()
        passed.add(what)
    return cache


def host_list(t: torch.Tensor) -> tuple:
    """t's values on the host as a tuple, read once per tensor (and version): a device tensor that
    rarely changes (a layer's task_cluster) costs one host sync in its lifetime, not one per call."""
    if t.device.type == "cpu" or torch.compiler.is_compiling():
        return tuple(t.tolist())
    cache = tensor_cache(t)
    if "host" not in cache:
        cache["host"] = tuple(t.tolist())
    return cache["host"]
