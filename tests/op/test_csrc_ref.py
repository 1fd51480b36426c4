"""The C++ reference (csrc_ref/) against the PyTorch reference: forward values, every gradient
against torch.autograd through the reference, the CUDA file compiled with nvcc for sm_80 / sm_90,
and the CUDA forward on a GPU when there is one.

The first run builds the extension (about 15 s on 2 cores); later runs load it from the cache.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from cgc_kernels import reference
from cgc_kernels.op import csrc_ref
from cgc_kernels.op.routing import build_routing
from tests.cases import DIFF, SMALL_CASES, TOLERANCES, Case, make_inputs
from tests.oracle import naive_cgc_lora

CLUSTERS_UNROUTED = Case(M=17, d_in=6, d_out=5, T=5, S=1, K=2, r=2, C=3, ids="with_unrouted")
CASES = [
    *SMALL_CASES,
    CLUSTERS_UNROUTED,  # clusters + task -1
    Case(M=0, d_in=4, d_out=3, T=2, S=1, K=1, r=2, per_token_gates=True),  # empty batch, [0, E] gates
    Case(M=40, d_in=24, d_out=16, T=4, S=2, K=1, r=4, C=2),  # more tokens than threads, all paths
]
DTYPES = [torch.float64, torch.float32]


def _case_id(case: Case) -> str:
    return (f"M{case.M}_T{case.T}_S{case.S}_K{case.K}_r{case.r}_C{case.C}_{case.ids}"
            + ("_tokgates" if case.per_token_gates else ""))


@pytest.fixture(scope="module", autouse=True)
def ext():
    """The compiled module; a missing compiler skips, a failing build fails."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on PATH")
    return csrc_ref.load()


def _autograd_grads(args, dy, **extra):
    """Gradients of <reference delta, dy> by torch.autograd, zeros where an input is unused."""
    leaves = {k: args[k].detach().clone().requires_grad_() for k in DIFF}
    reference.cgc_lora(**{**args, **leaves}, **extra).backward(dy)
    return {k: torch.zeros_like(args[k]) if leaves[k].grad is None else leaves[k].grad for k in DIFF}


def _assert_close(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(case, dtype):
    args = make_inputs(case, dtype=dtype, seed=1)
    _assert_close(csrc_ref.forward(**args), reference.cgc_lora(**args), dtype, "delta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_autograd(case, dtype):
    args = make_inputs(case, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(case.M, case.d_out, generator=g, dtype=torch.float64).to(dtype)
    expected = _autograd_grads(args, dy)
    grads = csrc_ref.backward(dy, **args)
    for name in DIFF:
        _assert_close(getattr(grads, name), expected[name], dtype, f"d{name}")


# CGC-LoRA, clusters, task -1 rows, per-token gates, and clusters with task -1 rows
@pytest.mark.parametrize("case", [*SMALL_CASES[3:7], CLUSTERS_UNROUTED], ids=_case_id)
def test_forward_matches_naive_oracle(case):
    # The loop oracle shares no code with either implementation.
    args = make_inputs(case, dtype=torch.float64, seed=4)
    expected = naive_cgc_lora(**args)
    _assert_close(csrc_ref.forward(**args), expected, torch.float64, "delta")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_keep_mask_forward_and_backward(dtype):
    case = Case(M=15, d_in=9, d_out=5, T=3, S=2, K=1, r=2, C=2, ids="with_unrouted")
    args = make_inputs(case, dtype=dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    drop = dict(dropout_p=0.25, dropout_mask=torch.rand(case.M, case.d_in, generator=g) >= 0.25)
    _assert_close(csrc_ref.forward(**args, **drop), reference.cgc_lora(**args, **drop), dtype, "delta")
    dy = torch.randn(case.M, case.d_out, generator=g, dtype=torch.float64).to(dtype)
    expected = _autograd_grads(args, dy, **drop)
    grads = csrc_ref.backward(dy, **args, **drop)
    for name in DIFF:
        _assert_close(getattr(grads, name), expected[name], dtype, f"d{name}")
    # dropped inputs get no gradient
    assert (grads.x[~drop["dropout_mask"]] == 0).all()


def test_accepts_a_routing_object():
    case = Case(M=12, d_in=6, d_out=5, T=3, S=1, K=1, r=2, C=2, ids="with_unrouted")
    args = make_inputs(case, seed=7)
    routed = {**args, "task_ids": build_routing(args["task_ids"], case.T, args["task_cluster"])}
    torch.testing.assert_close(csrc_ref.forward(**routed), csrc_ref.forward(**args), rtol=0, atol=0)


def test_results_do_not_depend_on_thread_count():
    case = Case(M=64, d_in=16, d_out=12, T=4, S=2, K=1, r=2, C=2, ids="with_unrouted")
    args = make_inputs(case, dtype=torch.float32, seed=8)
    dy = torch.randn(case.M, case.d_out, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append((csrc_ref.forward(**args), *csrc_ref.backward(dy, **args)))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(task_ids=torch.tensor([0, 3, 1, 0, 2, 1])), "task"),  # id >= T
        (dict(task_ids=torch.tensor([0, -2, 1, 0, 2, 1])), "task"),  # id < -1
        (dict(dropout_p=0.5), "dropout_mask"),  # dropout needs an explicit mask
        (dict(dropout_mask=torch.ones(5, 4, dtype=torch.bool)), "dropout_mask"),  # wrong shape
    ],
)
def test_bad_input_raises_value_error(change, match):
    args = make_inputs(Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2), seed=10)
    with pytest.raises(ValueError, match=match):
        csrc_ref.forward(**{**args, **change})


def test_half_precision_and_bad_dy_rejected():
    args = make_inputs(Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2), dtype=torch.float16, seed=11)
    with pytest.raises(ValueError, match="float32 or float64"):
        csrc_ref.forward(**args)
    args = make_inputs(Case(M=6, d_in=4, d_out=3, T=3, S=1, K=1, r=2), seed=11)
    with pytest.raises(ValueError, match="dy"):
        csrc_ref.backward(torch.zeros(6, 4, dtype=torch.float64), **args)


def test_missing_sources_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CGC_KERNELS_CSRC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="sources"):
        csrc_ref.source_dir()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_file_compiles_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    source = csrc_ref.source_dir() / "cgc_lora_ref.cu"
    obj = tmp_path / f"cgc_lora_ref_{arch}.o"
    proc = subprocess.run([nvcc, "-c", f"-arch={arch}", "-O2", "-Xptxas", "-v", str(source), "-o", str(obj)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert obj.stat().st_size > 0
    report = proc.stdout + proc.stderr
    assert f"for '{arch}'" in report  # ptxas compiled device code for this architecture
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert len(spills) == 2 and not any(spills), report  # float and double kernels, no spills


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_forward_matches_reference(case, dtype, ext):
    if not ext.has_cuda:
        pytest.fail("torch sees a GPU but the C++ reference was built without CUDA (nvcc / CUDA_HOME?)")
    args = make_inputs(case, dtype=dtype, seed=12, device="cuda")
    expected = reference.cgc_lora(**args)
    _assert_close(csrc_ref.forward(**args), expected, dtype, "delta")
    keep = torch.rand(case.M, case.d_in, device="cuda") >= 0.3
    drop = dict(dropout_p=0.3, dropout_mask=keep)
    expected = reference.cgc_lora(**args, **drop)
    _assert_close(csrc_ref.forward(**args, **drop), expected, dtype, "delta with dropout")
