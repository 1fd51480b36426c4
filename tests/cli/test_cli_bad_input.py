"""Every user mistake the command can meet is one line on stderr and exit status 2, before any
work and without touching an existing output; `--help` shows every default; an option name means
the same thing in every subcommand."""

import argparse
import json
import os

import pytest
import torch

from cgc_kernels.adapter.config import CGCLoRAConfig
from cgc_kernels.adapter.model import CGCModel
from cgc_kernels.cli import build_parser, main
from cgc_kernels.cli.arguments import HelpFormatter
from cgc_kernels.cli.common import save_trained
from cgc_kernels.data.reader import UserError
from cgc_kernels.multitask.models import TINY_MODEL, tiny_model

ROW = {"task": "add", "prompt": "What is 1 + 2?", "response": "3"}


def _adapter_dir(path, gate):
    """A saved adapter with cgc_cli.json, as `cgc-lora train` writes it (untrained: enough here)."""
    base, tok = tiny_model()
    cgc = CGCModel(base, CGCLoRAConfig(tasks=["add", "plural"], rank=2, gate=gate, target_modules=["q_proj"]))
    save_trained(cgc, tok, str(path), TINY_MODEL, base, None, torch.float32, "test")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    (d / "data.jsonl").write_text("".join(json.dumps(dict(ROW, task=t)) + "\n" for t in ("add", "plural")))
    (d / "latin1.jsonl").write_bytes(json.dumps(ROW).encode() + b"\n" + '{"task": "add", "prompt": "caf\xe9", '
                                     '"response": "x"}\n'.encode("latin-1"))
    (d / "prompts.jsonl").write_text(json.dumps({"task": "add", "prompt": "1 + 1"}) + "\n")
    (d / "existing.txt").write_text("precious\n")
    (d / "existing-dir").mkdir()
    (d / "existing-dir" / "precious.txt").write_text(json.dumps(ROW) + "\n")  # valid rows: the output check refuses
    _adapter_dir(d / "run", "task")
    _adapter_dir(d / "token-run", "token")
    return d


TRAIN = ["train", "--tiny", "--data", "{d}/data.jsonl", "--out", "{d}/new"]
GENERATE = ["generate", "{d}/run", "--input", "{d}/prompts.jsonl"]
EXPORT = ["export", "{d}/run", "--task", "add"]
CLUSTER = ["cluster", "--tiny", "--data", "{d}/data.jsonl"]
COMPARE = ["compare", "--tiny", "--data", "{d}/data.jsonl", "--eval-data", "{d}/data.jsonl"]

CASES = [
    # -- numbers: argparse types reject them before any work
    (TRAIN + ["--steps", "-3"], "--steps: must be a positive integer"),  # once trained a full epoch
    (TRAIN + ["--steps", "0"], "--steps: must be a positive integer"),
    (TRAIN + ["--epochs", "0"], "--epochs: must be greater than 0"),  # once "adapter saved", untrained
    (TRAIN + ["--epochs", "nan"], "finite"),
    (TRAIN + ["--max-length", "0"], "--max-length: must be at least"),  # once exited 0 with loss 0
    (TRAIN + ["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (TRAIN + ["--lr", "-1"], "--lr: must be greater than 0"),
    (TRAIN + ["--lr", "fast"], "expected a number"),
    (TRAIN + ["--grad-accum", "0"], "--grad-accum: must be a positive integer"),  # ZeroDivisionError once
    (TRAIN + ["--warmup-steps", "-1"], "--warmup-steps: must be 0 or more"),
    (TRAIN + ["--save-steps", "0"], "--save-steps: must be a positive integer"),
    (TRAIN + ["--logging-steps", "0"], "--logging-steps"),
    (TRAIN + ["--rank", "0"], "--rank: must be a positive integer"),
    (TRAIN + ["--alpha", "0"], "--alpha: must be greater than 0"),
    (TRAIN + ["--dropout", "1"], "--dropout: must lie in [0, 1)"),
    (TRAIN + ["--shared-experts", "-1"], "--shared-experts: must be 0 or more"),
    (TRAIN + ["--seed", "-1"], "--seed: must be 0 or more"),
    (TRAIN + ["--shared-experts", "0", "--task-experts", "0"], "at least 1"),
    (GENERATE + ["--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
    (GENERATE + ["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (CLUSTER + ["--num-clusters", "0"], "--num-clusters: must be a positive integer"),
    (CLUSTER + ["--num-clusters", "3"], "must lie in [1, 2]"),
    (CLUSTER + ["--num-clusters", "2", "--batches", "0"], "--batches: must be a positive integer"),
    (COMPARE + ["--seeds", "a,b"], "--seeds: expected an integer"),
    (COMPARE + ["--steps", "0"], "--steps: must be a positive integer"),
    (["demo", "--tiny", "--steps", "0"], "--steps: must be a positive integer"),
    (["demo", "--tiny", "--eval-limit", "-1"], "--eval-limit: must be 0 or more"),
    # -- other values
    (TRAIN + ["--target-modules", "re:["], "not a valid regular expression"),
    (TRAIN + ["--target-modules", ","], "expected module names"),
    (TRAIN + ["--dtype", "float64"], "invalid choice"),
    (TRAIN + ["--max-length", "12"], "leaves no room for a response"),  # the chat template takes more
    (TRAIN + ["--resume", "{d}/nowhere"], "no such checkpoint directory"),
    (TRAIN + ["--clusters", "{d}/nowhere.json"], "no such clusters file"),
    (TRAIN + ["--target-modules", "no_such_proj"], "no_such_proj"),
    (["train", "--tiny", "--data", "{d}/latin1.jsonl", "--out", "{d}/new"], "latin1.jsonl:2: not UTF-8"),
    (["train", "--tiny", "--model", "{d}/run", "--data", "{d}/data.jsonl", "--out", "{d}/new"], "--tiny and --model"),
    (EXPORT + ["--task", "poetry", "--out", "{d}/new"], "unknown task 'poetry'"),
    (["export", "{d}/token-run", "--task", "add", "--out", "{d}/new"], "per-token gates"),
    (EXPORT + ["--out", "{d}/new"], "export-base"),  # --peft on a base PEFT cannot load by path
    (["export-base", "{d}/run", "--tiny", "--out", "{d}/new"], "not both"),
    (GENERATE + ["--model", "{d}/nowhere"], "no such model"),
    (["inspect", "{d}/nowhere"], "nowhere"),
    # -- outputs: never replaced without --overwrite, never an input
    (EXPORT + ["--out", "{d}/existing.txt"], "already exists (a file"),
    (EXPORT + ["--out", "{d}/existing-dir", "--merged"], "already exists (a directory"),
    (EXPORT + ["--out", "{d}/run", "--merged", "--overwrite"], "is the input"),  # once accepted
    (EXPORT + ["--out", "{d}/run/merged", "--merged", "--overwrite"], "lies inside the input"),
    (TRAIN[:-1] + ["{d}/existing-dir"], "pass --overwrite"),  # once replaced a 3-task run silently
    (["train", "--tiny", "--data", "{d}/existing-dir/precious.txt", "--out", "{d}/existing-dir", "--overwrite"],
     "holds the input"),
    (GENERATE + ["--output", "{d}/existing.txt"], "--output {d}/existing.txt already exists"),
    (GENERATE + ["--output", "{d}/prompts.jsonl", "--overwrite"], "is the input"),
    (CLUSTER + ["--num-clusters", "2", "--clusters-out", "{d}/existing.txt"], "--clusters-out"),
    (COMPARE + ["--out", "{d}/existing-dir"], "pass --overwrite"),
    (["demo", "--tiny", "--out", "{d}/existing-dir"], "pass --overwrite"),
    (["inspect", "{d}/run", "--out", "{d}/existing-dir"], "pass --overwrite"),
    (["inspect", "{d}/run", "--out", "{d}/run/gates", "--overwrite"], "lies inside the input"),
    (["export-base", "--tiny", "--out", "{d}/existing.txt"], "already exists"),
]
if not torch.cuda.is_available():
    CASES.append((TRAIN + ["--bf16"], "--bf16 (autocast) needs a CUDA device"))


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a[:1] + a[4:] if a[0] == "train" else a)[:70]
                                                     for a, _ in CASES])
def test_user_error_is_one_line(files, capsys, argv, needle):
    argv = [a.format(d=files) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cgc-lora: error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle.format(d=files) in err, err
    # Nothing written, nothing touched.
    assert not (files / "new").exists()
    assert (files / "existing.txt").read_text() == "precious\n"
    assert sorted(p.name for p in (files / "existing-dir").iterdir()) == ["precious.txt"]
    assert not [p for p in files.iterdir() if p.name.startswith(".")]


def test_debug_shows_the_traceback(files):
    with pytest.raises(UserError, match="already exists"):
        main(["export", str(files / "run"), "--task", "add", "--out", str(files / "existing.txt"), "--debug"])


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_shows_every_default(capsys):
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            shown = HelpFormatter(name)._get_help_string(action)
            if not (action.required or isinstance(action, argparse._StoreTrueAction) or action.default is None
                    or action.default is argparse.SUPPRESS):
                assert "default" in shown, f"{name} {action.option_strings[0]}: default not shown"
        assert main([name, "--help"]) == 0
    assert "(default: 64)" in capsys.readouterr().out  # demo --steps, as printed


def test_one_meaning_per_option_name():
    """The same option name takes the same kind of value everywhere (the type and, for flags, the
    action); `--clusters` is a file in every subcommand, the number of clusters `--num-clusters`."""
    kinds: dict[str, set] = {}
    for sub in _subparsers(build_parser()).values():
        for action in sub._actions:
            for opt in action.option_strings:
                kinds.setdefault(opt, set()).add((getattr(action.type, "__name__", None), type(action).__name__))
    mixed = {opt: k for opt, k in kinds.items() if len(k) > 1}
    assert not mixed, mixed
    assert kinds["--clusters"] == {(None, "_StoreAction")} and kinds["--num-clusters"] == {
        ("positive_int", "_StoreAction")}


def test_console_script_help_lists_every_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cgc_kernels.cli", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    for command in ("demo", "train", "export", "export-base", "generate", "inspect", "cluster", "compare", "bench"):
        assert command in proc.stdout


def test_every_subcommand_registers_the_same_way():
    """Each subcommand's module adds its parser with register(subparsers), and every handler is
    that module's cmd_* function."""
    from cgc_kernels import cli

    names = {}
    for module in cli.COMMANDS:
        action = argparse.ArgumentParser().add_subparsers()
        module.register(action)
        assert action.choices, module.__name__
        for name, sub in action.choices.items():
            func = sub.get_default("func")
            assert func.__name__.startswith("cmd_") and func.__module__ == module.__name__, (name, func)
            names[name] = func
    assert set(names) == set(_subparsers(build_parser()))
