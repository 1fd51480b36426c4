"""Bytes each kernel `cgc_lora` launches on a GPU moves, counted from its loop structure, against the floor.

    python -m benchmarks.traffic            # the markdown table of BENCHMARKS.md

For one problem (default: d = 4096, T = 16, S = 2, K = 1, r = 8, bf16, M = 16 and 8192) the plans
are the ones the launchers pick on a GPU (`forward_plan`, `backward_plan`), and each launch is
walked program by program the way its loops run:

* "issued": every load and store the programs issue (a weight tile loaded by 288 programs counts
  288 times): the traffic the L2 sees;
* "HBM": each distinct byte once per launch: what DRAM must move when repeated reads of small
  tensors (the experts, z, partials: at most a few MB, all in the 50 MB L2) hit in L2. x, dy, the
  base output, y and dx are each touched by one program per row, so for them the two agree.

The floor is what the LoRA branch must move whatever the kernels (docs/design.md section 7): forward reads x
and the base output and writes y, plus the experts it uses and the saved z; backward reads dy,
writes dx, reads x once for the weight gradients, plus z, the experts and their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cgc_kernels.op.triton import backward, common, forward


@dataclass(frozen=True)
class Shape:
    M: int
    d_in: int = 4096
    d_out: int = 4096
    T: int = 16
    S: int = 2
    K: int = 1
    r: int = 8
    C: int = 1
    eb: int = 2  # bytes per element of x / experts (bf16)
    seq: int = 128  # rows per sequence (one task each); M = 16 is decode: one row per task


def task_counts(s: Shape) -> list[int]:
    """Rows per task: decode one per task; training an even split of whole sequences."""
    if s.M <= s.T:
        return [1] * s.M + [0] * (s.T - s.M)
    per, extra = divmod(s.M // s.seq, s.T)
    return [(per + (t < extra)) * s.seq for t in range(s.T)]


def _tiles(counts: list[int], block: int, M: int, T: int) -> list[int]:
    """Rows of each used tile (routing tiles or chunks), tasks in order."""
    out = []
    for c in counts:
        out += [min(block, c - i) for i in range(0, c, block)]
    return out


def _parts(rows: int, sub: int, tile_rows: int) -> list[int]:
    part = -(-tile_rows // sub)
    return [max(0, min(part, rows - i * part)) for i in range(sub)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def traffic(s: Shape, tile_rows: int = 64) -> list[dict]:
    """One row per launch: name, programs, issued bytes, HBM bytes, and the pass's floor."""
    with _gpu_configs():
        return _traffic(s, tile_rows)


class _gpu_configs:
    def __enter__(self):
        self.saved = (common._pinned, common.GPU_CONFIGS_IN_INTERPRETER)
        common._pinned, common.GPU_CONFIGS_IN_INTERPRETER = False, True

    def __exit__(self, *exc):
        common._pinned, common.GPU_CONFIGS_IN_INTERPRETER = self.saved


def _traffic(s: Shape, tile_rows: int) -> list[dict]:
    RS, RK = s.S * s.r, s.K * s.r
    R = RS + RK
    eb, f4 = s.eb, 4
    counts = task_counts(s)
    Mr = sum(counts)
    used = [t for t in range(s.T) if counts[t]]
    rank = common.rank_size(RS, RK)
    max_tiles = _cdiv(s.M, tile_rows) + s.T
    dtype = torch.bfloat16 if eb == 2 else torch.float32
    fplan = forward.forward_plan(s.M, s.T, s.d_in, s.d_out, rank, dtype, max_tiles, tile_rows)
    bplan = backward.backward_plan(s.M, s.T, s.d_in, s.d_out, rank, dtype, tile_rows)
    tiles = _tiles(counts, tile_rows, s.M, s.T)
    # Experts the batch uses: each used task's own, each cluster's shared (one cluster here).
    w_a = (len(used) * RK + s.C * RS) * s.d_in * eb
    w_b = (len(used) * RK + s.C * RS) * s.d_out * eb
    rows = []

    def add(name, programs, issued, hbm, floor_of):
        rows.append(dict(launch=name, programs=programs, issued=issued, hbm=hbm, pass_=floor_of))

    # ---- forward ----
    fwd_floor = (Mr * s.d_in + 2 * s.M * s.d_out) * eb + w_a + w_b + Mr * R * f4
    parts = [p for t in tiles for p in _parts(t, fplan.sub, tile_rows)]
    mblocks = sum(_cdiv(p, fplan.BLOCK_M) for p in parts)
    n_cols = s.d_out / fplan.n_split
    io = 2 * s.M * s.d_out * eb + Mr * R * f4  # base in, y out (every row), z out
    if fplan.kind == "fused":
        issued = (fplan.n_split * Mr * s.d_in * eb + fplan.n_split * mblocks * R * s.d_in * eb
                  + fplan.n_split * mblocks * R * n_cols * eb + io)
        hbm = fplan.n_split * Mr * s.d_in * eb + w_a + w_b + io
        add(f"forward fused {fplan.grids(max_tiles)[0]}", max_tiles * fplan.sub * fplan.n_split,
            issued, hbm, "forward")
    else:
        k_split = fplan.k_split
        zp = k_split * Mr * R * f4
        issued = Mr * s.d_in * eb + mblocks * R * s.d_in * eb + zp
        add(f"forward shrink {fplan.grids(max_tiles)[0]}", max_tiles * fplan.sub * k_split,
            issued, Mr * s.d_in * eb + w_a + zp, "forward")
        issued = fplan.n_split * zp + mblocks * R * s.d_out * eb + io
        add(f"forward expand {fplan.grids(max_tiles)[1]}", max_tiles * fplan.sub * fplan.n_split,
            issued, zp + w_b + io, "forward")

    # ---- backward ----
    e_bytes = (s.C * RS + s.T * RK) * (s.d_in + s.d_out) * eb  # every expert's dA, dB written
    bwd_floor = (Mr * s.d_out + s.M * s.d_in + Mr * s.d_in) * eb + Mr * R * f4 + w_a + w_b + e_bytes
    parts = [p for t in tiles for p in _parts(t, bplan.sub, tile_rows)]
    mblocks = sum(_cdiv(p, bplan.BLOCK_M) for p in parts)
    g = bplan.grids(s.M, s.T, s.C, s.d_in, s.d_out, max_tiles)
    chunks = _tiles(counts, bplan.chunk, s.M, s.T)
    n_a, n_b = g["dA"][1], g["dB"][1]
    multi = [t for t in range(s.T) if counts[t] > bplan.chunk]
    single = [t for t in range(s.T) if 0 < counts[t] <= bplan.chunk]
    n_multi_chunks = sum(_cdiv(counts[t], bplan.chunk) for t in multi)
    # fp32 partials of the shared side (every chunk) and of multi-chunk tasks; direct writes else.
    parts_a = (len(chunks) * RS + n_multi_chunks * RK) * s.d_in * f4
    parts_b = (len(chunks) * RS + n_multi_chunks * RK) * s.d_out * f4
    direct_a = len(single) * RK * s.d_in * eb
    direct_b = len(single) * RK * s.d_out * eb
    dzp = n_b * Mr * R * f4 if bplan.dz_parts else 0
    dy_once = Mr * s.d_out * eb
    # launch 1: dy once -> dB blocks and dz partials; z per d_out block (issued), once (HBM)
    issued = dy_once + n_b * Mr * R * f4 + len(chunks) * n_b * R * (s.d_out / n_b) * eb + parts_b + direct_b + dzp
    hbm = dy_once + Mr * R * f4 + w_b + parts_b + direct_b + dzp
    add(f"backward dB + dz parts {g['dB']}", g["dB"][0] * g["dB"][1], issued, hbm, "backward")
    # launch 2: dz from the partials (or dy again), dgates, dzg, dx for every row
    dz_in = dzp if bplan.dz_parts else dy_once
    issued = dz_in + mblocks * R * s.d_in * eb + 2 * Mr * R * f4 + s.M * s.d_in * eb
    if not bplan.dz_parts:
        issued += mblocks * R * s.d_out * eb
    hbm = dz_in + w_a + 2 * Mr * R * f4 + s.M * s.d_in * eb
    add(f"backward rows {g['rows']}", g["rows"][0], issued, hbm, "backward")
    # launch 3: x once -> dA blocks; dzg per d_in block (issued), once (HBM)
    issued = Mr * s.d_in * eb + n_a * Mr * R * f4 + parts_a + direct_a
    hbm = Mr * s.d_in * eb + Mr * R * f4 + parts_a + direct_a
    add(f"backward dA {g['dA']}", g["dA"][0] * g["dA"][1], issued, hbm, "backward")
    out_rest = e_bytes - direct_a - direct_b
    add(f"backward reduce {g['reduce']}", g["reduce"][0] * g["reduce"][1], parts_a + parts_b + out_rest,
        parts_a + parts_b + out_rest, "backward")
    for row in rows:
        row["floor"] = fwd_floor if row["pass_"] == "forward" else bwd_floor
    return rows


def markdown(shapes: list[Shape]) -> str:
    lines = ["| M | launch (grid) | programs | issued MB | HBM MB | pass HBM / floor |",
             "|---|---|---:|---:|---:|---:|"]
    for s in shapes:
        rows = traffic(s)
        for p in ("forward", "backward"):
            mine = [r for r in rows if r["pass_"] == p]
            if not mine or (p == "backward" and s.M <= s.T):
                continue
            total = sum(r["hbm"] for r in mine)
            for i, r in enumerate(mine):
                ratio = f"{total / 1e6:.1f} / {r['floor'] / 1e6:.1f} = {total / r['floor']:.2f}x" if i == 0 else ""
                lines.append(f"| {s.M} | {r['launch']} | {r['programs']} | {r['issued'] / 1e6:.1f} | "
                             f"{r['hbm'] / 1e6:.1f} | {ratio} |")
    return "\n".join(lines)


def step_ratio(s: Shape) -> float:
    """HBM bytes of forward + backward over the floor of both."""
    rows = traffic(s)
    floors = {r["pass_"]: r["floor"] for r in rows}
    return sum(r["hbm"] for r in rows) / sum(floors.values())


if __name__ == "__main__":
    print(markdown([Shape(M=16), Shape(M=8192)]))
    print(f"\nforward + backward at M = 8192: {step_ratio(Shape(M=8192)):.2f}x the floor")
