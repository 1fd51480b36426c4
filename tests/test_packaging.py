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
