"""`cgc-lora bench`: a quick look at the CGC-LoRA op and layer on the current device.

Providers, each checked against the reference before it is timed:

    reference    cgc_kernels.reference.cgc_lora (a loop over clusters and tasks, the CPU path)
    expert loop  one pair of small matmuls per (task, expert), as a MOELoRA-style layer runs
    fused        the Triton kernels (CUDA only)
    layer        CGCLoRALinear around an nn.Linear, next to the nn.Linear alone

Times are medians of a few repetitions (milliseconds); for careful numbers use `pytest benchmarks/`.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..adapter.layer import CGCLoRALinear
from ..op import reference
from ..op.dispatch import cgc_lora


def register(subparsers) -> None:
    """`cgc-lora bench`: its parser, run by cmd_bench."""
    p = subparsers.add_parser("bench", help="the op on this device: reference vs an expert loop vs fused (CUDA)")
    p.add_argument("--full", action="store_true", help="larger shapes")
    p.set_defaults(func=cmd_bench)


def expert_loop(x, task_ids, gates, shared_a, shared_b, task_a, task_b, scaling):
    """x [M, d_in] -> [M, d_out]: a Python loop over tasks and over each expert's rank block."""
    T = task_a.shape[0]
    S = shared_a.shape[1]
    E = gates.shape[1]
    r = (S + task_a.shape[1]) // E
    n_shared = S // r
    out = torch.zeros(x.shape[0], shared_b.shape[1], dtype=x.dtype, device=x.device)
    for t in range(T):
        rows = (task_ids == t).nonzero().squeeze(1)
        xt = x[rows]
        yt = torch.zeros(rows.numel(), out.shape[1], dtype=x.dtype, device=x.device)
        for e in range(E):
            if e < n_shared:
                a, b = shared_a[0, e * r:(e + 1) * r], shared_b[0, :, e * r:(e + 1) * r]
            else:
                j = e - n_shared
                a, b = task_a[t, j * r:(j + 1) * r], task_b[t, :, j * r:(j + 1) * r]
            yt = yt + gates[t, e] * ((xt @ a.T) @ b.T)
        out = out.index_add(0, rows, yt * scaling)
    return out


def _time(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_quick_bench(quick: bool = True) -> str:
    """The comparison table as text."""
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        M, d, T, reps = (4096 if quick else 16384), (2048 if quick else 4096), 8, 10
    else:
        M, d, T, reps = (256 if quick else 1024), (576 if quick else 1024), 4, 5
    S, K, r = 2, 1, 8
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_()

    x = rand(M, d)
    ids = torch.randint(0, T, (M,), generator=g).to(dev)
    gates = torch.softmax(torch.randn(T, S + K, generator=g), -1).to(dev, torch.float32).requires_grad_()
    sa, sb = rand(1, S * r, d, scale=0.05), rand(1, d, S * r, scale=0.05)
    ta, tb = rand(T, K * r, d, scale=0.05), rand(T, d, K * r, scale=0.05)
    params = (x, gates, sa, sb, ta, tb)
    ref = reference.cgc_lora(x, ids, gates, sa, sb, ta, tb, 2.0).float()
    dy = torch.randn(M, d, generator=g).to(dev, dtype)

    providers = {
        "reference": lambda: reference.cgc_lora(x, ids, gates, sa, sb, ta, tb, 2.0),
        "expert loop": lambda: expert_loop(x, ids, gates.to(dtype), sa, sb, ta, tb, 2.0),
    }
    if cuda:
        providers["fused"] = lambda: cgc_lora(x, ids, gates, sa, sb, ta, tb, 2.0, backend="triton")

    rows = []
    for name, fn in providers.items():
        try:
            err = (fn().float() - ref).abs().max().item()
        except NotImplementedError:
            rows.append((name, None, None, "not built"))
            continue

        def fwd_bwd(fn=fn):
            for p in params:
                p.grad = None
            fn().backward(dy)

        with torch.no_grad():
            f = _time(fn, reps, sync)
        rows.append((name, f, _time(fwd_bwd, reps, sync), f"{err:.1e}"))

    base = torch.nn.Linear(d, d, bias=False).to(dev, dtype)
    layer = CGCLoRALinear(base, T, S, K, r, 16.0)
    xl = x.detach().clone().requires_grad_()
    with torch.no_grad():
        lin = _time(lambda: base(xl), reps, sync)
        lay = _time(lambda: layer(xl, ids), reps, sync)
    rows.append(("nn.Linear alone", lin, _time(lambda: base(xl).backward(dy), reps, sync), "-"))
    rows.append(("CGCLoRALinear", lay, _time(lambda: layer(xl, ids).backward(dy), reps, sync), "-"))

    name = torch.cuda.get_device_name() if cuda else "CPU"
    head = (f"device: {name} ({torch.get_num_threads()} threads)  dtype: {str(dtype)[6:]}  "
            f"M={M} tokens, d_in=d_out={d}, T={T} tasks, S={S}, K={K}, r={r}")
    lines = [head, f"{'provider':<16} {'forward ms':>11} {'fwd+bwd ms':>11} {'max err':>9}", "-" * 50]
    for n, f, fb, e in rows:
        fs = "-" if f is None else f"{f:.2f}"
        fbs = "-" if fb is None else f"{fb:.2f}"
        lines.append(f"{n:<16} {fs:>11} {fbs:>11} {e:>9}")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    """`cgc-lora bench`."""
    print(run_quick_bench(quick=not args.full), flush=True)
    return 0
