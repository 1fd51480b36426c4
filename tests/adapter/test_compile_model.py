"""CGCModel under torch.compile: training steps equal to eager with every decoder layer compiled
fullgraph (no graph break inside a transformer block), under aot_eager and inductor, and inductor
again in a second fresh process that finds the first one's cache warm (TORCHINDUCTOR_CACHE_DIR)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests import compile_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "compile_worker.py")
TOL = dict(atol=1e-5, rtol=1e-5)


def _check(report: dict) -> None:
    torch.testing.assert_close(torch.tensor(report["compiled"]), torch.tensor(report["eager"]), **TOL)
    assert report["max_param_diff"] < 1e-5, report


def test_model_trains_under_aot_eager_like_eager():
    eager = compile_worker.build()
    compiled = compile_worker.build()
    for block in compiled.model.model.layers:
        block.compile(backend="aot_eager", fullgraph=True)
    want, got = compile_worker.train(eager), compile_worker.train(compiled)
    params = dict(eager.named_parameters())
    diff = max((p - params[n]).abs().max().item() for n, p in compiled.named_parameters() if p.requires_grad)
    _check({"eager": want, "compiled": got, "max_param_diff": diff})


def test_model_trains_under_inductor_fresh_and_warm_cache(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TRITON_INTERPRET="0")
    for run in ("fresh cache", "warm cache"):
        proc = subprocess.run([sys.executable, WORKER, "--backend", "inductor"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{run}: {proc.stderr[-3000:]}"
        _check(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert any((tmp_path / "inductor").iterdir())  # the second run had a cache to find
