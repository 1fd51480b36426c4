"""Task ids into a CGCModel: checked once per request on the host, copied to the model's device
once per request (one non-blocking copy from pinned memory: per model call, or per generate call
for all its decode steps), then one TaskRouting per call shape ([batch, seq] and device), built on
the device from those ids without a host sync, kept by the request, and set on every adapted layer
by a forward pre-hook for each base-model call's duration.

The hook runs outside torch.compile (`torch.compiler.disable`). transformers compiles the base
model's `__call__` for the decode steps, and dynamo runs a module's hooks outside the graph of its
forward anyway, each as a frame of its own: traced, the hook would be a second graph. Outside,
it builds the routing of a call shape once per request (the prompt's, then the decode steps' [batch,
1], shared by every step) and the compiled step reads it as inputs of fixed shape (the tile table is
sized for the worst task mix), the way vLLM keeps its LoRA mapping in static buffers: one graph,
compiled once for every step and task mix at one batch size."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..op.routing import TaskRouting, build_routing, check_task_ids, to_device


@dataclass
class TaskRequest:
    """Checked global task ids of one request: [B0] per sequence, or [B0, L0] per token (CPU)."""

    ids: torch.Tensor
    per_sequence: bool
    device_ids: torch.Tensor | None = None  # `ids` on the model's device, copied once (`on`)
    # {(batch, seq, device): TaskRouting}: one routing per call shape (every decode step shares one)
    routings: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> torch.Tensor:
        """The ids on `device`: one non-blocking copy from pinned memory, made by the request's
        first base-model call and reused by the rest (every decode step of a generate call)."""
        if self.device_ids is None or self.device_ids.device != device:
            self.device_ids = to_device(self.ids, device)
        return self.device_ids

    def expand(self, batch: int, seq: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """[batch * seq] ids for a base-model call on [batch, seq] tokens, from `ids` (the request's
        ids on some device; its host ids by default). Views and one copy: no host sync."""
        ids = self.ids if ids is None else ids
        if self.per_sequence:
            b0 = ids.shape[0]
            if batch != b0 and (b0 == 0 or batch % b0):
                raise ValueError(f"the model was called on {batch} sequences, not a multiple of the "
                                 f"{b0} task ids given")
            # generate() repeats each row (beams, num_return_sequences) in place, row by row; an
            # expand, not repeat_interleave, whose output size a GPU would report to the host.
            ids = ids[:, None].expand(b0, batch // b0).reshape(-1)
            return ids[:, None].expand(batch, seq).reshape(-1)
        if tuple(ids.shape) != (batch, seq):
            raise ValueError(f"per-token task_ids are {tuple(ids.shape)} but the model was called on "
                             f"[batch, seq] = [{batch}, {seq}]")
        return ids.reshape(-1)


class LayerRouting:
    """The routing every adapted layer of one CGCModel reads during a base-model call.

    CGCModel owns one and sets it per call (`set`); the checkpoint carriers (checkpointing.py) read
    `current` when a checkpointed layer runs and reinstate it for its recomputation (`using`).
    `layers` returns the adapted layers ({path: layer}) as they are at the time of the call."""

    def __init__(self, layers: Callable[[], Mapping[str, object]]):
        self.layers = layers
        self.current: TaskRouting | None = None

    def set(self, routing: TaskRouting | None) -> None:
        self.current = routing
        for layer in self.layers().values():
            layer.current_routing = routing

    @contextlib.contextmanager
    def using(self, routing: TaskRouting | None) -> Iterator[None]:
        """`routing` for the block, then whatever was set before (nothing to do if it is set already)."""
        before = self.current
        if before is routing:
            yield
            return
        self.set(routing)
        try:
            yield
        finally:
            self.set(before)


class TaskIdsMixin:
    """CGCModel's task-id handling (state: `_request`, `_routing`, `_cluster_index_cache`,
    `_active_task`, `_adapter_disabled`)."""

    # ---- task selection: what calls without task_ids use ---------------------------------------
    def set_task(self, task: str | int | None) -> None:
        """Select the task that every call without `task_ids` uses (forward, generate, and so
        transformers' pipelines); None clears the selection (task_ids are then required)."""
        self._active_task = None if task is None else self.tasks[self.task_index(task)]

    @property
    def active_task(self) -> str | None:
        """The task selected by `set_task` (its name), or None."""
        return self._active_task

    @contextlib.contextmanager
    def task(self, task: str | int | None) -> Iterator[None]:
        """`with cgc.task("sum"): ...`: set_task for the block, the previous selection after it."""
        before = self._active_task
        self.set_task(task)
        try:
            yield
        finally:
            self._active_task = before

    def resolve_task_ids(self, task_ids, batch: int, seq: int | None = None) -> TaskRequest:
        """Check task ids once, on the host: a task name or id for the whole batch, [batch] names
        or ids (one task per sequence), or [batch, seq] ids (per token); -1 or None = base model.
        Tensors, numpy arrays and (nested) lists are accepted. None (no ids) uses the active task
        (`set_task`); inside `disable_adapter()` every row is the base model."""
        if getattr(self, "_adapter_disabled", False):
            return TaskRequest(torch.full((batch,), -1, dtype=torch.int64), per_sequence=True)
        if task_ids is None:
            task_ids = getattr(self, "_active_task", None)
        if task_ids is None:
            raise ValueError(
                "task_ids is required: a task name or id per sequence (or per token; -1 = base model), "
                "or select one for every call with cgc.set_task(name) / `with cgc.task(name):`"
            )
        T = self.num_tasks
        if _is_numpy(task_ids):
            task_ids = _numpy_ids(task_ids)
        if _is_scalar_id(task_ids):
            task_ids = [task_ids] * batch
        if isinstance(task_ids, Sequence) and not isinstance(task_ids, str):
            task_ids = torch.tensor(self._list_ids(task_ids), dtype=torch.int64)
        if not isinstance(task_ids, torch.Tensor):
            raise ValueError(f"task_ids must be a tensor, a list of names or ids, or one name/id; got "
                             f"{type(task_ids).__name__}")
        if task_ids.device.type == "meta":
            raise ValueError("task_ids is on the meta device: it holds no values to route by")
        if task_ids.dim() == 0:
            task_ids = task_ids.expand(batch)
        if task_ids.dim() not in (1, 2):
            raise ValueError(f"task_ids must be [batch] or [batch, seq], got shape {tuple(task_ids.shape)}")
        if task_ids.shape[0] != batch:
            raise ValueError(f"task_ids has {task_ids.shape[0]} rows but the batch has {batch} sequences")
        if task_ids.dim() == 2 and seq is not None and task_ids.shape[1] != seq:
            raise ValueError(f"per-token task_ids are {tuple(task_ids.shape)} but input is [{batch}, {seq}]")
        check_task_ids(task_ids.reshape(-1)[:0], T)  # the dtype, before the values are cast
        # Values checked on the host: the ids are there already (lists, names) or come there once.
        host = task_ids.detach().to("cpu", torch.int64)
        check_task_ids(host.reshape(-1), T)
        return TaskRequest(host, per_sequence=task_ids.dim() == 1)

    def _list_ids(self, entries) -> list:
        """A (nested) list of names, ints and None as a (nested) list of ints; -1 for None."""
        out = []
        for t in entries:
            if t is None:
                out.append(-1)
            elif isinstance(t, str):
                out.append(self.task_index(t))
            elif _is_scalar_id(t):
                out.append(int(t))
            elif isinstance(t, (list, tuple)) or _is_numpy(t) or (isinstance(t, torch.Tensor) and t.dim() == 1):
                out.append(self._list_ids(t.tolist() if not isinstance(t, (list, tuple)) else t))
            else:
                raise ValueError(f"task_ids entries must be names, ints or None, got {t!r}")
        if any(isinstance(t, list) for t in out) and not all(isinstance(t, list) for t in out):
            raise ValueError("task_ids entries must be names, ints or None (one per sequence), or one list "
                             "of ids per sequence; got a mix")
        return out

    def _cluster_index(self, device: torch.device) -> torch.Tensor | None:
        if len(self._clusters) == 1:
            return None
        if device not in self._cluster_index_cache:
            index = torch.tensor(self.task_cluster, dtype=torch.int64, device=device)
            self._cluster_index_cache[device] = index
        return self._cluster_index_cache[device]

    def _set_routing(self, routing: TaskRouting | None) -> None:
        self._routing.set(routing)

    def _pre_forward_hook(self, module, args, kwargs):
        """Set this base-model call's routing: the request's, for its [batch, seq] and device (built
        at the request's first call of that shape). Registered under torch.compiler.disable."""
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("CGCModel needs input_ids or inputs_embeds to place the task ids")
        batch, seq = x.shape[0], x.shape[1]
        request = self._request
        key = (batch, seq, x.device)
        routing = request.routings.get(key)
        if routing is None:
            # The host ids go along for host-side planning (the PyTorch backend's row runs).
            ids = request.expand(batch, seq, request.on(x.device))
            routing = request.routings[key] = build_routing(
                ids, self.num_tasks, self._cluster_index(x.device), validate=False,
                host_task_ids=request.expand(batch, seq))
        self._set_routing(routing)

    @contextlib.contextmanager
    def task_context(self, request: TaskRequest) -> Iterator[None]:
        """Serve `request`'s task ids to every base-model call inside; cleared on exit."""
        if self._request is not None:
            raise RuntimeError("CGCModel calls cannot be nested")
        self._request = request
        # Outside torch.compile: a compiled decode step reads the routing, one graph (module docstring).
        hook = torch.compiler.disable(self._pre_forward_hook)
        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._request = None
            self._set_routing(None)


def check_input_rank(x: torch.Tensor, is_ids: bool, where: str) -> None:
    """input_ids must be [batch, seq] and inputs_embeds [batch, seq, hidden]: task ids are placed by
    the first two dims."""
    want = 2 if is_ids else 3
    if x.dim() != want:
        name, shape = ("input_ids", "[batch, seq]") if is_ids else ("inputs_embeds", "[batch, seq, hidden]")
        raise ValueError(f"{where}: {name} must be {shape}, got shape {tuple(x.shape)}")


def _is_scalar_id(t) -> bool:
    """One task id or name: str, int (not bool), a numpy integer, or a 0-d integer tensor."""
    if isinstance(t, bool):
        return False
    if isinstance(t, (str, int)):
        return True
    if _is_numpy(t) and getattr(t, "ndim", None) == 0 and t.dtype.kind in "iu":
        return True
    return isinstance(t, torch.Tensor) and t.dim() == 0 and not t.dtype.is_floating_point and t.dtype != torch.bool


def _is_numpy(t) -> bool:
    return type(t).__module__ == "numpy"


def _numpy_ids(t):
    """A numpy array or scalar of task ids as a tensor (integers) or a list (object arrays: names,
    ints and None); anything else (floats, bools) is a clear error."""
    import numpy as np

    arr = np.asarray(t)
    if arr.dtype.kind in "iu":
        return torch.from_numpy(arr.astype(np.int64))
    if arr.dtype.kind in "OU":
        return arr.tolist()
    raise ValueError(f"task_ids must be integer ids or task names, got a numpy array of {arr.dtype}")
