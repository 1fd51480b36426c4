"""The N in 1+N: group related tasks into clusters, one CGC-LoRA module (shared experts) each.

Inter-task affinity is measured as the cosine similarity of per-task gradients of one shared
LoRA (CGCModel with S=1, K=0: every task uses the same expert) after a short warm-up on mixed
batches: two tasks whose gradients point the same way pull the shared adapter the same way, so
sharing experts helps both; opposed gradients are the seesaw that separate modules avoid.

    aff = task_affinity(base_model, tokenizer, rows)          # TaskAffinity: tasks, [T, T] cosine
    clusters = cluster_tasks(aff.matrix, aff.tasks, 2)        # {task: "cluster0" | "cluster1"}
    write_clusters(clusters, "clusters.json")                 # what `cgc-lora train --clusters` reads

Grouping is scipy's agglomerative (hierarchical) clustering on the distance 1 - cosine, cut into
at most N clusters. A hand-written {task: cluster} file (prior knowledge) has the same format.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..adapter.config import CGCLoRAConfig
from ..adapter.model import CGCModel
from ..data.reader import read_json, tasks_of
from .recipe import TrainSettings, encode, response_loss, train_loop, training_batch

DEFAULT_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
LINKAGES = ("average", "complete", "single", "weighted")


@dataclass
class TaskAffinity:
    """tasks: T names; matrix: [T, T] cosine similarity of the tasks' mean gradients (diagonal 1)."""

    tasks: list[str]
    matrix: np.ndarray

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "matrix": [[round(float(v), 6) for v in row] for row in self.matrix]}

    def table(self) -> str:
        """The matrix as a markdown table."""
        lines = ["| | " + " | ".join(self.tasks) + " |", "|---" * (len(self.tasks) + 1) + "|"]
        for t, row in zip(self.tasks, self.matrix, strict=True):
            lines.append(f"| **{t}** | " + " | ".join(f"{v:+.2f}" for v in row) + " |")
        return "\n".join(lines)


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                      for p in params])


def task_affinity(model, tokenizer, rows: list[dict], *, warmup_steps: int = 10, batches: int = 4,
                  batch_size: int = 8, rank: int = 8, alpha: float = 16.0,
                  target_modules: list[str] | str | None = None, lr: float = 2e-3, max_length: int = 96,
                  system: str | None = None, seed: int = 0, progress: bool = False) -> TaskAffinity:
    """Gradient-cosine affinity of the tasks of `rows` on a shared LoRA of `model`.

    Args:
        model: a transformers causal LM; a shared LoRA is injected for the measurement and removed
            again (`model` comes back unchanged).
        rows: instruction rows {"task", "prompt", "response"}; every task needs at least one row.
        warmup_steps: optimizer steps on mixed-task batches first (a freshly initialised LoRA has
            B = 0, so its A gets no gradient and its B's gradient says little about learning).
        batches, batch_size: each task's gradient is the mean over `batches` batches of
            `batch_size` rows of that task alone (drawn with a fixed seed).
        rank, alpha, target_modules: the shared LoRA.

    Returns: TaskAffinity with the [T, T] cosine similarities, tasks in order of first appearance.
    """
    tasks = tasks_of(rows)
    if len(tasks) < 2:
        raise ValueError(f"rows must hold at least two tasks to measure affinity, got {tasks}")
    for name, v in (("warmup_steps", warmup_steps), ("batches", batches - 1), ("batch_size", batch_size - 1)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a {'non-negative' if name == 'warmup_steps' else 'positive'} int")
    config = CGCLoRAConfig(tasks=tasks, num_shared_experts=1, num_task_experts=0, rank=rank, alpha=alpha,
                           target_modules=target_modules or DEFAULT_TARGETS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cgc = CGCModel(model, config)
    try:
        if warmup_steps:
            settings = TrainSettings(steps=warmup_steps, batch_size=batch_size, lr=lr,
                                     warmup_steps=min(2, warmup_steps), max_length=max_length, seed=seed)
            train_loop(cgc, tokenizer, rows, tasks, settings, system=system, progress=progress)
        params = [p for p in cgc.parameters() if p.requires_grad]
        encoded = encode(tokenizer, rows, system, max_length)
        rng = random.Random(seed + 1)
        grads = []
        cgc.eval()  # no dropout: the gradient of the loss itself
        for t_index, task in enumerate(tasks):
            idx_all = [i for i, r in enumerate(rows) if r["task"] == task]
            total = None
            for _ in range(batches):
                idx = rng.sample(idx_all, min(batch_size, len(idx_all)))
                batch = training_batch([encoded[i] for i in idx], tokenizer.pad_token_id)
                cgc.zero_grad(set_to_none=True)
                response_loss(cgc, batch, torch.full((len(idx),), t_index)).backward()
                g = _flat_grad(params)
                total = g if total is None else total + g
            grads.append(total / batches)
        cgc.zero_grad(set_to_none=True)
    finally:
        cgc.unload()
    g = torch.stack(grads)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    matrix = (g @ g.T).clamp(-1.0, 1.0).double().numpy()
    np.fill_diagonal(matrix, 1.0)
    return TaskAffinity(tasks, matrix)


def cluster_tasks(affinity, tasks: list[str], n_clusters: int, *, method: str = "average",
                  prefix: str = "cluster") -> dict[str, str]:
    """{task: cluster name}: hierarchical clustering of `tasks` into at most `n_clusters` groups.

    Args:
        affinity: [T, T] symmetric similarity in [-1, 1] (cosine; 1 = identical direction).
        tasks: T names, in the matrix's order.
        n_clusters: N, 1 <= N <= T.
        method: scipy linkage ("average", "complete", "single", "weighted").

    Cluster names are f"{prefix}{i}", numbered in order of each cluster's first task in `tasks`.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    a = np.asarray(affinity, dtype=np.float64)
    T = len(tasks)
    if a.shape != (T, T):
        raise ValueError(f"affinity must be [T, T] = [{T}, {T}] for the {T} tasks, got {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise ValueError("affinity must be finite")
    if not np.allclose(a, a.T, atol=1e-6):
        raise ValueError("affinity must be symmetric")
    if len(set(tasks)) != T:
        raise ValueError(f"tasks must be unique, got {tasks}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or not 1 <= n_clusters <= T:
        raise ValueError(f"n_clusters must be an int in [1, {T}], got {n_clusters!r}")
    if method not in LINKAGES:
        raise ValueError(f"method must be one of {LINKAGES}, got {method!r}")
    if T == 1:
        return {tasks[0]: f"{prefix}0"}
    dist = np.clip(1.0 - a, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method=method)
    labels = fcluster(z, t=n_clusters, criterion="maxclust")
    names: dict[int, str] = {}
    for lab in labels:
        names.setdefault(int(lab), f"{prefix}{len(names)}")
    return {t: names[int(lab)] for t, lab in zip(tasks, labels, strict=True)}


def write_clusters(clusters: dict[str, str], path: str | os.PathLike) -> None:
    """Write {task: cluster} as JSON (the file `cgc-lora train --clusters` reads)."""
    _check_mapping(clusters, str(path))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clusters, f, indent=2)
        f.write("\n")


def read_clusters(path: str | os.PathLike, tasks: list[str] | None = None) -> dict[str, str]:
    """{task: cluster} from a JSON file (computed or hand-written); with `tasks`, every task must
    be mapped and no other. ValueError naming the file otherwise."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such clusters file: {path}")
    mapping = read_json(path, ValueError)
    _check_mapping(mapping, path)
    if tasks is not None:
        missing = [t for t in tasks if t not in mapping]
        extra = [t for t in mapping if t not in tasks]
        if missing or extra:
            raise ValueError(f"{path}: must map every task to a cluster; missing {missing}, unknown {extra}")
    return mapping


def _check_mapping(mapping, where: str) -> None:
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{where}: clusters must be a non-empty JSON object {{task: cluster name}}")
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str) or not k or not v]
    if bad:
        raise ValueError(f"{where}: task and cluster names must be non-empty strings (bad: {bad})")


def cluster_summary(clusters: dict[str, str]) -> str:
    """One line per cluster: 'cluster0: add, plural'."""
    groups: dict[str, list[str]] = {}
    for t, c in clusters.items():
        groups.setdefault(c, []).append(t)
    return "\n".join(f"{c}: {', '.join(ts)}" for c, ts in groups.items())
