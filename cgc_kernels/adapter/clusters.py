"""1+N: the plug-in CGC-LoRA modules (clusters) of a CGCModel, added, removed and loaded by name.

Every adapted layer holds all clusters stacked (shared_a [C, S*r, d_in]); adding or removing one
rebuilds the layers (CGCModel._build_layers), copying the remaining experts and gates by name.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import replace

from .config import CGCLoRAConfig
from .save_load import read_checkpoint

DEFAULT_CLUSTER = "default"
# Fields every cluster on one base model must share: they fix the layers' shapes and the op's scaling.
_SHARED_FIELDS = ("num_shared_experts", "num_task_experts", "rank", "alpha", "dropout", "gate",
                  "gate_scope", "gate_embedding_dim", "gate_init", "target_modules")


def split_config(config: CGCLoRAConfig) -> OrderedDict[str, CGCLoRAConfig]:
    """One single-cluster config per cluster of `config`, in cluster order."""
    if config.clusters is None:
        return OrderedDict([(DEFAULT_CLUSTER, config)])
    out = OrderedDict()
    for c in config.cluster_names:
        tasks = [t for t in config.tasks if config.clusters[t] == c]
        out[c] = replace(config, tasks=tasks, clusters=None)
    return out


def check_compatible(a: CGCLoRAConfig, b: CGCLoRAConfig, what: str) -> None:
    diff = [f for f in _SHARED_FIELDS if getattr(a, f) != getattr(b, f)]
    if diff:
        detail = ", ".join(f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in diff)
        raise ValueError(f"{what} must share {', '.join(diff)} with the model's clusters ({detail})")


def _rename_cluster_key(key: str, old: str, new: str) -> str:
    """A saved tensor key of cluster `old` as cluster `new` (task keys carry no cluster name)."""
    for kind in (".shared_a", ".shared_b"):
        if key.endswith(f"{kind}[{old}]"):
            return key[: -len(f"[{old}]")] + f"[{new}]"
    for prefix in ("gate", ".gate"):
        head = f"{prefix}[{old}]."
        if key.startswith(head) if prefix == "gate" else head in key:
            return key.replace(head, f"{prefix}[{new}].", 1)
    return key


class ClustersMixin:
    """CGCModel's cluster verbs (state: `_clusters`, an ordered {name: single-cluster config})."""

    @property
    def _shared_config(self) -> CGCLoRAConfig:
        """The first cluster's config: every cluster has the same `_SHARED_FIELDS` (experts, rank,
        scaling, gate), so this is where any of them is read."""
        return next(iter(self._clusters.values()))

    def add_cluster(self, name: str, config: CGCLoRAConfig) -> None:
        """Plug in a new CGC-LoRA module `name` (fresh experts: A random, B zero) for config.tasks."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"cluster name must be a non-empty string, got {name!r}")
        if name in self._clusters:
            raise ValueError(f"cluster {name!r} already exists; clusters: {self.clusters}")
        if config.clusters is not None and len(config.cluster_names) > 1:
            raise ValueError("add_cluster adds one cluster: config.clusters must be None or name one cluster")
        check_compatible(self._shared_config, config, f"cluster {name!r}")
        clash = sorted(set(config.tasks) & set(self.tasks))
        if clash:
            raise ValueError(f"tasks {clash} already belong to another cluster; task names must be unique")
        self._clusters[name] = replace(config, clusters=None)
        try:
            self._build_layers()
        except Exception:
            del self._clusters[name]
            self._build_layers()
            raise

    def remove_cluster(self, name: str) -> None:
        """Unplug cluster `name` (its experts and gates are dropped; the others are kept as they are)."""
        if name not in self._clusters:
            raise ValueError(f"unknown cluster {name!r}; clusters: {self.clusters}")
        if len(self._clusters) == 1:
            raise ValueError("cannot remove the only cluster (unload() returns the base model)")
        removed = self._clusters.pop(name)
        try:
            self._build_layers()
        except Exception:
            self._clusters[name] = removed
            raise

    def load_cluster(self, directory: str | os.PathLike, name: str | None = None) -> list[str]:
        """Add every cluster saved in `directory` (by save_pretrained / save_cluster), with its
        weights; `name` renames a single saved cluster (e.g. two modules both saved as "default").
        Returns the names of the clusters added."""
        config, tensors = read_checkpoint(directory)
        new = split_config(config)
        if name is not None:
            if len(new) != 1:
                raise ValueError(f"name= renames one cluster, but {directory} holds {list(new)}")
            (old_name, ccfg), = new.items()
            new = OrderedDict([(name, ccfg)])
            tensors = {_rename_cluster_key(k, old_name, name): v for k, v in tensors.items()}
        for c, ccfg in new.items():
            if c in self._clusters:
                raise ValueError(f"cluster {c!r} from {directory} already exists; clusters: {self.clusters}")
            check_compatible(self._shared_config, ccfg, f"cluster {c!r} from {directory}")
        added = []
        try:
            for c, ccfg in new.items():
                self.add_cluster(c, ccfg)
                added.append(c)
            self._load_adapter_tensors(tensors, list(new))
        except Exception:
            for c in reversed(added):
                self.remove_cluster(c)
            raise
        return added
