"""CGCLoRAConfig: what a CGC-LoRA module adapts and how (a dataclass with a JSON round trip)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

CONFIG_NAME = "cgc_config.json"
GATE_KINDS = ("task", "token")
GATE_SCOPES = ("layer", "model")
GATE_INITS = ("uniform", "random")  # here, not in gates.py, so that the config needs no torch


@dataclass
class CGCLoRAConfig:
    """Configuration of one CGC-LoRA module (one cluster of tasks, or several with `clusters`).

    Attributes:
        tasks: task names; a task's index in this list is its global task id.
        clusters: optional {task: cluster name}; each cluster gets its own shared experts. None
            puts every task in one cluster.
        num_shared_experts: S, task-common LoRA experts per cluster (0 allowed).
        num_task_experts: K, task-specific LoRA experts per task (0 allowed; S + K >= 1).
        rank: r, the rank of ONE expert; a task's merged update has rank at most (S+K) r.
        alpha: LoRA alpha; the scaling is alpha / rank.
        dropout: dropout on the LoRA input during training.
        gate: "task" (softmax of learned per-task logits; mergeable) or "token" (softmax of a
            per-task linear map of each token; not mergeable).
        gate_scope: "layer" (each layer learns its own task gate) or "model" (one gate shared
            by every layer).
        gate_embedding_dim: if set, task-gate logits come from a learned task embedding of this
            size through a linear map, instead of free per-task logits.
        gate_init: "uniform" (every task starts from an even mixture of its experts) or
            "random" (MOELoRA's gate: the task embedding and its linear map, without bias, drawn
            at random; needs gate_embedding_dim, MOELoRA uses 64).
        target_modules: module names to adapt (a name matches if it equals a module's last
            component or the full path ends with "." + name; every name must match something),
            one regex string matched with re.fullmatch against full module paths, "all-linear"
            (every linear layer but the output head, as PEFT), or None (PEFT's default for the
            model's architecture, read from peft.utils.constants; needs peft installed).
    """

    tasks: list[str]
    clusters: dict[str, str] | None = None
    num_shared_experts: int = 2
    num_task_experts: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    gate: str = "task"
    gate_scope: str = "layer"
    gate_embedding_dim: int | None = None
    gate_init: str = "uniform"
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        if isinstance(self.tasks, str) or not self.tasks:
            raise ValueError("tasks must be a non-empty list of task names")
        self.tasks = list(self.tasks)
        if any(not isinstance(t, str) or not t for t in self.tasks):
            raise ValueError(f"task names must be non-empty strings, got {self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be unique, got {self.tasks}")
        if self.clusters is not None:
            self.clusters = dict(self.clusters)
            missing = [t for t in self.tasks if t not in self.clusters]
            extra = [t for t in self.clusters if t not in self.tasks]
            if missing or extra:
                raise ValueError(
                    f"clusters must map every task to a cluster name: missing {missing}, unknown {extra}"
                )
        for name in ("num_shared_experts", "num_task_experts"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.num_shared_experts + self.num_task_experts < 1:
            raise ValueError("num_shared_experts + num_task_experts must be at least 1")
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS}, got {self.gate!r}")
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"gate_scope must be one of {GATE_SCOPES}, got {self.gate_scope!r}")
        if self.gate == "token" and self.gate_scope == "model":
            raise ValueError("a token gate reads each layer's input, so gate_scope must be 'layer'")
        if self.gate_embedding_dim is not None and (not _is_int(self.gate_embedding_dim)
                                                    or self.gate_embedding_dim < 1):
            raise ValueError(
                f"gate_embedding_dim must be a positive int or None, got {self.gate_embedding_dim}"
            )
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        if self.gate_init == "random" and (self.gate != "task" or self.gate_embedding_dim is None):
            raise ValueError("gate_init='random' is MOELoRA's gate (a task gate from a task embedding): "
                             "it needs gate='task' and gate_embedding_dim (e.g. 64)")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module")
            bad = [t for t in self.target_modules if not isinstance(t, str) or not t]
            if bad:
                raise ValueError(f"target_modules entries must be non-empty module names, got {bad[:3]}")
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError('target_modules must be a list of names, a regex string, "all-linear" or None')

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_experts(self) -> int:
        return self.num_shared_experts + self.num_task_experts

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def cluster_names(self) -> list[str]:
        """Cluster names in order of first appearance in `tasks`."""
        if self.clusters is None:
            return ["default"]
        return list(dict.fromkeys(self.clusters[t] for t in self.tasks))

    @property
    def task_cluster(self) -> list[int]:
        """[T] cluster index of each task."""
        if self.clusters is None:
            return [0] * self.num_tasks
        index = {c: i for i, c in enumerate(self.cluster_names)}
        return [index[self.clusters[t]] for t in self.tasks]

    def task_index(self, task: str | int) -> int:
        """Global index of a task given by name or index; ValueError for an unknown one."""
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task index must be an int in [0, {self.num_tasks}), got {task!r}")
        return task

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CGCLoRAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CGCLoRAConfig fields: {unknown}")
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, s: str) -> CGCLoRAConfig:
        return cls.from_dict(json.loads(s))

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json_string())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CGCLoRAConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        with open(path) as f:
            return cls.from_json_string(f.read())


def _is_int(v) -> bool:
    """A real int: bool is an int subclass in Python, but rank=True is a mistake, not rank 1."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
