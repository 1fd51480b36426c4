"""The `cgc-lora` command end to end on a tiny random Llama: train -> export -> generate, the
exports checked against the unified model (PEFT loading the adapter, the merged model), and each
user mistake ending in one line on stderr with exit status 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cgc_kernels.adapter.model import CGCModel
from cgc_kernels.cli import main
from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data.reader import read_jsonl
from cgc_kernels.multitask.models import char_tokenizer, tiny_model
from cgc_kernels.multitask.recipe import left_pad, prompt_text

CLUSTERS = {"add": "reasoning", "plural": "reasoning", "sentiment": "language", "capital": "language"}


def _subset(src: str, dst: str, every: int) -> str:
    rows = read_jsonl(src)[::every]
    with open(dst, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for a few steps on a slice of the demo data, 1+N with two clusters."""
    d = tmp_path_factory.mktemp("cli")
    data = demo_data.data_dir()
    train = _subset(os.path.join(data, demo_data.FILES[0]), str(d / "train.jsonl"), 20)
    held = _subset(os.path.join(data, demo_data.FILES[1]), str(d / "eval.jsonl"), 25)
    clusters = d / "clusters.json"
    clusters.write_text(json.dumps(CLUSTERS))
    out = d / "run"
    rc = main(["train", "--tiny", "--data", train, "--eval-data", held, "--out", str(out), "--clusters",
               str(clusters), "--steps", "3", "--batch-size", "8", "--lr", "5e-2", "--warmup-steps", "0",
               "--save-steps", "2", "--rank", "4"])
    assert rc == 0
    # The base as a plain folder, which PEFT exports name as their base.
    assert main(["export-base", str(out), "--out", str(d / "base")]) == 0
    return d, out


def _unified(out):
    base, _ = tiny_model()
    return CGCModel.from_pretrained(base, str(out)).eval()


def _batch(tokenizer, prompts):
    ids, mask, pos = left_pad([tokenizer(prompt_text(tokenizer, p, None), add_special_tokens=False).input_ids
                               for p in prompts], tokenizer.pad_token_id)
    return ids, mask


def _greedy_answer(cgc, tok, row: dict, max_new_tokens: int) -> str:
    """The unified model's greedy answer to one {task, prompt} row, with that task alone."""
    ids, mask = _batch(tok, [row["prompt"]])
    gen = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=[row["task"]], max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out = gen[0, ids.shape[1]:].tolist()
    out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    return tok.decode(out, skip_special_tokens=True).strip()


def test_train_writes_adapter_and_checkpoints(run):
    _, out = run
    for name in ("cgc_config.json", "cgc_adapter.safetensors", "cgc_cli.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "checkpoint-2" / "cgc_adapter.safetensors").is_file()
    cfg = json.loads((out / "cgc_config.json").read_text())
    assert sorted(cfg["tasks"]) == sorted(CLUSTERS) and cfg["clusters"] == CLUSTERS
    # Training moved the adapter: the task experts' B (zero at start) is no longer zero.
    cgc = _unified(out)
    assert any(float(layer.task_b.detach().abs().max()) > 0 for layer in cgc.adapted_layers().values())


@pytest.mark.parametrize("task", ["add", "capital"])  # one task of each cluster
def test_peft_export_matches_unified_model(run, task):
    from peft import AutoPeftModelForCausalLM, PeftModel

    d, out = run
    peft_dir, exact_dir = d / f"peft-{task}", d / f"peft-{task}-exact"
    assert main(["export", str(out), "--task", task, "--out", str(peft_dir), "--peft", "--model", str(d / "base")]) == 0
    assert main(["export", str(out), "--task", task, "--out", str(exact_dir), "--model", str(d / "base"),
                 "--no-pad-rank"]) == 0
    # (S+K)*r = 3*4 = 12 is not a rank vLLM serves: padded to 16 by default, kept with --no-pad-rank.
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and json.loads((exact_dir / "adapter_config.json").read_text())["r"] == 12
    assert config["base_model_name_or_path"] == str(d / "base")
    tok = char_tokenizer()
    ids, mask = _batch(tok, ["What is 12 + 30?", "Tell me the capital of Peru."])
    cgc = _unified(out)
    with torch.no_grad():
        want = cgc(input_ids=ids, attention_mask=mask, task_ids=[task, task]).logits
        peft_model = PeftModel.from_pretrained(tiny_model()[0], str(peft_dir)).eval()
        got = peft_model(input_ids=ids, attention_mask=mask).logits
        exact = PeftModel.from_pretrained(tiny_model()[0], str(exact_dir)).eval()(input_ids=ids, attention_mask=mask)
        # The adapter alone names a loadable base: no base model needed by hand.
        auto = AutoPeftModelForCausalLM.from_pretrained(str(peft_dir)).eval()(input_ids=ids, attention_mask=mask)
        plain = tiny_model()[0](input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Zero rows of A and zero columns of B add exact zeros: the same function as the unpadded adapter.
    torch.testing.assert_close(got, exact.logits, rtol=1e-6, atol=1e-7)
    real = mask.bool()  # padded positions differ with the attention implementation (SDPA vs eager)
    torch.testing.assert_close(auto.logits[real], got[real], rtol=1e-5, atol=1e-6)
    assert (want - plain).abs().max() > 1e-4  # the adapter does change the model


def test_merged_export_matches_unified_model(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, out = run
    merged_dir = d / "merged-sentiment"
    # Over an earlier PEFT export of the same folder: --overwrite replaces it as a whole, so no
    # adapter_config.json is left to make transformers load the folder as a PEFT adapter.
    assert main(["export", str(out), "--task", "sentiment", "--out", str(merged_dir), "--model", str(d / "base")]) == 0
    assert main(["export", str(out), "--task", "sentiment", "--out", str(merged_dir), "--merged"]) == 2
    assert main(["export", str(out), "--task", "sentiment", "--out", str(merged_dir), "--merged", "--overwrite"]) == 0
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids, mask = _batch(tok, ["Review: The movie was great. Is the sentiment positive or negative?"])
    with torch.no_grad():
        want = _unified(out)(input_ids=ids, attention_mask=mask, task_ids=["sentiment"]).logits
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dtype_is_recorded_and_exports_keep_the_stored_dtype(run, tmp_path):
    """A run whose base ran in bfloat16 (--dtype) records that and why; its merged export is in the
    base's stored float32, as the base on disk is."""
    from safetensors import safe_open

    d, out = run
    meta = json.loads((out / "cgc_cli.json").read_text())
    assert meta["dtype"] == "float32" and meta["dtype_reason"].startswith("auto: float32 for the tiny model")
    bf16_run = tmp_path / "bf16-run"
    assert main(["train", "--model", str(d / "base"), "--dtype", "bfloat16", "--data", str(d / "train.jsonl"),
                 "--out", str(bf16_run), "--steps", "1", "--batch-size", "4", "--rank", "2", "--warmup-steps", "0",
                 "--target-modules", "q_proj"]) == 0
    meta = json.loads((bf16_run / "cgc_cli.json").read_text())
    recorded = (meta["dtype"], meta["dtype_reason"], meta["base_model"])
    assert recorded == ("bfloat16", "--dtype bfloat16", str(d / "base"))
    assert main(["export", str(bf16_run), "--task", "add", "--out", str(tmp_path / "merged"), "--merged"]) == 0
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    # A model folder given as the base is the PEFT export's base, without export-base.
    assert main(["export", str(bf16_run), "--task", "add", "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        d / "base")


def test_auto_dtype_follows_capabilities_only(monkeypatch):
    from cgc_kernels.multitask import models

    if torch.cuda.is_available():
        pytest.skip("the CPU rule")
    first = models.auto_dtype()
    assert all(models.auto_dtype() == first for _ in range(3))  # no timing: the same answer every time
    for caps, want in [({"avx512_bf16": True}, torch.bfloat16), ({"amx_bf16": True}, torch.bfloat16),
                       ({"avx512_bf16": False, "amx_bf16": False}, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert models.auto_dtype()[0] == want and models.pick_dtype("auto") == want


def test_generate_mixed_tasks(run):
    d, out = run
    asks = [("add", "What is 3 + 4?"), ("plural", "Give the plural of: fox"),
            ("capital", "What is the capital of Chile?"), ("add", "Add 5 and 6.")]
    rows = [{"task": t, "prompt": p} for t, p in asks]
    inp = d / "prompts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = d / "answers.jsonl"
    argv = ["generate", str(out), "--input", str(inp), "--output", str(res), "--max-new-tokens", "6"]
    assert main(argv) == 0
    answers = [json.loads(line) for line in res.read_text().splitlines()]
    assert [(a["task"], a["prompt"]) for a in answers] == [(r["task"], r["prompt"]) for r in rows]
    # Each answer equals that row's greedy answer from the unified model with its task alone.
    cgc, tok = _unified(out), char_tokenizer()
    for r, a in zip(rows, answers, strict=True):
        assert a["output"] == _greedy_answer(cgc, tok, r, 6)


def test_generate_runs_the_base_in_the_dtype_asked(run, capsys):
    # --dtype bfloat16 on a float32 run: the answers of the unified model whose base runs in bfloat16.
    d, out = run
    rows = [{"task": "add", "prompt": "What is 3 + 4?"}, {"task": "plural", "prompt": "Give the plural of: fox"}]
    inp = d / "prompts_bf16.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = d / "answers_bf16.jsonl"
    capsys.readouterr()
    assert main(["generate", str(out), "--input", str(inp), "--output", str(res), "--max-new-tokens", "6",
                 "--dtype", "bfloat16"]) == 0
    assert "base model in bfloat16 (--dtype)" in capsys.readouterr().err
    base, _ = tiny_model()
    cgc, tok = CGCModel.from_pretrained(base.to(torch.bfloat16), str(out)).eval(), char_tokenizer()
    for r, a in zip(rows, [json.loads(line) for line in res.read_text().splitlines()], strict=True):
        assert a["output"] == _greedy_answer(cgc, tok, r, 6)


def test_demo_on_tiny_model(tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    demo = tmp_path / "demo"
    argv = ["demo", "--tiny", "--out", str(demo), "--steps", "2", "--eval-limit", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for task in demo_data.TASKS:
        assert f"[{task}]" in printed  # one answer per task from the mixed batch
        config = json.loads((demo / "peft" / task / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(demo / "base") and config["r"] == 32  # 3 x 8 -> 32
    assert (demo / "merged-add" / "config.json").is_file()
    assert (demo / "adapter" / "cgc_cli.json").is_file()
    results = json.loads((demo / "results.json").read_text())
    assert set(results["after"]) == set(demo_data.TASKS) and len(results["losses"]) == 2
    # The exported adapter loads by itself onto base/ and answers as the unified model does.
    tok = char_tokenizer()
    ids, mask = _batch(tok, ["What is 12 + 30?"])
    with torch.no_grad():
        base = _load_plain(demo / "base")
        want = CGCModel.from_pretrained(base, str(demo / "adapter")).eval()(
            input_ids=ids, attention_mask=mask, task_ids=["add"]).logits
        got = AutoPeftModelForCausalLM.from_pretrained(str(demo / "peft" / "add")).eval()(
            input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
    # Run twice in a row, as the README's command is: refused with a hint, then replaced on request.
    stamp = (demo / "results.json").stat().st_mtime_ns
    _one_line_error(capsys, argv, "already exists", "--overwrite")
    assert (demo / "results.json").stat().st_mtime_ns == stamp
    (demo / "stale.txt").write_text("from an older run")
    assert main([*argv, "--overwrite"]) == 0
    assert not (demo / "stale.txt").exists() and (demo / "base" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def _load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


# ---- user mistakes -----------------------------------------------------------------------------
def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()  # drop what the test itself printed
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cgc-lora: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_missing_data_file(tmp_path, capsys):
    argv = ["train", "--tiny", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]
    _one_line_error(capsys, argv, "no such file", "nope.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"task": "add", "prompt": "x", "response": "1"', "not valid JSON"),  # cut short
    ('["add", "x", "1"]', "expected a JSON object"),
    ('{"task": "add", "response": "1"}', "prompt is missing"),
    ('{"task": "", "prompt": "x", "response": "1"}', "task is missing or empty"),
])
def test_malformed_jsonl_line_names_its_line(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "add", "prompt": "x", "response": "1"}\n\n' + line + "\n")
    _one_line_error(capsys, ["train", "--tiny", "--data", str(path), "--out", str(tmp_path / "o")],
                    f"{path}:3:", message)


def test_unknown_task(run, capsys):
    d, out = run
    _one_line_error(capsys, ["export", str(out), "--task", "poetry", "--out", str(d / "x"), "--merged"],
                    "unknown task 'poetry'", "sentiment")
    inp = d / "unknown-task.jsonl"
    inp.write_text('{"task": "add", "prompt": "1 + 1"}\n{"task": "poetry", "prompt": "a poem"}\n')
    _one_line_error(capsys, ["generate", str(out), "--input", str(inp)], "unknown-task.jsonl:2:", "'poetry'")


def test_model_the_adapter_was_not_trained_on(run, capsys, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, out = run
    other = tmp_path / "other"
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(str(other))
    char_tokenizer().save_pretrained(str(other))
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"task": "add", "prompt": "1 + 1"}\n')
    _one_line_error(capsys, ["generate", str(out), "--input", str(inp), "--model", str(other)],
                    "was trained on llama (hidden 32", "hidden 48")
    # Same architecture, other weights: also refused.
    same_shape = tmp_path / "same-shape"
    model, tok = tiny_model(seed=7)
    model.save_pretrained(str(same_shape))
    tok.save_pretrained(str(same_shape))
    _one_line_error(capsys, ["generate", str(out), "--input", str(inp), "--model", str(same_shape)],
                    "other weights")


def test_not_a_trained_directory_and_bad_clusters(tmp_path, capsys, run):
    d, _ = run
    _one_line_error(capsys, ["generate", str(tmp_path), "--input", str(d / "eval.jsonl")], "not a cgc-lora")
    argv = ["export", str(tmp_path / "missing"), "--task", "add", "--out", str(tmp_path / "o"), "--merged"]
    _one_line_error(capsys, argv, "no such directory")
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps({"add": "a"}))
    argv = ["train", "--tiny", "--data", str(d / "train.jsonl"), "--out", str(tmp_path / "o"),
            "--clusters", str(clusters)]
    _one_line_error(capsys, argv, "missing", "sentiment")


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cgc_kernels.cli", "generate", str(tmp_path), "--input",
                           str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cgc-lora: error: no such file: {tmp_path / 'x.jsonl'}"
    assert "Traceback" not in proc.stderr


def test_bench_expert_loop_matches_reference_and_prints_table(capsys):
    from cgc_kernels import reference
    from cgc_kernels.cli.bench import expert_loop

    g = torch.Generator().manual_seed(0)
    T, S, K, r, d = 3, 2, 1, 4, 16
    x = torch.randn(10, d, generator=g)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 0, 1])
    gates = torch.softmax(torch.randn(T, S + K, generator=g), -1)
    sa, sb = torch.randn(1, S * r, d, generator=g), torch.randn(1, d, S * r, generator=g)
    ta, tb = torch.randn(T, K * r, d, generator=g), torch.randn(T, d, K * r, generator=g)
    torch.testing.assert_close(expert_loop(x, ids, gates, sa, sb, ta, tb, 2.0),
                               reference.cgc_lora(x, ids, gates, sa, sb, ta, tb, 2.0), rtol=1e-5, atol=1e-5)
    assert main(["bench"]) == 0
    table = capsys.readouterr().out
    for row in ("reference", "expert loop", "CGCLoRALinear"):
        assert row in table


def test_resume_from_checkpoint(run, tmp_path, capsys):
    from safetensors.torch import load_file

    d, out = run
    ckpt = out / "checkpoints" / "checkpoint-2"
    before = load_file(str(ckpt / "cgc_adapter.safetensors"))
    resumed = tmp_path / "resumed"
    argv = ["train", "--tiny", "--data", str(d / "train.jsonl"), "--out", str(resumed), "--steps", "3",
            "--batch-size", "8", "--lr", "5e-2", "--warmup-steps", "0", "--rank", "4", "--clusters",
            str(d / "clusters.json"), "--resume", str(ckpt)]
    assert main(argv) == 0
    # the one-line summary of what is adapted (the default targets on the tiny 2-layer Llama)
    assert "adapting 8 modules: q_proj x2, v_proj x2, o_proj x2, down_proj x2" in capsys.readouterr().out
    after = load_file(str(resumed / "cgc_adapter.safetensors"))
    assert set(after) == set(before)
    # One more step from the checkpoint's weights: moved, but not back to a fresh start (B = 0).
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert all(float(v.abs().max()) > 0 for k, v in after.items() if "task_b" in k)


@pytest.mark.parametrize("rank, served", [(1, 1), (2, 8), (12, 16), (24, 32), (320, 320), (321, 512), (512, 512)])
def test_vllm_rank_is_the_next_one_vllm_accepts(rank, served):
    from cgc_kernels.adapter.merge import VLLM_LORA_RANKS, vllm_lora_rank

    assert vllm_lora_rank(rank) == served and served in VLLM_LORA_RANKS
    with pytest.raises(ValueError, match="largest LoRA rank vLLM accepts"):
        vllm_lora_rank(513)
