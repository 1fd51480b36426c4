"""The package metadata tells the truth: each dependency's floor (and Python's) is the oldest
version the test command runs (in .venv, .venv-gpu-twin or .venv-triton36), the plotting library the
commands use is a runtime dependency, the license is there."""

import glob
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, distributions, version

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _floor(name: str) -> str:
    """The floor of `name` in the runtime dependencies, or else in the extra of that name (triton)."""
    project = _project()
    reqs = [*project["dependencies"], *project["optional-dependencies"].get(name, [])]
    req = next(r for r in reqs if re.match(rf"{name}\b", r))
    return req.split(">=")[1].split(";")[0].strip()


def _release(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


# The environments scripts/setup builds and scripts/test runs the tests in. .venv-triton36 has its
# own triton and numpy and borrows everything else from .venv-gpu-twin (a .pth file).
ENVS = {".venv": [".venv"], ".venv-gpu-twin": [".venv-gpu-twin"],
        ".venv-triton36": [".venv-triton36", ".venv-gpu-twin"]}


def _site_packages(venv: str) -> list[str]:
    return glob.glob(os.path.join(ROOT, venv, "lib", "python3*", "site-packages"))


def _tested_versions(name: str) -> dict[str, str]:
    """{environment: installed version of `name`} over the test command's environments that exist
    here (its own site-packages first, as the .pth borrowing orders them), plus this interpreter's."""
    found = {}
    for env, chain in ENVS.items():
        for venv in chain:
            dists = [d for d in distributions(path=_site_packages(venv)) if _norm(d.metadata["Name"]) == _norm(name)]
            if dists:
                found[env] = dists[0].version
                break
    try:
        found["this interpreter"] = version(name)
    except PackageNotFoundError:
        pass
    return found


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", (name or "").lower())


def _python_versions() -> dict[str, str]:
    found = {"this interpreter": ".".join(map(str, sys.version_info[:3]))}
    for env in ENVS:
        cfg = os.path.join(ROOT, env, "pyvenv.cfg")
        if os.path.exists(cfg):
            m = re.search(r"^version(?:_info)?\s*=\s*(\S+)", open(cfg).read(), re.M)
            if m:
                found[env] = m.group(1)
    return found


def _check_floor(floor: str, tested: dict[str, str]) -> None:
    """The floor admits every tested version, and the oldest one is the floor's release."""
    assert tested, "no tested environment has it"
    n = len(_release(floor))
    oldest = min(tested.values(), key=_release)
    assert all(_release(v)[:n] >= _release(floor) for v in tested.values()), (floor, tested)
    assert _release(oldest)[:n] == _release(floor), f"floor {floor}, oldest tested {oldest}: {tested}"


@pytest.mark.parametrize("name", ["torch", "triton", "transformers", "accelerate", "numpy", "safetensors", "tqdm",
                                  "scipy", "matplotlib", "datasets"])
def test_dependency_floor_is_the_oldest_tested_version(name):
    _check_floor(_floor(name), _tested_versions(name))


def test_python_floor_is_the_oldest_tested_python():
    floor = _project()["requires-python"].split(">=")[1].split(",")[0].strip()
    _check_floor(floor, _python_versions())
    classifiers = {c.split(":: ")[-1] for c in _project()["classifiers"]
                   if c.startswith("Programming Language :: Python :: 3.")}
    assert min(classifiers, key=_release) == floor  # no classifier claims an untested Python


def test_transformers_floor_is_the_gpu_image_version():
    """The GPU machines' image has transformers 5.17 (its twin, .venv-gpu-twin, pins it): the floor admits it."""
    pins = open(os.path.join(ROOT, "constraints-gpu-twin.txt")).read()
    for name in ("torch", "triton", "transformers", "numpy"):
        pinned = re.search(rf"^{name}==(\S+)$", pins, re.M).group(1)
        assert _release(pinned) >= _release(_floor(name)), (name, pinned)


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
