"""CGCLoRAConfig: JSON round trip, derived fields, validation errors."""

from __future__ import annotations

import pytest

from cgc_kernels import CGCLoRAConfig


def test_json_round_trip(tmp_path):
    cfg = CGCLoRAConfig(tasks=["qa", "sum", "cls"], clusters={"qa": "a", "sum": "b", "cls": "a"},
                        num_shared_experts=3, num_task_experts=2, rank=4, alpha=8, dropout=0.1,
                        gate_embedding_dim=6, target_modules=r".*\.(q|v)_proj")
    assert CGCLoRAConfig.from_json_string(cfg.to_json_string()) == cfg
    cfg.save_pretrained(tmp_path)
    assert CGCLoRAConfig.from_pretrained(tmp_path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["cgc_config.json"]  # no temp file left


def test_derived_fields():
    cfg = CGCLoRAConfig(tasks=["qa", "sum", "cls"], clusters={"qa": "a", "sum": "b", "cls": "a"},
                        num_shared_experts=2, num_task_experts=1, rank=4, alpha=8)
    assert cfg.num_tasks == 3 and cfg.num_experts == 3 and cfg.scaling == 2.0
    assert cfg.cluster_names == ["a", "b"] and cfg.task_cluster == [0, 1, 0]
    assert cfg.task_index("cls") == 2 and cfg.task_index(1) == 1
    assert CGCLoRAConfig(tasks=["x"]).task_cluster == [0]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tasks=[]), "non-empty list"),
    (dict(tasks="qa"), "non-empty list"),
    (dict(tasks=["a", "a"]), "unique"),
    (dict(tasks=["a", ""]), "non-empty strings"),
    (dict(tasks=["a", "b"], clusters={"a": "x"}), "missing \\['b'\\]"),
    (dict(tasks=["a"], num_shared_experts=-1), "num_shared_experts"),
    (dict(tasks=["a"], num_shared_experts=0, num_task_experts=0), "at least 1"),
    (dict(tasks=["a"], rank=0), "rank"),
    (dict(tasks=["a"], rank=True), "rank must be a positive int"),  # bool is an int subclass
    (dict(tasks=["a"], rank=2.0), "rank must be a positive int"),
    (dict(tasks=["a"], alpha=-1), "alpha must be a positive number"),
    (dict(tasks=["a"], alpha=0), "alpha must be a positive number"),
    (dict(tasks=["a"], alpha=float("nan")), "alpha must be a positive number"),
    (dict(tasks=["a"], alpha=True), "alpha must be a positive number"),
    (dict(tasks=["a"], alpha="16"), "alpha must be a positive number"),
    (dict(tasks=["a"], dropout=1.0), "dropout"),
    (dict(tasks=["a"], dropout=-0.1), "dropout"),
    (dict(tasks=["a"], dropout="0.1"), "dropout"),
    (dict(tasks=["a"], num_task_experts=True), "num_task_experts"),
    (dict(tasks=["a"], target_modules=["q_proj", 3]), "entries must be non-empty"),
    (dict(tasks=["a"], gate="moe"), "gate must be one of"),
    (dict(tasks=["a"], gate_scope="global"), "gate_scope"),
    (dict(tasks=["a"], gate="token", gate_scope="model"), "token gate"),
    (dict(tasks=["a"], gate_embedding_dim=0), "gate_embedding_dim"),
    (dict(tasks=["a"], target_modules=[]), "at least one"),
    (dict(tasks=["a"], target_modules=3), "target_modules"),
])
def test_validation_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CGCLoRAConfig(**kwargs)


@pytest.mark.parametrize("target_modules", [None, "all-linear", r".*\.q_proj", ["q_proj"]])
def test_target_module_forms_are_accepted_and_round_trip(target_modules):
    cfg = CGCLoRAConfig(tasks=["a"], target_modules=target_modules, alpha=8, rank=4)
    assert CGCLoRAConfig.from_json_string(cfg.to_json_string()) == cfg


def test_unknown_fields_and_tasks():
    with pytest.raises(ValueError, match="unknown CGCLoRAConfig fields: \\['ranks'\\]"):
        CGCLoRAConfig.from_dict({"tasks": ["a"], "ranks": 2})
    cfg = CGCLoRAConfig(tasks=["a", "b"])
    with pytest.raises(ValueError, match="unknown task 'c'"):
        cfg.task_index("c")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cfg.task_index(2)
