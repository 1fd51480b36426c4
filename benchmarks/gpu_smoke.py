"""Smoke test of the fused op on the device: forward and every gradient against the float64
reference on the same inputs, bf16 and fp32, printing each one's max error against its tolerance.

    python -m benchmarks.gpu_smoke [--dry-run] [--json FILE]

On CUDA: M=4096 tokens of a 4096 x 4096 layer, 4 tasks in 2 clusters, S=2, K=1, r=8, task -1 rows.
--dry-run: the same on CPU in Triton's interpreter (TRITON_INTERPRET=1) at M=37, d=33.
Exit status 1 if any value is beyond its dtype's tolerance (tests/cases.py TOLERANCES).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.op_inputs import DIFF, TOLERANCES, Case, make_inputs
from cgc_kernels import cgc_lora, reference


def check(case: Case, dtype: torch.dtype, device: str) -> dict:
    args = make_inputs(case, dtype=dtype, device=device)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def run(fn, inputs, **kw):
        a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in inputs.items()}
        y = fn(**a, **kw)
        y.backward(dy.to(y.dtype))
        return {"y": y.detach(), **{f"d{k}": a[k].grad for k in DIFF}}

    t0 = time.perf_counter()
    got = run(cgc_lora, args, backend="triton")
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0  # first call: includes the kernels' compile
    want = run(reference.cgc_lora, {k: (v.double() if k in DIFF else v) for k, v in args.items()})
    tol = TOLERANCES[dtype]
    errors, worst = {}, 0.0
    for k, g in got.items():
        w = want[k] if want[k] is not None else torch.zeros_like(g, dtype=torch.float64)
        err = (g.double() - w).abs()
        # allclose's own bound, per element: atol + rtol * |want|; ratio > 1 fails
        bound = tol["atol"] + tol["rtol"] * w.abs()
        ratio = float((err / bound).max()) if err.numel() else 0.0
        errors[k] = dict(max_abs=float(err.max()) if err.numel() else 0.0, ratio=ratio)
        worst = max(worst, ratio)
    return dict(dtype=str(dtype).replace("torch.", ""), worst_ratio=worst, first_call_s=seconds, errors=errors)


def stub_run(case: Case, json_path: str | None) -> int:
    """The op's host side (routing, launch plans, autograd) with every kernel stubbed: the plumbing
    of a kernel step where no kernel can run (no GPU, no usable interpreter)."""
    from benchmarks.stub_kernels import stubbed_kernels

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        args = make_inputs(case, dtype=dtype, device="cpu")
        with stubbed_kernels() as launches:
            a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
            cgc_lora(**a, backend="triton").sum().backward()
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), worst_ratio=None, launches=dict(launches)))
        print(f"{rows[-1]['dtype']:>9}: stub: {sum(launches.values())} launches {dict(launches)}, nothing compared")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device="cpu (kernels stubbed)", M=case.M, d=case.d_in, rows=rows), f, indent=1)
    return 0 if all(r["launches"] for r in rows) else 1


def gpu_case(dry: bool = False) -> Case:
    """The smoke test's problem: M=4096 tokens of a 4096 x 4096 layer on CUDA (M=37, d=33 dry)."""
    M, d = (37, 33) if dry else (4096, 4096)
    return Case(M=M, d_in=d, d_out=d, T=4, S=2, K=1, r=8, C=2, ids="with_unrouted")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--stub", action="store_true",
                    help="with --dry-run where Triton's interpreter cannot run: the host side of every call "
                         "with kernels that launch nothing (benchmarks/stub_kernels.py); nothing is compared")
    a = ap.parse_args(argv)
    if a.stub:
        return stub_run(gpu_case(True), a.json)
    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    case = gpu_case(a.dry_run)
    M, d = case.M, case.d_in
    rows = [check(case, dtype, device) for dtype in (torch.bfloat16, torch.float32)]
    for r in rows:
        print(f"{r['dtype']:>9}: worst error / tolerance {r['worst_ratio']:.3f} (first call {r['first_call_s']:.1f} s)")
        for k, e in r["errors"].items():
            print(f"           {k:<10} max |err| {e['max_abs']:.3e}  err/tol {e['ratio']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=device, M=M, d=d, rows=rows), f, indent=1)
    return 0 if all(r["worst_ratio"] <= 1.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
