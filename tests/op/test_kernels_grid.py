"""The GPU-filling kernels (forward.py, backward.py) against the reference op.

Each launcher is called directly with a routing, both forward plans ("fused": one 2-D launch;
"split": shrink + expand), and compared with `cgc_kernels.reference` in float64 on the same
(rounded) inputs: the output base + delta and every gradient. On CPU they run in Triton's
interpreter with the pinned (large) blocks; `test_gpu_block_configs` reruns a few cases with the
blocks a GPU would use (CGC_KERNELS_GPU_CONFIGS=1), so those configs are proven on CPU too.
"""

from __future__ import annotations

import pytest
import torch

from cgc_kernels import reference
from cgc_kernels.op.routing import build_routing
from cgc_kernels.op.triton import backward, common, dropout, forward
from tests.cases import DIFF, TOLERANCES, TRITON_DEVICES, Case, make_inputs

# CPU tensors in the interpreter, CUDA when the kernels run compiled on a GPU (none: the cases skip).
DEVICES = TRITON_DEVICES
PLANS = ["fused", "split"]

CASES = [
    # odd d_in / d_out: every d loop has a masked tail, and the shrink's d_in parts are uneven
    pytest.param(Case(M=37, d_in=65, d_out=33, T=3, S=2, K=1, r=4), 64, id="odd-d"),
    # a task with no tokens: no tile, no chunk; its dA / dB must be written as exact zeros
    pytest.param(Case(M=29, d_in=33, d_out=33, T=3, S=1, K=1, r=4, ids="skip_task"), 64, id="empty-task"),
    # task -1 rows: y = base there, dx = 0 there, both written by the kernels (nothing pre-filled)
    pytest.param(Case(M=40, d_in=33, d_out=33, T=3, S=2, K=1, r=4, ids="with_unrouted"), 16, id="unrouted"),
    # every row task -1: only the unused tile slots run; every gradient is zero
    pytest.param(Case(M=9, d_in=33, d_out=33, T=2, S=1, K=1, r=4, ids="all_unrouted"), 4, id="all-unrouted"),
    # clusters: shared partials summed over the cluster's chunks only; S*r = 24 pads to 32
    pytest.param(Case(M=45, d_in=33, d_out=33, T=4, S=3, K=1, r=8, C=2, ids="with_unrouted"), 16,
                 id="clusters"),
    # per-token gates with clusters and task -1 rows: gates and dgates indexed by token in every
    # launch; the task -1 rows' dgates written as zeros (nothing is zero-filled before)
    pytest.param(Case(M=33, d_in=33, d_out=33, T=3, S=2, K=2, r=4, C=2, per_token_gates=True,
                      ids="with_unrouted"), 64, id="token-gates"),
    # the fuzz example that found it: S = 0, d_in = 1, per-token gates, task -1 rows
    pytest.param(Case(M=18, d_in=1, d_out=3, T=4, S=0, K=2, r=4, C=2, per_token_gates=True,
                      ids="with_unrouted"), 64, id="token-gates-S0-d1"),
    # S = 0 (multi-LoRA) and K = 0 (MOELoRA): one side absent everywhere
    pytest.param(Case(M=30, d_in=33, d_out=33, T=3, S=0, K=1, r=8), 64, id="S0"),
    pytest.param(Case(M=30, d_in=33, d_out=33, T=2, S=3, K=0, r=4), 64, id="K0"),
    # M = 1: one row, one tile, the rest of the tile table unused
    pytest.param(Case(M=1, d_in=33, d_out=33, T=2, S=1, K=1, r=4), 64, id="M1"),
    # M much larger than a tile (16-row tiles, 2 row parts per tile at 64-row blocks are empty)
    pytest.param(Case(M=200, d_in=33, d_out=17, T=2, S=1, K=1, r=4, ids="with_unrouted"), 16,
                 id="many-tiles"),
]


def zipf_ids(M: int, T: int, seed: int = 0) -> torch.Tensor:
    """Task ids with a Zipf skew (p_t ~ (t+1)^-1.5): task 0 holds most rows, so with small chunks it
    becomes several chunks while the tail tasks stay one chunk or none."""
    w = torch.arange(1, T + 1, dtype=torch.float64) ** -1.5
    return torch.multinomial(w / w.sum(), M, replacement=True, generator=torch.Generator().manual_seed(seed))


def _routing(args, T, tile_rows):
    return build_routing(args["task_ids"], T, args["task_cluster"], tile_rows=tile_rows)


def run_grid(args, rt, dy, *, plan=None, chunk=None, base=None, dropout_p=0.0, seed=0, dz_parts=None):
    """(y, grads dict) from the new launchers: y = base + delta, then every gradient from dy."""
    T = args["task_a"].shape[0]
    a = args
    y, z = forward.cgc_lora_forward(
        a["x"], a["gates"], a["shared_a"], a["shared_b"], a["task_a"], a["task_b"], a["task_cluster"],
        rt.order, rt.tile_task, rt.tile_start, rt.tile_end, rt.counts, rt.tile_rows,
        a["scaling"], a["per_token_gates"], dropout_p, seed, base=base, plan=plan)
    M, d_in = a["x"].shape
    RS, RK = a["shared_a"].shape[1], a["task_a"].shape[1]
    rank = common.rank_size(RS, RK)
    bplan = backward.backward_plan(M, T, d_in, dy.shape[1], rank, a["x"].dtype, rt.tile_rows, chunk=chunk,
                                        rank=RS + RK, dz_parts=dz_parts)
    grads = backward.cgc_lora_backward(
        dy, a["x"], a["gates"], a["shared_a"], a["shared_b"], a["task_a"], a["task_b"], a["task_cluster"],
        rt.order, rt.tile_task, rt.tile_start, rt.tile_end, rt.counts, rt.starts, rt.tile_rows, z,
        a["scaling"], a["per_token_gates"], dropout_p, seed, True, True, True, True, plan=bplan)
    return y, dict(zip(DIFF, grads, strict=True))


def run_reference(args, dy, base=None, mask=None, dropout_p=0.0):
    """float64 reference output (+ base) and gradients from the same rounded inputs."""
    r = {k: (v.detach().double().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    y = reference.cgc_lora(**r, dropout_p=dropout_p, dropout_mask=mask)
    y.backward(dy.double())
    if base is not None:
        y = y + base.double()
    return y.detach(), {k: r[k].grad if r[k].grad is not None else torch.zeros_like(r[k]) for k in DIFF}


def check(got, want, dtype, what):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOLERANCES[dtype],
                               msg=lambda m: f"{what}: {m}")


def _problem(case, dtype, device, with_base=True):
    args = make_inputs(case, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(case.M, case.d_out, generator=g).to(device=device, dtype=dtype)
    base = torch.randn(case.M, case.d_out, generator=g).to(device=device, dtype=dtype) if with_base else None
    return args, dy, base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case, tile_rows", CASES)
def test_grid_kernels_match_reference(case, tile_rows, plan, dtype, device):
    args, dy, base = _problem(case, dtype, device)
    rt = _routing(args, case.T, tile_rows)
    y, grads = run_grid(args, rt, dy, plan=plan, base=base, chunk=16)
    y_ref, grads_ref = run_reference(args, dy, base=base)
    assert y.dtype == dtype and y.shape == (case.M, case.d_out)
    check(y, y_ref, dtype, "base + delta")
    for k in DIFF:
        assert grads[k].dtype == args[k].dtype and grads[k].shape == args[k].shape, k
        check(grads[k], grads_ref[k], dtype, f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, tile_rows", [c for c in CASES if c.id in ("odd-d", "unrouted", "token-gates", "K0")])
def test_dz_from_dy(case, tile_rows, device):
    # The other way to dz (large ranks): the rows launch reads dy itself instead of the dB
    # launch's partials; same results.
    args, dy, base = _problem(case, torch.float32, device)
    y, grads = run_grid(args, _routing(args, case.T, tile_rows), dy, base=base, chunk=16, dz_parts=False)
    _, grads_ref = run_reference(args, dy, base=base)
    for k in DIFF:
        check(grads[k], grads_ref[k], torch.float32, f"grad {k}")


def _check_grid(case, dtype, device, plan, p=0.0, seed=0):
    """The grid against the reference: the output and every gradient. With dropout `p`, the
    reference gets the kernels' keep-mask, which they regenerate from `seed` in every launch."""
    args, dy, base = _problem(case, dtype, device)
    y, grads = run_grid(args, _routing(args, case.T, 16), dy, plan=plan, base=base, chunk=16,
                        dropout_p=p, seed=seed)
    mask = dropout.dropout_keep_mask(seed, case.M, case.d_in, p, device) if p else None
    y_ref, grads_ref = run_reference(args, dy, base=base, mask=mask, dropout_p=p)
    check(y, y_ref, dtype, "base + delta")
    for k in DIFF:
        check(grads[k], grads_ref[k], dtype, f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
def test_bf16_matches_reference(plan, device):
    # bf16 in, bf16 out; the interpreter casts dot operands to fp32 (its bf16 dot is wrong).
    case = Case(M=40, d_in=33, d_out=33, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted")
    _check_grid(case, torch.bfloat16, device, plan)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [16, 256], ids=["chunked", "one-chunk"])
def test_zipf_skew_chunks(chunk, device):
    # One heavy task cut into several 16-row chunks (task partials reduced in order), light tasks
    # in one chunk (written directly), shared partials summed per cluster over all of them.
    case = Case(M=120, d_in=33, d_out=17, T=5, S=2, K=1, r=4, C=2)
    args, dy, base = _problem(case, torch.float32, device)
    args["task_ids"] = zipf_ids(case.M, case.T).to(device)
    counts = torch.bincount(args["task_ids"].cpu(), minlength=case.T)
    assert counts.max() > 3 * 16 and counts.min() < 16  # the skew the test is about
    y, grads = run_grid(args, _routing(args, case.T, 16), dy, base=base, chunk=chunk)
    y_ref, grads_ref = run_reference(args, dy, base=base)
    check(y, y_ref, torch.float32, "base + delta")
    for k in DIFF:
        check(grads[k], grads_ref[k], torch.float32, f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
def test_delta_only_and_in_place(plan, device):
    # base=None writes the delta alone (task -1 rows: 0); out=base adds into base in place.
    case = Case(M=30, d_in=33, d_out=17, T=2, S=1, K=1, r=4, ids="with_unrouted")
    args, dy, base = _problem(case, torch.float32, device)
    rt = _routing(args, case.T, 16)
    a = args
    call = lambda **kw: forward.cgc_lora_forward(  # noqa: E731
        a["x"], a["gates"], a["shared_a"], a["shared_b"], a["task_a"], a["task_b"], a["task_cluster"],
        rt.order, rt.tile_task, rt.tile_start, rt.tile_end, rt.counts, rt.tile_rows,
        a["scaling"], False, 0.0, 0, plan=plan, **kw)
    want = reference.cgc_lora(**{k: (v.double() if k in DIFF else v) for k, v in args.items()})
    delta, _ = call(base=None)
    check(delta, want, torch.float32, "delta")
    target = base.clone()
    y, z = call(base=target, out=target, save_z=False)
    assert y is target and z is None
    check(target, base.double() + want, torch.float32, "in place")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
def test_dropout_matches_reference_with_same_mask(plan, device):
    case = Case(M=40, d_in=65, d_out=33, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted")
    _check_grid(case, torch.float32, device, plan, p=0.25, seed=1234)


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_rerun(device):
    # Same inputs, same routing -> bitwise the same output and gradients: no float atomics, every
    # partial (z parts, dgates, chunked dA / dB) summed in a fixed order.
    case = Case(M=150, d_in=65, d_out=33, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted")
    args, dy, base = _problem(case, torch.float16, device)
    rt = _routing(args, case.T, 16)
    for plan, dz_parts in zip(PLANS, (True, False), strict=True):
        y1, g1 = run_grid(args, rt, dy, plan=plan, base=base, chunk=16, dz_parts=dz_parts)
        y2, g2 = run_grid(args, rt, dy, plan=plan, base=base, chunk=16, dz_parts=dz_parts)
        assert torch.equal(y1, y2), plan
        for k in DIFF:
            assert torch.equal(g1[k], g2[k]), (plan, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, tile_rows", [
    # d_in = 520: four d_in parts of the shrink (multiples of BLOCK_K), the third partial, the last empty
    pytest.param(Case(M=20, d_in=520, d_out=130, T=3, S=2, K=1, r=8, C=2, ids="with_unrouted"), 64,
                 id="split-k"),
    # enough rows for the fused plan's two row parts per tile and a multi-chunk task
    pytest.param(Case(M=70, d_in=40, d_out=72, T=2, S=2, K=1, r=8), 64, id="row-parts"),
])
@pytest.mark.parametrize("plan", PLANS)
def test_gpu_block_configs(case, tile_rows, plan, device, monkeypatch):
    # CGC_KERNELS_GPU_CONFIGS=1: the interpreter runs the blocks a GPU gets (the tier of this rank),
    # with fp16 so the tensor-core tier is the one proven.
    monkeypatch.setattr(common, "GPU_CONFIGS_IN_INTERPRETER", True)
    assert not common.configs_pinned() or not common.INTERPRET
    args, dy, base = _problem(case, torch.float16, device)
    y, grads = run_grid(args, _routing(args, case.T, tile_rows), dy, plan=plan, base=base, chunk=32)
    y_ref, grads_ref = run_reference(args, dy, base=base)
    check(y, y_ref, torch.float16, "base + delta")
    for k in DIFF:
        check(grads[k], grads_ref[k], torch.float16, f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_with_gpu_block_configs(device, monkeypatch):
    # fp32's GPU tiers read the keep-bits in 16 x 16 tiles (two bytes per row, a column block
    # starting mid-row): the forward, dx and dA must still use the mask of dropout_keep_mask.
    monkeypatch.setattr(common, "GPU_CONFIGS_IN_INTERPRETER", True)
    case = Case(M=24, d_in=40, d_out=24, T=2, S=1, K=1, r=4, ids="with_unrouted")
    assert forward.forward_plan(case.M, case.T, case.d_in, case.d_out, 32, torch.float32, 4, 16).BLOCK_K == 16
    _check_grid(case, torch.float32, device, "fused", p=0.25, seed=99)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_op_base_is_functional_and_differentiable(backend, device):
    # cgc_lora(..., base=b) returns b + delta as a new tensor (b untouched), and the base's
    # producer (here W) gets its gradient through it, as with b + cgc_lora(...).
    from cgc_kernels.op.dispatch import cgc_lora

    case = Case(M=21, d_in=33, d_out=17, T=2, S=1, K=1, r=4, C=1, ids="with_unrouted")
    args = make_inputs(case, dtype=torch.float32, device=device)
    W0 = torch.randn(case.d_out, case.d_in, generator=torch.Generator().manual_seed(5)).to(device)
    got = []
    for use_base in (True, False):
        W = W0.clone().requires_grad_()
        a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
        b = a["x"] @ W.T
        if use_base:
            kept = b.detach().clone()
            y = cgc_lora(**a, base=b, backend=backend)
            assert y is not b and torch.equal(b.detach(), kept)
        else:
            y = b + reference.cgc_lora(**a)
        y.square().sum().backward()
        got.append([y.detach(), W.grad] + [a[k].grad for k in DIFF])
    for g1, g2, what in zip(*got, ["y", "W"] + list(DIFF), strict=True):
        check(g1, g2, torch.float32, what)
