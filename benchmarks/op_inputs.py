"""Random CGC-LoRA op inputs for a named case, and the tolerances every comparison against the
reference uses: shared by the tests (tests/cases.py) and the benchmarks, which import no tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The op's differentiable inputs, by argument name.
DIFF = ("x", "gates", "shared_a", "shared_b", "task_a", "task_b")

# Tolerances by dtype, used by every comparison against the reference or the oracle.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=5e-2),
}


@dataclass
class Case:
    M: int
    d_in: int
    d_out: int
    T: int
    S: int
    K: int
    r: int
    C: int = 1
    per_token_gates: bool = False
    ids: str = "random"  # random | with_unrouted | one_task | all_unrouted | skip_task


def make_inputs(case: Case, dtype=torch.float64, seed=0, device="cpu"):
    """Random inputs for `case`: a dict of the op's arguments (B nonzero, gates softmaxed)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    M, T, C, S, K, r = case.M, case.T, case.C, case.S, case.K, case.r
    if case.ids == "random":
        ids = torch.randint(0, T, (M,), generator=g)
    elif case.ids == "with_unrouted":
        ids = torch.randint(-1, T, (M,), generator=g)
    elif case.ids == "one_task":
        ids = torch.full((M,), T - 1)
    elif case.ids == "all_unrouted":
        ids = torch.full((M,), -1)
    elif case.ids == "skip_task":  # task 0 has no tokens
        ids = torch.randint(1, T, (M,), generator=g) if T > 1 else torch.zeros(M, dtype=torch.int64)
    else:
        raise ValueError(case.ids)
    cluster = torch.arange(T) % C if C > 1 else None
    gate_rows = M if case.per_token_gates else T
    args = dict(
        x=rnd(M, case.d_in),
        task_ids=ids,
        gates=torch.softmax(rnd(gate_rows, S + K), dim=-1),
        shared_a=rnd(C, S * r, case.d_in) / case.d_in**0.5,
        shared_b=rnd(C, case.d_out, S * r) / max(S * r, 1) ** 0.5,
        task_a=rnd(T, K * r, case.d_in) / case.d_in**0.5,
        task_b=rnd(T, case.d_out, K * r) / max(K * r, 1) ** 0.5,
        scaling=2.0,
        task_cluster=cluster,
        per_token_gates=case.per_token_gates,
    )
    for k in DIFF:
        args[k] = args[k].to(device=device, dtype=dtype if k != "gates" else torch.float32
                             if dtype != torch.float64 else torch.float64)
    args["task_ids"] = args["task_ids"].to(device)
    if cluster is not None:
        args["task_cluster"] = cluster.to(device)
    return args
