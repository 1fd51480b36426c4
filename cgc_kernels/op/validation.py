"""Argument checks shared by every backend of `cgc_lora`: bad input fails here, before any kernel.

`check_call` (`check_cgc_lora_args`) returns the problem's sizes (`CGCShapes`) so callers never re-derive them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .routing import TaskRouting, check_task_ids, checked_once

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CGCShapes:
    """Sizes of one `cgc_lora` call."""

    M: int  # tokens
    d_in: int
    d_out: int
    T: int  # tasks
    C: int  # clusters
    S: int  # shared experts per cluster
    K: int  # task experts per task
    r: int  # rank of one expert

    @property
    def num_experts(self) -> int:
        return self.S + self.K


def shapes_of(x: torch.Tensor, gates: torch.Tensor, shared_a: torch.Tensor, task_a: torch.Tensor,
              task_b: torch.Tensor) -> CGCShapes:
    """The sizes of a call whose arguments are already checked (the one place S, K and r are
    derived from the stacked ranks: check_cgc_lora_args returns this, custom ops that get only
    tensors call it)."""
    C, Sr, d_in = shared_a.shape
    T, Kr = task_a.shape[0], task_a.shape[1]
    r = (Sr + Kr) // gates.shape[1]
    return CGCShapes(M=x.shape[0], d_in=d_in, d_out=task_b.shape[1], T=T, C=C, S=Sr // r, K=Kr // r, r=r)


def _check_clusters(task_cluster: torch.Tensor, C: int) -> None:
    lo, hi = (int(v) for v in torch.aminmax(task_cluster))
    if lo < 0 or hi >= C:
        raise ValueError(f"task_cluster values must lie in [0, {C}) (clusters in shared_a)")


def _tensor(name: str, t, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


class CGCCall(NamedTuple):
    """The arguments of one `cgc_lora` call, named (dispatch.py passes them as one bundle)."""

    x: torch.Tensor
    task_ids: torch.Tensor | TaskRouting
    gates: torch.Tensor
    shared_a: torch.Tensor
    shared_b: torch.Tensor
    task_a: torch.Tensor
    task_b: torch.Tensor
    scaling: float
    task_cluster: torch.Tensor | None = None
    per_token_gates: bool = False
    dropout_p: float = 0.0
    out: torch.Tensor | None = None
    base: torch.Tensor | None = None


def check_cgc_lora_args(*args, **kwargs) -> CGCShapes:
    """check_call(CGCCall(*args, **kwargs)): the op's arguments as `cgc_lora` takes them."""
    return check_call(CGCCall(*args, **kwargs))


def check_call(call: CGCCall) -> CGCShapes:
    """Validate a `cgc_lora` call (shapes, dtypes, devices, task ids) and return its sizes.

    Raises ValueError naming the offending argument. Task ids are range-checked unless a
    `TaskRouting` (already checked) is passed. `base` is checked by the caller (dispatch.py).
    """
    x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling, task_cluster, per_token_gates, dropout_p, \
        out, _ = call
    _tensor("x", x, 2)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    M, d_in = x.shape
    _tensor("shared_a", shared_a, 3)
    _tensor("shared_b", shared_b, 3)
    _tensor("task_a", task_a, 3)
    _tensor("task_b", task_b, 3)
    _tensor("gates", gates, 2)

    for name, t in (("shared_a", shared_a), ("shared_b", shared_b), ("task_a", task_a), ("task_b", task_b)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; experts must match x")
    if not gates.dtype.is_floating_point:
        raise ValueError(f"gates must be a floating tensor, got {gates.dtype}")

    C, Sr, sa_in = shared_a.shape
    T, Kr, ta_in = task_a.shape
    if sa_in != d_in:
        raise ValueError(f"shared_a is [C, S*r, d_in] = {tuple(shared_a.shape)} but x has d_in={d_in}")
    if ta_in != d_in:
        raise ValueError(f"task_a is [T, K*r, d_in] = {tuple(task_a.shape)} but x has d_in={d_in}")
    if C < 1:
        raise ValueError("shared_a must have at least one cluster (dim 0 >= 1), even when S = 0")
    if T < 1:
        raise ValueError("task_a must have at least one task (dim 0 >= 1), even when K = 0")
    if shared_b.shape[0] != C or shared_b.shape[2] != Sr:
        raise ValueError(f"shared_b must be [C, d_out, S*r] = [{C}, d_out, {Sr}], got {tuple(shared_b.shape)}")
    if task_b.shape[0] != T or task_b.shape[2] != Kr:
        raise ValueError(f"task_b must be [T, d_out, K*r] = [{T}, d_out, {Kr}], got {tuple(task_b.shape)}")
    d_out = shared_b.shape[1]
    if task_b.shape[1] != d_out:
        raise ValueError(f"task_b has d_out={task_b.shape[1]} but shared_b has d_out={d_out}")

    E = gates.shape[1]
    rows = M if per_token_gates else T
    what = "[M, S+K] (per_token_gates=True)" if per_token_gates else "[T, S+K]"
    if gates.shape[0] != rows:
        raise ValueError(f"gates must be {what} with {rows} rows, got {tuple(gates.shape)}")
    if E < 1 or (Sr + Kr) % E != 0:
        raise ValueError(
            f"gates has {E} columns, which must be S+K: the stacked ranks S*r + K*r = {Sr + Kr} "
            f"are not a multiple of it"
        )
    r = (Sr + Kr) // E
    if r < 1 or Sr % r or Kr % r:
        raise ValueError(
            f"gates has {E} columns but shared rank {Sr} and task rank {Kr} do not split into "
            f"S + K = {E} experts of one rank"
        )

    ids = task_ids.task_ids if isinstance(task_ids, TaskRouting) else task_ids
    named = [("task_ids", ids), ("gates", gates), ("shared_a", shared_a), ("shared_b", shared_b),
             ("task_a", task_a), ("task_b", task_b)]
    if task_cluster is not None:
        named.append(("task_cluster", task_cluster))
    if out is not None:
        _tensor("out", out, 2)
        if tuple(out.shape) != (M, d_out):
            raise ValueError(f"out must be [M, d_out] = {(M, d_out)}, got {tuple(out.shape)}")
        if not out.dtype.is_floating_point:
            raise ValueError(f"out must be a floating tensor, got {out.dtype}")
        named.append(("out", out))
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")

    if isinstance(task_ids, TaskRouting):
        if task_ids.num_rows != M:
            raise ValueError(f"routing covers {task_ids.num_rows} tokens but x has {M} rows")
        if task_ids.num_tasks != T:
            raise ValueError(f"routing was built for {task_ids.num_tasks} tasks but task_a has {T}")
    else:  # once per id tensor, not once per layer that receives it
        checked_once(task_ids, ("task_ids", T, M), lambda: check_task_ids(task_ids, T, num_rows=M))

    if task_cluster is None:
        if C != 1:
            raise ValueError(f"task_cluster [T] is required when there are {C} clusters (shared_a dim 0)")
    else:
        _tensor("task_cluster", task_cluster, 1)
        if task_cluster.dtype.is_floating_point or task_cluster.dtype == torch.bool:
            raise ValueError(f"task_cluster must be an integer tensor, got {task_cluster.dtype}")
        if task_cluster.shape[0] != T:
            raise ValueError(f"task_cluster must be [T] = [{T}], got {tuple(task_cluster.shape)}")
        # A routing's owner built task_cluster itself; other callers' is checked once per tensor.
        if not isinstance(task_ids, TaskRouting):
            checked_once(task_cluster, ("task_cluster", C), lambda: _check_clusters(task_cluster, C))

    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ValueError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")

    return shapes_of(x, gates, shared_a, task_a, task_b)
