"""Jit helpers that turn a program id into the rows it owns, read from the routing on the device.

Two tables, both of a size fixed by M, T and a block size (so grids never depend on the ids):

* Routing tiles (`routing.tile_*`, `max_tiles = cdiv(M, tile_rows) + T` slots). The first slots
  hold each task's tiles; the unused slots at the end take the task -1 rows, which sort last in
  `order` (positions [n_routed, M)), `tile_rows` at a time. There are always enough unused
  slots: sum_t cdiv(count_t, b) <= cdiv(n_routed, b) + T - 1, and cdiv(n_routed, b) +
  cdiv(M - n_routed, b) <= cdiv(M, b) + 1. A program may own a `1 / sub_parts` part of a tile.
* Weight-gradient chunks (`cdiv(M, chunk) + T` slots): each task's segment cut into pieces of at
  most `chunk` rows, tasks in index order, so long segments (a Zipf-heavy task) become several
  balanced programs and a task's chunks are consecutive slots (reduced in that fixed order).

Both read `counts` [T] as one vector of T_PAD lanes (no host sync, no scalar loop over tasks). The
part and chunk sizes are run-time values, so they never add a compiled variant.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_counts(counts_ptr, tt, T):
    """Rows per task [T_PAD] (0 past T) in int32: the routing stores int64, and a 64-bit integer
    division is a called subroutine on NVIDIA GPUs whose call saves live registers to the stack
    (12-24 B of "spills" in otherwise small kernels). Counts are at most M, an int32 argument."""
    return tl.load(counts_ptr + tt, mask=tt < T, other=0).to(tl.int32)


@triton.jit
def tile_rows(slot, sub, tile_task_ptr, tile_start_ptr, tile_end_ptr, counts_ptr,
              M, T, tile_rows_n, sub_parts, T_PAD: tl.constexpr):
    """(task, lo, hi): positions [lo, hi) of `order` owned by part `sub` (of `sub_parts`) of
    routing tile `slot`.

    task -1: rows of task -1 (no adapter), or an empty range when nothing is left for this slot.
    """
    t = tl.load(tile_task_ptr + slot)
    start = tl.load(tile_start_ptr + slot)
    end = tl.load(tile_end_ptr + slot)
    if t < 0:
        tt = tl.arange(0, T_PAD)
        cnt = load_counts(counts_ptr, tt, T)
        n_routed = tl.sum(cnt, axis=0)
        n_used = tl.sum((cnt + tile_rows_n - 1) // tile_rows_n, axis=0)
        u_start = n_routed + (slot - n_used) * tile_rows_n
        u_end = tl.minimum(u_start + tile_rows_n, M)
        start = tl.minimum(u_start, u_end).to(tl.int32)
        end = u_end.to(tl.int32)
    part = (tile_rows_n + sub_parts - 1) // sub_parts
    lo = tl.minimum(start + sub * part, end)
    hi = tl.minimum(lo + part, end)
    return t, lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def chunk_rows(slot, counts_ptr, starts_ptr, T, chunk, T_PAD: tl.constexpr):
    """(task, lo, hi, n_chunks of that task) of weight-gradient chunk `slot`; task -1 if unused."""
    tt = tl.arange(0, T_PAD)
    t_ok = tt < T
    cnt = load_counts(counts_ptr, tt, T)
    n_chunks = (cnt + chunk - 1) // chunk
    cum = tl.cumsum(n_chunks, axis=0)  # inclusive
    task = tl.sum((cum <= slot).to(tl.int32) & t_ok.to(tl.int32), axis=0)
    hit = tt == task
    first = tl.sum(tl.where(hit, cum - n_chunks, 0), axis=0)
    nt = tl.sum(tl.where(hit, n_chunks, 0), axis=0)
    seg_end = tl.sum(tl.where(hit, cnt, 0), axis=0)
    seg_start = tl.load(starts_ptr + task, mask=task < T, other=0)
    lo = seg_start + (slot - first) * chunk
    hi = tl.minimum(lo + chunk, seg_start + seg_end)
    task = tl.where(task < T, task, -1)
    return task, lo, hi, nt


@triton.jit
def task_chunk_span(task, counts_ptr, T, chunk, T_PAD: tl.constexpr):
    """(first slot, number of chunks) of `task` in the chunk table."""
    tt = tl.arange(0, T_PAD)
    cnt = load_counts(counts_ptr, tt, T)
    n_chunks = (cnt + chunk - 1) // chunk
    cum = tl.cumsum(n_chunks, axis=0)
    hit = tt == task
    nt = tl.sum(tl.where(hit, n_chunks, 0), axis=0)
    return tl.sum(tl.where(hit, cum, 0), axis=0) - nt, nt
