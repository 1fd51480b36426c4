"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps end to end on CPU (interpreter, ci sizes),
so its plumbing (install resolution, order, time limits, outputs, summary) is proven on every commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert [s["key"] for s in steps] == ["install", "a", "b", "c", "d", "e"]
    assert all(s["status"] in ("pass", "skip") for s in steps), [(s["key"], s["status"], s["detail"]) for s in steps]
    # every step that can run on CPU did: the install resolved, the smoke and the benchmarks ran
    assert {s["key"] for s in steps if s["status"] == "pass"} >= {"install", "a", "b", "c"}
    assert sum(s["planned_s"] for s in steps) <= 7 * 60  # the GPU plan fits 7 minutes
    smoke = json.loads((out / "smoke.json").read_text())
    assert all(r["worst_ratio"] <= 1.0 for r in smoke["rows"]) and len(smoke["rows"]) == 2
    results = json.loads((out / "cgc-results-ci.json").read_text())
    assert results["results"] and results["environment"]["copy_bandwidth_bytes_per_s"] > 0
    assert (out / "ci.md").read_text().strip() and (out / "ci.png").exists()
    assert (out / "constraints.txt").read_text().count("torch==") == 1
    for key in ("install", "a", "b", "c", "e"):
        assert (out / f"{key}.log").exists(), key
    # the summary table is the last thing printed
    assert res.stdout.rstrip().splitlines()[-1].startswith("| e |")
