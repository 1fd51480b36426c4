"""The quality scripts in benchmarks/quality/ run end to end on a tiny random Llama (so that the
full comparison later is one command), and what they report agrees with its definition."""

import importlib.util
import json
import os

import pytest

from cgc_kernels.data import suite_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_run_quality_extra_cgc_rows_use_their_own_gate_settings(tmp_path):
    """--cgc-gate-lr-ratios 0 adds a CGC-LoRA row whose gates stay frozen while the others' (x30)
    move; --cgc-moelora-gate adds one with MOELoRA's model-wide random gate."""
    result = _script("run_quality").main(["--suite", "--tiny", "--steps", "3", "--seeds", "0", "--eval-limit", "1",
                                          "--batch-size", "8", "--max-new-tokens", "2", "--lr", "1e-2",
                                          "--gate-lr-ratio", "30", "--cgc-gate-lr-ratios", "0",
                                          "--out", str(tmp_path)])
    keys = [m.key for m in result.methods]
    assert keys.index("cgc_lora_gate_lr_0") == keys.index("cgc_lora") - 1
    moved = {k: max(g["max_change"] for g in result.gates[k][0].values()) for k in ("cgc_lora", "cgc_lora_gate_lr_0")}
    assert moved["cgc_lora_gate_lr_0"] == 0.0 and moved["cgc_lora"] > 0.0
    assert "CGC-LoRA (gate lr x0)" in (tmp_path / "compare.md").read_text()


def test_report_only_adds_mtl_lora_over_the_common_seeds(tmp_path):
    run_quality = _script("run_quality")
    run_quality.main(["--suite", "--tiny", "--steps", "1", "--seeds", "0,1", "--eval-limit", "1", "--batch-size", "4",
                      "--max-new-tokens", "2", "--out", str(tmp_path)])
    tasks = list(suite_tasks.TASKS)
    scores = [{t: 0.5 for t in tasks}, {t: (1.0 if t == "add" else 0.0) for t in tasks}]
    (tmp_path / "mtl_lora.json").write_text(json.dumps(dict(
        rank=7, n_up_projection=3, params=1234, seeds=[2, 1], scores=scores, losses=[[1.0], [0.5]],
        seconds=[1.0, 1.0])))
    result = run_quality.main(["--suite", "--report-only", "--out", str(tmp_path)])
    assert result.seeds == [1]  # the seeds both runs have
    assert result.mean_score("mtl_lora") == pytest.approx(1 / len(tasks))  # seed 1's scores: add alone
    assert all(len(v) == 1 for v in result.scores.values())
    text = (tmp_path / "compare.md").read_text()
    assert "| MTL-LoRA (adapters) | A r=7 + 3 B shared" in text and "1,234" in text
