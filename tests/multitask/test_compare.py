"""The method comparison: equal trainable-parameter budgets, and an end-to-end run on a tiny random
model where every method reports a finite score and the seesaw count is computed as defined."""

import json
import math
import os

import pytest

from cgc_kernels.adapter.config import CGCLoRAConfig
from cgc_kernels.adapter.model import CGCModel
from cgc_kernels.data import demo_tasks as demo_data
from cgc_kernels.data.reader import read_jsonl
from cgc_kernels.multitask.compare import (
    REFERENCE,
    Comparison,
    Method,
    compare_methods,
    plan_methods,
    trainable_parameters,
)
from cgc_kernels.multitask.models import tiny_model

TASKS = list(demo_data.TASKS)
CLUSTERS = {"add": "c0", "plural": "c0", "sentiment": "c1", "capital": "c1"}


@pytest.mark.parametrize("num_tasks, task_rank, cgc_shared, moe_experts", [(4, 8, 4, 8), (2, 8, 2, 4), (8, 4, 8, 8)])
def test_planned_budgets_are_equal(num_tasks, task_rank, cgc_shared, moe_experts):
    clusters = {f"t{i}": f"c{i % 2}" for i in range(num_tasks)}
    methods = plan_methods(num_tasks, task_rank=task_rank, cgc_shared=cgc_shared, moe_experts=moe_experts,
                           clusters=clusters)
    budget = num_tasks * task_rank
    assert [m.key for m in methods] == ["shared_lora", REFERENCE, "moelora", "cgc_lora", "cgc_clustered"]
    for m in methods:
        assert abs(m.rank_units(num_tasks) - budget) <= 0.05 * budget, m


def test_parameter_counts_equal_on_a_model():
    # Counted from the built models (experts and gate logits), independently of rank_units.
    model, _ = tiny_model()
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    counts = {}
    for m in plan_methods(4, task_rank=8, clusters=CLUSTERS):
        cgc = CGCModel(model, m.config(TASKS, targets, 2.0))
        counts[m.key] = trainable_parameters(cgc)
        # alpha / r is the same for every method.
        assert next(iter(cgc.adapted_layers().values())).scaling == 2.0
        cgc.unload()
    ref = counts[REFERENCE]
    # Per-task LoRA of rank 8 on the four modules of two layers, by hand: 4 tasks x 8 x (d_in + d_out).
    per_layer = (32 + 32) + (32 + 16) + (32 + 32) + (64 + 32)  # q (32->32), v (32->16), o, down (64->32)
    assert ref == 2 * (4 * 8 * per_layer + 4 * 4)  # + one gate logit per task in each of the 4 modules
    for k, n in counts.items():
        assert abs(n - ref) <= 0.05 * ref, (k, n, ref)


def test_plan_rejects_an_unmeetable_budget():
    with pytest.raises(ValueError, match="within 5%"):
        plan_methods(4, task_rank=8, cgc_shared=2, cgc_task=1)  # 6 units per rank: 32 is not reachable
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_methods(4, moe_experts=0)


def test_seesaw_and_table_from_known_scores():
    methods = [Method("shared_lora", "shared LoRA", 1, 0, 4), Method(REFERENCE, "per-task LoRA", 0, 1, 2),
               Method("cgc_lora", "CGC-LoRA", 1, 1, 1)]
    r = Comparison(tasks=["a", "b"], methods=methods, seeds=[0, 1],
                   scores={"shared_lora": [{"a": 0.9, "b": 0.2}, {"a": 0.7, "b": 0.4}],
                           REFERENCE: [{"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}],
                           "cgc_lora": [{"a": 0.6, "b": 0.6}, {"a": 0.6, "b": 0.4}]},
                   params={"shared_lora": 10, REFERENCE: 10, "cgc_lora": 10})
    assert r.mean_score("shared_lora", "a") == pytest.approx(0.8)
    assert r.mean_score("shared_lora") == pytest.approx(0.55)
    assert r.spread("shared_lora", "a") == pytest.approx(math.sqrt(0.02))
    assert r.seesaw("shared_lora") == 1  # b: 0.3 < 0.5
    assert r.seesaw("cgc_lora") == 0  # a 0.6, b 0.5: not below
    assert r.seesaw_per_seed("cgc_lora") == [0, 1]
    assert r.seesaw(REFERENCE) is None
    assert r.worst_delta("shared_lora") == pytest.approx(-0.2)
    table = r.markdown()
    assert "| shared LoRA |" in table and "1 / 2" in table and "(reference)" in table
    assert Comparison.from_dict(json.loads(json.dumps(r.to_dict()))).markdown() == table


def _subset(name, every):
    return read_jsonl(os.path.join(demo_data.data_dir(), name))[::every]


def test_compare_end_to_end_on_a_tiny_model(tmp_path):
    model, tok = tiny_model()
    train, held = _subset(demo_data.FILES[0], 40), _subset(demo_data.FILES[1], 25)
    assert {r["task"] for r in held} == set(TASKS)
    r = compare_methods(model, tok, train, held, methods=plan_methods(4, task_rank=4, cgc_shared=4,
                                                                         moe_experts=8, clusters=CLUSTERS),
                        steps=2, batch_size=4, warmup_steps=0, lr=1e-2, seeds=(0,), max_new_tokens=2,
                        max_length=48, model_name="tiny")
    assert set(r.scores) == {"shared_lora", REFERENCE, "moelora", "cgc_lora", "cgc_clustered"}
    for key, per_seed in r.scores.items():
        assert len(per_seed) == 1 and set(per_seed[0]) == set(TASKS)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in per_seed[0].values()), key
        assert len(r.losses[key][0]) == 2 and all(math.isfinite(v) for v in r.losses[key][0])
    ref = r.params[REFERENCE]
    assert all(abs(n - ref) <= 0.05 * ref for n in r.params.values())
    # The base model comes back without adapters.
    assert not any("lora" in n for n, _ in model.named_parameters())
    png = r.plot(str(tmp_path / "c.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_command_tiny(tmp_path):
    from cgc_kernels.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _subset(demo_data.FILES[0], 60)))
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _subset(demo_data.FILES[1], 50)))
    out = tmp_path / "cmp"
    rc = main(["compare", "--tiny", "--data", str(data), "--eval-data", str(held), "--out", str(out),
               "--steps", "1", "--batch-size", "4", "--warmup-steps", "0", "--rank", "4",
               "--max-new-tokens", "2", "--target-modules", "q_proj,v_proj"])
    assert rc == 0
    for name in ("compare.md", "compare.png", "compare.json"):
        assert (out / name).is_file()
    d = json.loads((out / "compare.json").read_text())
    assert set(d["scores"]) == {"shared_lora", REFERENCE, "moelora", "cgc_lora"}
    # A budget the layout cannot meet is a one-line error.
    assert main(["compare", "--tiny", "--data", str(data), "--eval-data", str(held), "--out", str(out),
                 "--overwrite", "--cgc-shared", "2", "--cgc-task", "1"]) == 2
    # A clusters file naming tasks not in the data is a one-line error.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": "c0"}))
    assert main(["compare", "--tiny", "--data", str(data), "--eval-data", str(held), "--clusters", str(bad),
                 "--out", str(out), "--overwrite"]) == 2


def test_config_of_each_method():
    methods = {m.key: m for m in plan_methods(4, task_rank=8, clusters=CLUSTERS)}
    c = methods["cgc_clustered"].config(TASKS, ["q_proj"], 2.0)
    assert isinstance(c, CGCLoRAConfig) and c.cluster_names == ["c0", "c1"]
    assert (c.num_shared_experts, c.num_task_experts, c.rank, c.alpha) == (2, 1, 4, 8.0)
    assert methods["shared_lora"].config(TASKS, ["q_proj"], 2.0).rank == 32
    assert (methods["moelora"].num_shared_experts, methods["moelora"].rank) == (8, 4)
