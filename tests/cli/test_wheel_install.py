"""The package as a pip user installs it: the wheel built from this tree, installed into a fresh
venv after the pinned CPU torch (the README's steps), with nothing from the dev extras. It runs
`cgc-lora demo --tiny` and docs/api.md's Trainer example there, so a runtime dependency that the
dev extras pull in by chance (accelerate came through peft) cannot hide.

Slow by nature (a venv, torch and transformers unpacked from pip's cache): one test does it all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.project.test_docs import examples, line_matches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_PIN = "torch==2.13.0"  # the README's first install line and constraints.txt


def _run(cmd, **kwargs):
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kwargs)
    print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(map(str, cmd))[:100]}")  # shown with pytest -s
    assert run.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run


def _trainer_example() -> tuple[str, str]:
    found = [(code, out) for _, code, out in examples() if "CGCTrainer(" in code]
    assert found, "docs/api.md has no CGCTrainer example"
    return found[0]


def test_wheel_in_a_fresh_venv_runs_the_demo_and_the_trainer_example(tmp_path):
    pins = open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8").read()
    assert re.search(rf"^{re.escape(TORCH_PIN)}$", pins, re.M)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no pip in this interpreter")

    # PYTHONPATH unset and every command outside the clone: the installed package, not this tree.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    # Built from a copy of what the wheel declares, so the build leaves nothing in the clone.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "cgc_kernels"), src / "cgc_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(src)], env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("cgc_kernels-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    # The README's steps: the CPU torch pinned, then the wheel (one pip command here, so pip starts
    # once; the pin keeps the resolver on that torch either way). This interpreter's pip installs
    # into the venv (pip --python), so the venv needs no pip of its own.
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
    _run([*pip, TORCH_PIN, str(wheel)], env=env, cwd=tmp_path)
    frozen = _run([sys.executable, "-m", "pip", "--python", str(py), "freeze"], env=env, cwd=tmp_path).stdout.lower()
    names = {re.split(r"[=@ ]", line)[0].replace("_", "-") for line in frozen.splitlines()}
    assert "cgc-kernels" in names
    assert "peft" not in names  # the dev extra that brought accelerate along
    assert "triton" not in names  # an extra, not a requirement

    work = tmp_path / "work"
    work.mkdir()
    where = _run([py, "-c", "import cgc_kernels; print(cgc_kernels.__file__)"], cwd=work, env=env).stdout
    assert str(venv) in where

    demo = _run([bin_dir / "cgc-lora", "demo", "--tiny", "--steps", "2", "--eval-limit", "1"], cwd=work, env=env)
    assert "held-out exact match" in demo.stdout and "done in" in demo.stdout, demo.stdout
    for name in ("adapter", "base", "peft", "results.json"):
        assert (work / "cgc-lora-demo" / name).exists(), name

    code, expected = _trainer_example()
    run = _run([py, "-c", code], cwd=work, env=env)
    want, got = expected.strip("\n").splitlines(), run.stdout.strip("\n").splitlines()
    assert len(got) == len(want), run.stdout
    for w, g in zip(want, got, strict=True):
        assert line_matches(w, g), (w, g)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"pip install {TORCH_PIN}" in readme, "the README no longer installs the torch this test pins"
