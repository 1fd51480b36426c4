"""The quality scripts in benchmarks/quality/ run end to end on a tiny random Llama (so that the
full comparison later is one command), and what they report agrees with its definition."""

import importlib.util
import json
import os

import pytest

from cgc_kernels.data import suite_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", "quality", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gate_pilot_tiny(tmp_path):
    runs = _script("gate_pilot").main(["--tiny", "--steps", "3", "--ratios", "0,30", "--gates", "logits,moelora-model",
                                       "--batch-size", "8", "--warmup-steps", "0", "--lr", "1e-2",
                                       "--eval-limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path)])
    by = {(r["gate"], r["ratio"]): r for r in runs}
    assert set(by) == {("logits", 0.0), ("logits", 30.0), ("moelora-model", 0.0), ("moelora-model", 30.0)}
    for gate in ("logits", "moelora-model"):
        assert by[(gate, 0.0)]["largest_change"] == 0.0  # frozen gates
        assert by[(gate, 30.0)]["largest_change"] > 0.0
    # Free logits start at an even mixture (2 of 3 experts shared); MOELoRA's random gate does not.
    start = by[("logits", 30.0)]["movement"]["add"]
    assert start["start_min"] == pytest.approx(2 / 3) and start["start_max"] == pytest.approx(2 / 3)
    assert by[("moelora-model", 0.0)]["movement"]["add"]["start_min"] != pytest.approx(2 / 3)
    saved = json.loads((tmp_path / "pilot.json").read_text())
    assert len(saved["runs"]) == 4 and set(saved["runs"][0]["scores"]) == set(suite_tasks.TASKS)
    assert "| logits | 30 |" in (tmp_path / "pilot.md").read_text()


def test_run_quality_on_the_suite_tiny(tmp_path):
    result = _script("run_quality").main(["--suite", "--tiny", "--steps", "1", "--seeds", "0", "--eval-limit", "1",
                                          "--batch-size", "4", "--max-new-tokens", "2", "--rank", "8",
                                          "--gate-lr-ratio", "10", "--out", str(tmp_path)])
    assert result.tasks == list(suite_tasks.TASKS)
    text = (tmp_path / "compare.md").read_text()
    assert "By part" in text and "word_problem gain over per-task LoRA" in text and "Gate weight" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["gate_lr_ratio"] == 10 and saved["settings"]["data"] == "suite"
    for key, runs in saved["gates"].items():
        assert set(runs[0]) == set(suite_tasks.TASKS), key


def test_compare_command_on_the_suite_tiny(tmp_path):
    from cgc_kernels.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", "--tiny", "--suite", "--out", str(out), "--steps", "1", "--batch-size", "4",
               "--warmup-steps", "0", "--eval-limit", "1", "--max-new-tokens", "2", "--target-modules", "q_proj,v_proj",
               "--gate-lr-ratio", "5", "--gate-embedding-dim", "4", "--gate-init", "random"])
    assert rc == 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["tasks"] == list(suite_tasks.TASKS) and saved["settings"]["system"] == suite_tasks.SYSTEM
    assert saved["settings"]["gate_init"] == "random" and saved["settings"]["gate_lr_ratio"] == 5
    assert sum(saved["eval_counts"].values()) == len(suite_tasks.TASKS)
    assert "Gate weight" in (out / "compare.md").read_text()
    # User errors: one line and status 2, before any model loads.
    assert main(["compare", "--tiny", "--suite", "--data", "x.jsonl", "--out", str(out)]) == 2
    assert main(["compare", "--tiny", "--suite", "--gate-init", "random", "--out", str(out)]) == 2
