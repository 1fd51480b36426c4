"""Small things a user meets: an empty file where --out names a directory, the demo's listing of
its outputs, transformers.pipeline on a CGCModel without a page of model class names."""

import torch

from cgc_kernels.cli import main
from cgc_kernels.cli.demo import output_listing


def test_out_on_an_existing_empty_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "notes.txt"
    empty.touch()
    assert main(["export-base", "--tiny", "--out", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists (a file, empty)" in err and len(err.splitlines()) == 1
    assert empty.is_file()  # untouched
    assert main(["export-base", "--tiny", "--out", str(empty), "--overwrite"]) == 0  # asked for: replaced
    assert (empty / "config.json").is_file()


def test_demo_listing_is_aligned():
    for merged in ("add", "sentiment_inverted"):
        lines = output_listing(["add", "sentiment_inverted"], merged)
        names = [line.split()[0] for line in lines]
        starts = {line.index(line[2 + len(n):].lstrip(), 2 + len(n)) for line, n in zip(lines, names, strict=True)}
        assert len(starts) == 1, lines
        assert f"merged-{merged}/" in names


def test_pipeline_does_not_print_the_model_class_list(capfd):
    from transformers import LlamaConfig, LlamaForCausalLM, pipeline

    from cgc_kernels import CGCLoRAConfig, CGCModel
    from cgc_kernels.multitask.models import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        pad_token_id=tok.pad_token_id))
    cgc = CGCModel(base, CGCLoRAConfig(tasks=["a", "b"], rank=2, target_modules=["q_proj"]))
    cgc.set_task("a")
    capfd.readouterr()
    text = pipeline("text-generation", model=cgc, tokenizer=tok)("1+1=", max_new_tokens=2,
                                                                   do_sample=False)[0]["generated_text"]
    out, err = capfd.readouterr()
    assert text.startswith("1+1=")
    assert "Supported models are" not in out + err and "LlamaForCausalLM'" not in err
