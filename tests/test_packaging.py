"""The package metadata tells the truth: the transformers floor is the version the tests run
against, the plotting library the commands use is a runtime dependency, the license is there."""

import os
import re
from importlib.metadata import version

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _floor(name: str) -> str:
    req = next(r for r in _project()["dependencies"] if re.match(rf"{name}\b", r))
    return req.split(">=")[1].split(";")[0].strip()


def _release(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def test_transformers_floor_is_the_tested_version():
    floor, installed = _floor("transformers"), version("transformers")
    pins = open(os.path.join(ROOT, "constraints.txt")).read()
    assert re.search(rf"^transformers=={re.escape(installed)}$", pins, re.M), "constraints.txt pins another version"
    assert _release(installed)[: len(_release(floor))] == _release(floor), (floor, installed)


def test_runtime_dependencies_and_metadata():
    project = _project()
    names = {re.split(r"[<>=; ]", r)[0] for r in project["dependencies"]}
    assert "matplotlib" in names  # inspect --out and compare draw PNGs in a plain install
    assert project["keywords"] and any(c.startswith("Topic ::") for c in project["classifiers"])
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert project["license"] == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text


def test_accelerate_required_triton_an_extra():
    """accelerate loads GGUF bases and runs transformers.Trainer: a plain install needs it. Triton
    is an extra: torch's CUDA builds bring their own, and the CPU path does not use it."""
    project = _project()
    names = {re.split(r"[<>=; \[]", r)[0] for r in project["dependencies"]}
    assert "accelerate" in names and "triton" not in names
    extras = project["optional-dependencies"]
    assert any(r.startswith("triton") for r in extras["triton"])
    assert any(r.startswith("triton") for r in extras["dev"])


def test_triton_backend_without_triton_names_the_extra(monkeypatch):
    import torch

    from cgc_kernels.op import dispatch

    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    M, d, T, S, K, r = 8, 16, 2, 1, 1, 4
    x = torch.randn(M, d)
    args = (x, torch.arange(M) % T, torch.full((T, S + K), 0.5), torch.randn(1, S * r, d), torch.randn(1, d, S * r),
            torch.randn(T, K * r, d), torch.randn(T, d, K * r), 2.0)
    with pytest.raises(ValueError, match=r"pip install 'cgc_kernels\[triton\]'"):
        dispatch.cgc_lora(*args, backend="triton")
    assert dispatch.resolve_backend(x, None) == "torch"
    assert dispatch.cgc_lora(*args, backend="torch").shape == (M, d)  # the CPU path needs no Triton
