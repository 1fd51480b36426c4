"""Task clustering: hierarchical clustering recovers planted groups, from a given affinity matrix
and from gradients measured on a tiny model; the clusters file round-trips and feeds CGCModel."""

import json
import random

import numpy as np
import pytest

from cgc_kernels.adapter.config import CGCLoRAConfig
from cgc_kernels.adapter.model import CGCModel
from cgc_kernels.multitask.clustering import (
    cluster_tasks,
    read_clusters,
    task_affinity,
    write_clusters,
)
from cgc_kernels.multitask.models import tiny_model


def _groups(mapping):
    """The partition as a set of frozensets (cluster names are arbitrary)."""
    out = {}
    for t, c in mapping.items():
        out.setdefault(c, set()).add(t)
    return {frozenset(v) for v in out.values()}


def test_planted_affinity_two_blocks():
    tasks = ["a", "x", "b", "y", "c"]
    group = {"a": 0, "b": 0, "c": 0, "x": 1, "y": 1}
    rng = np.random.default_rng(0)
    a = np.where(np.equal.outer([group[t] for t in tasks], [group[t] for t in tasks]), 0.8, -0.2)
    a = a + rng.normal(0, 0.05, a.shape)
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    got = cluster_tasks(a, tasks, 2)
    assert _groups(got) == {frozenset("abc"), frozenset("xy")}
    # Names numbered by first appearance in `tasks`.
    assert got["a"] == "cluster0" and got["x"] == "cluster1"
    # N = T: each task alone; N = 1: all together.
    assert len(_groups(cluster_tasks(a, tasks, 5))) == 5
    assert _groups(cluster_tasks(a, tasks, 1)) == {frozenset(tasks)}


def test_three_levels_follow_the_hierarchy():
    # {a, b} very close, c close to them, {x, y} far: N=3 splits c off, not a from b.
    tasks = ["a", "b", "c", "x", "y"]
    a = np.array([[1.0, 0.95, 0.6, -0.3, -0.3],
                  [0.95, 1.0, 0.6, -0.3, -0.3],
                  [0.6, 0.6, 1.0, -0.2, -0.2],
                  [-0.3, -0.3, -0.2, 1.0, 0.9],
                  [-0.3, -0.3, -0.2, 0.9, 1.0]])
    assert _groups(cluster_tasks(a, tasks, 3)) == {frozenset("ab"), frozenset("c"), frozenset("xy")}
    assert _groups(cluster_tasks(a, tasks, 2)) == {frozenset("abc"), frozenset("xy")}


@pytest.mark.parametrize("kwargs, match", [
    (dict(affinity=np.eye(3), n_clusters=4), "n_clusters"),
    (dict(affinity=np.eye(3), n_clusters=0), "n_clusters"),
    (dict(affinity=np.eye(2), n_clusters=1), "affinity must be"),
    (dict(affinity=np.array([[1, 0.5, 0], [0.1, 1, 0], [0, 0, 1]]), n_clusters=2), "symmetric"),
    (dict(affinity=np.full((3, 3), np.nan), n_clusters=2), "finite"),
    (dict(affinity=np.eye(3), n_clusters=2, method="ward!"), "method"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_tasks(tasks=["a", "b", "c"], **kwargs)


def _planted_rows():
    """Four tasks in two obvious pairs: a1/a2 answer with the prompt in capitals, b1/b2 with 'xyz'."""
    rng = random.Random(0)
    rows = []
    for t in ["a1", "b1", "a2", "b2"]:
        for _ in range(16):
            w = "".join(rng.choice("abcdefgh") for _ in range(4))
            rows.append({"task": t, "prompt": w, "response": w.upper() if t[0] == "a" else "xyz"})
    return rows


def test_gradient_affinity_recovers_planted_pairs():
    model, tok = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aff = task_affinity(model, tok, _planted_rows(), warmup_steps=3, batches=2, batch_size=8, rank=4, lr=1e-2)
    assert aff.tasks == ["a1", "b1", "a2", "b2"]
    m = aff.matrix
    assert m.shape == (4, 4) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)
    # Within a pair the mean gradients nearly agree; across pairs they do not.
    assert min(m[0, 2], m[1, 3]) > max(m[0, 1], m[0, 3], m[2, 1], m[2, 3]) + 0.2
    assert _groups(cluster_tasks(m, aff.tasks, 2)) == {frozenset({"a1", "a2"}), frozenset({"b1", "b2"})}
    # The measurement leaves the model as it was (adapter removed, weights untouched).
    after = model.state_dict()
    assert set(after) == set(before) and all(torch_equal(before[k], after[k]) for k in before)


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_clusters_file_round_trip_builds_n_modules(tmp_path):
    mapping = {"a1": "cluster0", "b1": "cluster1", "a2": "cluster0", "b2": "cluster1"}
    path = tmp_path / "clusters.json"
    write_clusters(mapping, path)
    assert json.loads(path.read_text()) == mapping
    tasks = ["a1", "b1", "a2", "b2"]
    got = read_clusters(path, tasks)
    assert got == mapping
    model, _ = tiny_model()
    cgc = CGCModel(model, CGCLoRAConfig(tasks=tasks, clusters=got, num_shared_experts=1, num_task_experts=1,
                                        rank=2, target_modules=["q_proj"]))
    assert cgc.clusters == ["cluster0", "cluster1"]
    layer = next(iter(cgc.adapted_layers().values()))
    assert layer.shared_a.shape[0] == 2
    # A hand-written mapping (prior knowledge) is the same format.
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"a1": "upper", "a2": "upper", "b1": "const", "b2": "const"}))
    assert read_clusters(hand, tasks)["b2"] == "const"


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"a1": 3}', "non-empty strings"),
    ('{"a1": "c0"}', "missing"),
])
def test_bad_clusters_file(tmp_path, content, match):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_clusters(path, ["a1", "b1"])


def test_cluster_command_writes_a_file_train_reads(tmp_path):
    from cgc_kernels.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _planted_rows()))
    out = tmp_path / "clusters.json"
    rc = main(["cluster", "--tiny", "--data", str(data), "--num-clusters", "2", "--clusters-out", str(out),
               "--warmup-steps", "3", "--batches", "2", "--rank", "4", "--lr", "1e-2"])
    assert rc == 0
    assert _groups(json.loads(out.read_text())) == {frozenset({"a1", "a2"}), frozenset({"b1", "b2"})}
    assert main(["cluster", "--tiny", "--data", str(data), "--num-clusters", "5", "--clusters-out", str(out),
                 "--overwrite"]) == 2
