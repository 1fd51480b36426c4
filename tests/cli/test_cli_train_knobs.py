"""`cgc-lora train`'s knobs on a tiny random Llama: --resume from a run folder, its checkpoints/ or
an interrupted folder (the latest checkpoint, --steps beyond it trains on), the setting that differs
named on a mismatch, --max-length against the model's context, all-linear, eval loss per task,
--report-to, and the eval file's own row number in an error."""

import json
import shutil

import pytest
import torch

from cgc_kernels.cli import main
from cgc_kernels.cli.train import latest_checkpoint
from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data.reader import read_jsonl

SMALL = ["--tiny", "--batch-size", "4", "--rank", "2", "--warmup-steps", "0", "--logging-steps", "1"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("knobs")
    train = _write(d / "train.jsonl", read_jsonl(demo_data.data_dir() + "/" + demo_data.FILES[0])[::40])
    held = _write(d / "eval.jsonl", read_jsonl(demo_data.data_dir() + "/" + demo_data.FILES[1])[::50])
    return d, train, held


@pytest.fixture(scope="module")
def first(data):
    """A 4-step run with checkpoints at steps 2 and 4."""
    d, train, _ = data
    out = d / "first"
    assert main(["train", *SMALL, "--data", train, "--out", str(out), "--steps", "4", "--save-steps", "2"]) == 0
    return out


def _step(run) -> int:
    ckpts = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((ckpts[-1] / "trainer_state.json").read_text())["global_step"]


@pytest.mark.parametrize("where", ["run", "checkpoints", "interrupted", "checkpoint"])
def test_resume_takes_the_latest_checkpoint_and_trains_on(data, first, where, tmp_path, capsys):
    d, train, _ = data
    source = {"run": first, "checkpoints": first / "checkpoints", "checkpoint": first / "checkpoints" / "checkpoint-4"}
    if where == "interrupted":  # what a failed run leaves beside its --out (cli/output.py)
        source["interrupted"] = tmp_path / "out.interrupted-x1y2"
        shutil.copytree(first / "checkpoints", source["interrupted"] / "checkpoints")
    assert latest_checkpoint(str(source[where])).endswith("checkpoint-4")
    capsys.readouterr()
    out = tmp_path / "resumed"
    assert main(["train", *SMALL, "--data", train, "--out", str(out), "--steps", "6", "--save-steps", "2",
                 "--resume", str(source[where])]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "checkpoint-4" in printed and "(6 steps)" in printed
    assert _step(out) == 6
    history = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps[-2:] == [5, 6] and 4 in steps  # the first run's log, then steps 5 and 6


def test_resume_refusals_name_what_differs(data, first, capsys):
    d, train, _ = data
    base = ["train", *SMALL, "--data", train, "--out", str(d / "never"), "--resume", str(first)]
    cases = [(["--steps", "4"], "is at step 4: --steps 4 trains nothing more"),
             (["--steps", "6", "--rank", "3"], "was trained with --rank 2, this run has 3"),
             (["--steps", "6", "--task-experts", "2"], "was trained with --task-experts 1, this run has 2")]
    for extra, message in cases:
        capsys.readouterr()
        assert main(base + extra) == 2, extra  # a repeated option: argparse keeps the last
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", *SMALL, "--data", train, "--out", str(d / "never"), "--resume", str(d)]) == 2
    assert "no checkpoint-N folder" in capsys.readouterr().err


def test_max_length_beyond_the_context_is_one_line(data, capsys):
    d, train, _ = data
    assert main(["train", *SMALL, "--data", train, "--out", str(d / "long"), "--max-length", "1000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cgc-lora: error: --max-length 1000000 exceeds the model's context of 512 tokens " \
                  "(max_position_embeddings)"
    assert not (d / "long").exists()


def test_all_linear_targets_every_linear_but_the_head(data, tmp_path):
    from cgc_kernels.adapter.model import CGCModel
    from cgc_kernels.multitask.models import tiny_model

    d, train, _ = data
    out = tmp_path / "all"
    assert main(["train", *SMALL, "--data", train, "--out", str(out), "--steps", "1", "--target-modules",
                 "all-linear"]) == 0
    base, _ = tiny_model()
    want = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    cgc = CGCModel.from_pretrained(base, str(out))
    assert set(cgc.adapted_layers()) == want


def test_eval_loss_per_task(data, tmp_path):
    from cgc_kernels.adapter.collator import CGCDataCollator
    from cgc_kernels.adapter.model import CGCModel
    from cgc_kernels.multitask.models import tiny_model
    from cgc_kernels.multitask.recipe import encode_for_trainer

    d, train, held = data
    out = tmp_path / "evals"
    assert main(["train", *SMALL, "--data", train, "--eval-data", held, "--out", str(out), "--steps", "2",
                 "--eval-steps", "2", "--save-steps", "2"]) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    evals = {k[len("eval_"):-len("_loss")]: v for h in state["log_history"] for k, v in h.items()
             if k.startswith("eval_") and k.endswith("_loss")}
    rows = read_jsonl(held)
    tasks = json.loads((out / "cgc_cli.json").read_text())["tasks"]
    assert set(evals) == set(tasks)
    # The logged loss of one task, recomputed from the saved adapter on that task's rows alone.
    base, tok = tiny_model()
    cgc = CGCModel.from_pretrained(base, str(out)).eval()
    task = tasks[0]
    examples = encode_for_trainer(tok, [r for r in rows if r["task"] == task], tasks, None, 256)
    batch = CGCDataCollator(tok.pad_token_id, tasks=tasks, response_only=True)(examples)
    with torch.no_grad():
        loss = cgc(**batch).loss.item()
    assert evals[task] == pytest.approx(loss, rel=1e-4)


def test_report_to_and_eval_steps_checked(data, capsys):
    d, train, held = data
    assert main(["train", *SMALL, "--data", train, "--out", str(d / "x"), "--eval-steps", "2"]) == 2
    assert "--eval-steps needs --eval-data" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed: the refusal below needs it missing")
    assert main(["train", *SMALL, "--data", train, "--out", str(d / "x"), "--steps", "1", "--report-to",
                 "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cgc-lora: error: --report-to tensorboard:") and len(err.splitlines()) == 1


def test_eval_data_error_names_the_files_row(data, tmp_path, capsys):
    d, train, held = data
    rows = read_jsonl(demo_data.data_dir() + "/" + demo_data.FILES[1])[:12]
    rows.append({"task": "poetry", "prompt": "p", "response": "r"})
    bad = _write(tmp_path / "bad.jsonl", rows)
    assert main(["train", *SMALL, "--data", train, "--eval-data", bad, "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:13: task 'poetry' is not one of the tasks trained" in capsys.readouterr().err
