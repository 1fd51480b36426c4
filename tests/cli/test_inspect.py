"""Gate inspection: the table, the shared/specific split, the heatmap and CSV, `cgc-lora inspect`.

Every number is checked against `CGCModel.gate_weights()` (the layers' own gates).
"""

import csv

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCLoRAConfig, CGCModel, GateTable, shared_specific_split, write_gate_report
from cgc_kernels.adapter.gate_report import MODEL_WIDE, gate_table_from_dir
from cgc_kernels.cli import main as cli_main

S, K = 2, 1


def tiny_llama(layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def make_cgc(layers=2, **kw):
    cfg = dict(tasks=["qa", "sum", "cls"], num_shared_experts=S, num_task_experts=K, rank=4, alpha=8,
               target_modules=["q_proj", "v_proj"])
    cfg.update(kw)
    cgc = CGCModel(tiny_llama(layers), CGCLoRAConfig(**cfg))
    # Distinct gates everywhere (fresh gates are uniform, which would hide mix-ups).
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in cgc.named_parameters():
            if ".gate" in n or n.startswith("gate") or "_model_gates" in n:
                p.normal_(0, 1.5)
    return cgc


CASES = [
    dict(),  # one cluster, a gate per layer
    # two clusters (1+N), 12 layers: natural order puts layers.10 after layers.9
    dict(layers=12, clusters={"qa": "text", "sum": "text", "cls": "label"}),
    dict(gate_scope="model"),  # one gate for every layer
    dict(gate_embedding_dim=4),  # logits from a task embedding
]


@pytest.mark.parametrize("kw", CASES)
def test_table_matches_gate_weights(kw):
    cgc = make_cgc(**kw)
    weights = cgc.gate_weights()
    for w in weights.values():
        assert w.shape == (3, S + K)
        torch.testing.assert_close(w.sum(-1), torch.ones(3))  # rows sum to 1
    table = cgc.gate_table()
    assert table.tasks == cgc.tasks and table.experts == ["shared0", "shared1", "task0"]
    assert table.weights.shape == (3, len(table.layers), S + K)
    if kw.get("gate_scope") == "model":
        assert table.layers == [MODEL_WIDE]
        for w in weights.values():
            assert torch.equal(w, table.weights[:, 0])
    else:
        assert sorted(table.layers) == sorted(weights)
        for j, name in enumerate(table.layers):
            assert torch.equal(table.weights[:, j], weights[name])
        numbers = [int(n.split(".")[2]) for n in table.layers]
        assert numbers == sorted(numbers)
    clusters = (kw.get("clusters") or {}).get
    assert table.clusters == [clusters(t, "default") for t in table.tasks]
    # The split is the mean over layers of the first S columns of gate_weights().
    split = shared_specific_split(cgc)
    for i, t in enumerate(cgc.tasks):
        per_layer = torch.stack([w[i, :S].sum() for w in weights.values()])
        assert split[t]["shared"] == pytest.approx(float(per_layer.mean()), abs=1e-6)
        assert split[t]["specific"] == pytest.approx(1 - float(per_layer.mean()), abs=1e-6)
        assert split[t]["shared_min"] == pytest.approx(float(per_layer.min()), abs=1e-6)
        assert split[t]["shared_max"] == pytest.approx(float(per_layer.max()), abs=1e-6)


@pytest.mark.parametrize("kw", CASES)
def test_saved_directory_gives_the_same_table(kw, tmp_path):
    cgc = make_cgc(**kw)
    cgc.save_pretrained(tmp_path)
    live, saved = cgc.gate_table(), gate_table_from_dir(tmp_path)
    assert (saved.tasks, saved.clusters, saved.layers, saved.experts) == (
        live.tasks, live.clusters, live.layers, live.experts)
    torch.testing.assert_close(saved.weights, live.weights, atol=1e-7, rtol=0)


def test_report_writes_png_and_csv_matching_gate_weights(tmp_path, capsys):
    cgc = make_cgc(clusters={"qa": "text", "sum": "text", "cls": "label"})
    png, table_csv = tmp_path / "g.png", tmp_path / "g.csv"
    table = write_gate_report(cgc, png, table_csv)
    assert isinstance(table, GateTable)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    weights = cgc.gate_weights()
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(weights) * (S + K)
    experts = ["shared0", "shared1", "task0"]
    for row in rows:
        want = weights[row["layer"]][cgc.task_index(row["task"]), experts.index(row["expert"])]
        assert float(row["weight"]) == pytest.approx(float(want), abs=1e-6)
        assert row["cluster"] == ("label" if row["task"] == "cls" else "text")
    out = capsys.readouterr().out
    split = shared_specific_split(cgc)
    for t in cgc.tasks:  # the printed split, to 3 decimals
        line = next(ln for ln in out.splitlines() if ln.startswith(t + " "))
        assert f"{split[t]['shared']:6.3f}" in line and f"{split[t]['specific']:8.3f}" in line


def test_cmd_inspect(tmp_path, capsys):
    cgc = make_cgc()
    adapter, report = tmp_path / "adapter", tmp_path / "report"
    cgc.save_pretrained(adapter)
    assert cli_main(["inspect", str(adapter)]) == 0  # the table only: nothing written, least of all into DIR
    assert "shared" in capsys.readouterr().out and sorted(p.name for p in adapter.iterdir()) == [
        "cgc_adapter.safetensors", "cgc_config.json"]
    assert cli_main(["inspect", str(adapter), "--out", str(report)]) == 0
    assert sorted(p.name for p in report.iterdir()) == ["gates.csv", "gates.png"]
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cgc-lora: error:") and len(err.strip().splitlines()) == 1


def test_token_gates_have_no_table(tmp_path):
    cgc = CGCModel(tiny_llama(), CGCLoRAConfig(tasks=["a", "b"], gate="token", rank=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="token"):
        cgc.gate_table()
    with pytest.raises(ValueError, match="token"):
        shared_specific_split(cgc)
    cgc.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="token"):
        gate_table_from_dir(tmp_path)


def test_layers_in_forward_order_and_a_screen_sized_picture(tmp_path):
    """The table's modules in the order the forward runs them (the model's own module order:
    attention q, k, v, o before the MLP, block 2 before block 10), from the model and from a
    saved directory; the picture fits a screen."""
    from PIL import Image

    from cgc_kernels.adapter.gate_report import plot_gate_heatmap

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    cgc = CGCModel(base, CGCLoRAConfig(tasks=["a", "b"], rank=2, target_modules="all-linear"))
    adapted = set(cgc.adapted_layers())
    forward = [n for n, _ in base.named_modules() if n in adapted]
    assert forward[:7] == [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                            "mlp.down_proj")]
    assert cgc.gate_table().layers == forward
    cgc.save_pretrained(tmp_path / "a")
    table = gate_table_from_dir(tmp_path / "a")
    assert table.layers == forward
    plot_gate_heatmap(table, tmp_path / "g.png")  # uniform gates: the autoscaled strip must not fail
    width, height = Image.open(tmp_path / "g.png").size
    assert width <= 1300 and height <= 800
