"""A base that is slow to load (a GGUF file, dequantized on each load) is written once by `train`
as a plain folder in the run, and the commands after it load that folder: checked on the tiny
model with the GGUF rule switched on for it."""

import json

from cgc_kernels.cli import main
from cgc_kernels.cli import train as train_cmd
from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data.reader import read_jsonl
from cgc_kernels.multitask import models


def test_commands_after_train_load_the_runs_plain_base(tmp_path, monkeypatch):
    rows = read_jsonl(demo_data.data_dir() + "/" + demo_data.FILES[0])[::60]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"task": r["task"], "prompt": r["prompt"]} for r in rows[:4]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    monkeypatch.setattr(train_cmd, "needs_plain_copy", lambda spec: True)  # the tiny model as if a GGUF
    run = tmp_path / "run"
    assert main(["train", "--tiny", "--data", str(tmp_path / "train.jsonl"), "--out", str(run), "--steps", "1",
                 "--batch-size", "4", "--rank", "2", "--warmup-steps", "0"]) == 0
    meta = json.loads((run / "cgc_cli.json").read_text())
    assert meta["plain_base"] == "base" and meta["base_model"] == "tiny"
    assert (run / "base" / "config.json").is_file()

    loaded = []
    real = models.load_base
    monkeypatch.setattr(models, "load_base", lambda spec, *a, **k: loaded.append(spec) or real(spec, *a, **k))
    gen = ["generate", str(run), "--input", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "5"]
    assert main([*gen, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert loaded == [str(run / "base")]
    # The same answers as from the recorded base itself.
    assert main([*gen, "--output", str(tmp_path / "b.jsonl"), "--model", "tiny"]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    # export --peft needs no export-base first: the run's plain folder is the adapter's base.
    assert main(["export", str(run), "--task", rows[0]["task"], "--out", str(tmp_path / "peft")]) == 0
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(run / "base")


def test_hub_id_as_model_says_local_paths_only(tmp_path, capsys):
    assert main(["export-base", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "local paths only" in err and "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in err
