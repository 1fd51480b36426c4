"""`cgc-lora generate` keeps what it wrote: answers appended per batch, an interrupted run's file
kept and completed by --resume without a repeated row, sampling options, progress on stderr."""

import json

import pytest

from cgc_kernels.cli import main
from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data.reader import read_jsonl
from cgc_kernels.multitask import recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for one step, and 10 prompts of mixed tasks."""
    d = tmp_path_factory.mktemp("gen")
    rows = read_jsonl(demo_data.data_dir() + "/" + demo_data.FILES[0])[::40]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "run"
    assert main(["train", "--tiny", "--data", str(d / "train.jsonl"), "--out", str(out), "--steps", "1",
                 "--batch-size", "4", "--rank", "2", "--warmup-steps", "0"]) == 0
    prompts = [{"task": r["task"], "prompt": r["prompt"], "id": i} for i, r in enumerate(rows[:10])]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return d, out


def _argv(d, out, res, *more):
    return ["generate", str(out), "--input", str(d / "prompts.jsonl"), "--output", str(res), "--batch-size", "3",
            "--max-new-tokens", "4", *more]


def test_interrupted_generate_keeps_its_answers_and_resume_completes_them(run, monkeypatch, capsys):
    d, out = run
    full = d / "full.jsonl"
    assert main(_argv(d, out, full)) == 0  # the uninterrupted run, to compare with
    want = full.read_text().splitlines()
    assert [json.loads(line)["id"] for line in want] == list(range(10))

    calls = []
    real = recipe.generate_answers

    def stop_on_third_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    res = d / "part.jsonl"
    monkeypatch.setattr(recipe, "generate_answers", stop_on_third_batch)
    capsys.readouterr()
    assert main(_argv(d, out, res)) == 130
    err = capsys.readouterr().err
    assert "6 of 10 answers are in" in err and "--resume" in err
    assert res.read_text().splitlines() == want[:6]  # two batches of 3, written as each finished
    monkeypatch.setattr(recipe, "generate_answers", real)

    # Without --resume the kept file is not replaced; a line cut off mid-write is dropped on resume.
    assert main(_argv(d, out, res)) == 2
    with open(res, "a", encoding="utf-8") as f:
        f.write(want[6][:20])
    calls.clear()
    monkeypatch.setattr(recipe, "generate_answers", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    assert main(_argv(d, out, res, "--resume")) == 0
    assert calls == [3, 1]  # rows 7-10 only
    assert res.read_text().splitlines() == want  # complete, no row twice, the same greedy answers
    calls.clear()
    assert main(_argv(d, out, res, "--resume")) == 0 and calls == []  # nothing left to answer
    # --resume FILE alone names the file too.
    assert main(["generate", str(out), "--input", str(d / "prompts.jsonl"), "--resume", str(res)]) == 0
    assert calls == [] and res.read_text().splitlines() == want


def test_resume_refuses_another_inputs_output(run, capsys):
    d, out = run
    other = d / "other.jsonl"
    other.write_text(json.dumps({"task": "add", "prompt": "not in the input", "output": "x"}) + "\n")
    assert main(_argv(d, out, other, "--resume")) == 2
    assert "does not answer row 1" in capsys.readouterr().err
    assert main(["generate", str(out), "--input", str(d / "prompts.jsonl"), "--resume"]) == 2
    assert "--resume needs the file an interrupted run wrote" in capsys.readouterr().err
    assert main(_argv(d, out, other, "--resume", str(d / "elsewhere.jsonl"))) == 2
    assert "name different files" in capsys.readouterr().err


def test_sampling_options_reach_generate(run, monkeypatch):
    d, out = run
    seen = []
    real = recipe.generate_answers
    monkeypatch.setattr(recipe, "generate_answers",
                        lambda *a, **k: seen.append((k["temperature"], k["top_p"])) or real(*a, **k))
    assert main(_argv(d, out, d / "sampled.jsonl", "--temperature", "0.7", "--top-p", "0.9")) == 0
    assert set(seen) == {(0.7, 0.9)}
    seen.clear()
    assert main(_argv(d, out, d / "greedy.jsonl")) == 0
    assert set(seen) == {(0.0, 1.0)}  # greedy by default
    assert main(_argv(d, out, d / "bad.jsonl", "--top-p", "0")) == 2
