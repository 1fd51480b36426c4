"""Fused dropout: the kernels' seeded mask against the reference given that same mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from cgc_kernels import reference
from cgc_kernels.op.dispatch import cgc_lora
from cgc_kernels.op.triton.dropout import dropout_keep_mask, keep_bits, load_keep, new_seed
from tests.cases import DIFF, TOLERANCES, TRITON_DEVICES, Case, make_inputs

DEVICES = TRITON_DEVICES
P = 0.3


def _grads(fn, args, dy, **kw):
    a = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in args.items()}
    y = fn(**a, **kw)
    y.backward(dy)
    return y.detach(), {k: a[k].grad for k in DIFF}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [
        # unsorted ids with task -1 rows and clusters: the mask follows ORIGINAL row indices
        pytest.param(Case(M=40, d_in=65, d_out=17, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted"),
                     id="clusters-unrouted"),
        # per-token gates: dgates through the dropped input too
        pytest.param(Case(M=24, d_in=33, d_out=17, T=2, S=1, K=1, r=4, per_token_gates=True),
                     id="token-gates"),
    ],
)
def test_dropout_matches_reference_with_kernel_mask(case, device):
    args = make_inputs(case, dtype=torch.float32, device=device)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(5)).to(device)
    torch.manual_seed(1234)
    seed = new_seed(device)  # the seed the op will draw after the same manual_seed
    torch.manual_seed(1234)
    y, g = _grads(cgc_lora, args, dy, backend="triton", dropout_p=P)
    mask = dropout_keep_mask(seed, case.M, case.d_in, P, device)
    y_ref, g_ref = _grads(reference.cgc_lora, args, dy, dropout_p=P, dropout_mask=mask)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, **tol)
    for k in DIFF:  # the backward regenerated the same mask (dx is zero where dropped)
        torch.testing.assert_close(g[k], g_ref[k] if g_ref[k] is not None else torch.zeros_like(g[k]), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_properties(device):
    m1 = dropout_keep_mask(7, 64, 65, P, device)
    m2 = dropout_keep_mask(8, 64, 65, P, device)
    assert m1.dtype == torch.bool and m1.shape == (64, 65)
    assert torch.equal(m1, dropout_keep_mask(7, 64, 65, P, device))  # a function of the seed
    assert not torch.equal(m1, m2)  # and of nothing else
    keep = m1.float().mean().item()
    assert abs(keep - (1 - P)) < 0.05, keep  # 4160 draws: the keep rate is 0.7 within ~4 sigma
    assert dropout_keep_mask(7, 64, 65, 0.0, device).all()


@triton.jit
def _read_keep_tiles(mask_ptr, bits_ptr, stride_bits, M, d_in, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # What the matmul kernels do: read the keep-bits of a tile of original rows and columns.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < d_in
    keep = load_keep(bits_ptr, stride_bits, rows, row_ok, k0, BLOCK_K)
    tl.store(mask_ptr + rows[:, None] * d_in + cols[None, :], keep.to(tl.int8), mask=row_ok[:, None] & col_ok[None, :])


def _philox4x32_10(seed: int, c0: int, c1: int) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011) with counter (c0, c1, 0, 0) and key (seed lo, seed hi),
    written from the paper's constants: the independent check of the kernels' generator."""
    mask = 0xFFFFFFFF
    k0, k1, c2, c3 = seed & mask, (seed >> 32) & mask, 0, 0
    for _ in range(10):
        pa, pb = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((pb >> 32) ^ c1 ^ k0) & mask, pb & mask, ((pa >> 32) ^ c3 ^ k1) & mask, pa & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


@pytest.mark.parametrize("device", DEVICES)
def test_keep_mask_is_one_philox_call_per_8_elements(device):
    # Element (m, k) keeps when the 16 bits of lane k % 8 of Philox(seed, group m * cdiv(d_in, 8) +
    # k // 8) are >= p * 2^16: one generator call decides 8 elements, and a row's partial last group
    # (d_in = 21) starts the next row afresh. Recomputed here in plain Python.
    seed, M, d_in, p = 2**33 + 12345, 6, 21, 0.3
    groups = -(-d_in // 8)
    threshold = int(p * 65536 + 0.5)
    expect = torch.zeros(M, d_in, dtype=torch.bool)
    for m in range(M):
        for g in range(groups):
            words = _philox4x32_10(seed, m * groups + g, 0)
            for j in range(8):
                k = 8 * g + j
                if k < d_in:
                    expect[m, k] = ((words[j // 2] >> (16 * (j % 2))) & 0xFFFF) >= threshold
    got = dropout_keep_mask(seed, M, d_in, p, device).cpu()
    assert torch.equal(got, expect)
    # The packed form: bit j of byte (m, g) is element (m, 8 g + j).
    bits = keep_bits(seed, M, d_in, p, device).cpu()
    assert bits.dtype == torch.uint8 and bits.shape == (M, groups)
    for m, k in ((0, 0), (2, 9), (5, 20)):
        assert bool((int(bits[m, k // 8]) >> (k % 8)) & 1) == bool(expect[m, k])
    # Read back in tiles of 8 x 8 and of 16 x 16 columns (a tile ends mid-group at d_in = 21): the
    # same mask.
    for block in (8, 16):
        read = torch.empty(M, d_in, dtype=torch.int8, device=device)
        _read_keep_tiles[(triton.cdiv(M, block), triton.cdiv(d_in, block))](
            read, bits.to(device), bits.stride(0), M, d_in, BLOCK_M=block, BLOCK_K=block)
        assert torch.equal(read.bool().cpu(), expect), block
    # A function of (row, column) alone: fewer rows give the same leading rows.
    assert torch.equal(dropout_keep_mask(seed, 3, d_in, p, device).cpu(), expect[:3])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_differs_between_calls(device):
    # Each forward draws a new seed: two training steps do not share a mask.
    case = Case(M=16, d_in=33, d_out=17, T=2, S=1, K=1, r=4)
    args = make_inputs(case, dtype=torch.float32, device=device)
    y1 = cgc_lora(**args, backend="triton", dropout_p=P)
    y2 = cgc_lora(**args, backend="triton", dropout_p=P)
    assert not torch.equal(y1, y2)


def _rng_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", DEVICES)
def test_seed_lives_on_the_device_and_is_not_drawn_at_p0(device):
    # CUDA-graph safety: the seed is a [1] int64 tensor on x's device (saved for the backward, never
    # a CPU tensor), drawn from that device's generator, and not drawn at all without dropout.
    case = Case(M=16, d_in=33, d_out=17, T=2, S=1, K=1, r=4)
    args = make_inputs(case, dtype=torch.float32, device=device)
    args["x"] = args["x"].requires_grad_()
    for p in (0.0, P):
        saved: list[torch.Tensor] = []
        before = _rng_state(device)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = cgc_lora(**args, backend="triton", dropout_p=p)
        drew = not torch.equal(before, _rng_state(device))
        assert drew == (p > 0), f"dropout_p={p}: the generator {'was not' if p else 'was'} advanced"
        assert y.device.type == device
        assert all(t.device.type == device for t in saved), [t.device for t in saved]
        seeds = [t for t in saved if t.dtype == torch.int64 and t.shape == (1,)]
        assert len(seeds) == (1 if p > 0 else 0)
        with torch.no_grad():  # the in-place inference path draws no seed either at p = 0
            before = _rng_state(device)
            cgc_lora(**args, backend="triton", dropout_p=0.0, out=torch.zeros(case.M, case.d_out, device=device))
            assert torch.equal(before, _rng_state(device))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_masks_follow_the_generator(device):
    # A new mask on every call, and the same sequence of masks after the same manual_seed.
    case = Case(M=16, d_in=33, d_out=17, T=2, S=1, K=1, r=4)
    args = make_inputs(case, dtype=torch.float32, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([cgc_lora(**args, backend="triton", dropout_p=P) for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[0][1]) and not torch.equal(runs[0][1], runs[0][2])


def test_no_integer_argument_that_changes_per_call_is_specialized():
    # Triton specializes integer arguments (divisible by 16, equal to 1): a per-call integer would
    # compile a new variant every few calls. The seed is a pointer; the keep-mask kernel's M is
    # not specialized (the launchers' per-call integers: tests/op/test_launch_grids.py). Read from the
    # jitted kernels, so in a process without the interpreter.
    code = (
        "import json\n"
        "from cgc_kernels.op.triton import backward, dropout, forward\n"
        "ks = [forward._fwd_kernel, forward._shrink_kernel, backward._bwd_rows_kernel,\n"
        "      backward._bwd_weight_kernel, dropout._keep_bits_kernel]\n"
        "print(json.dumps({k.fn.__name__: [k.arg_names, [k.arg_names[i] if isinstance(i, int) else i\n"
        "                  for i in k.do_not_specialize]] for k in ks}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-2000:]
    kernels = json.loads(res.stdout.strip().splitlines()[-1])
    for name, (arg_names, unspecialized) in kernels.items():
        # the mask kernel reads the seed tensor, the matmul kernels its bits
        assert "seed" not in arg_names and ("seed_ptr" in arg_names) == (name == "_keep_bits_kernel"), name
        assert name == "_keep_bits_kernel" or "keep_ptr" in arg_names, name
        if "M" in arg_names:
            assert "M" in unspecialized, name
