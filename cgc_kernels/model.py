"""CGCModel: CGC-LoRA injected into a transformers model (the 1+N pattern end to end).

    cgc = CGCModel(model, CGCLoRAConfig(tasks=["qa", "sum"], target_modules=["q_proj", "v_proj"]))
    loss = cgc(input_ids=ids, labels=ids, task_ids=tids).loss     # tids [batch], [batch, seq] or names
    out = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=tids, max_new_tokens=32)

How task ids reach the layers without touching the model's code: every matched linear module is
replaced, on this model instance, by a CGCLoRALinear wrapping it. For the duration of a forward
(or a whole `generate`), a forward pre-hook on the base model turns the request's task ids into
one TaskRouting per base-model call (ids expanded to the call's [batch, seq]; during cached
decoding seq is 1, with beams the batch is repeated) and sets it as `current_routing` on every
adapted layer; leaving the context clears it, also on exceptions. Gradient checkpointing reruns
layers during the backward, after that context has closed: `activation_checkpointing_enable`
passes a `context_fn` to torch's checkpoint that captures the routing at forward time and
reinstates it for the recomputation.

1+N: the model holds an ordered list of clusters (plug-in CGC-LoRA modules), each with its own
tasks, S shared experts per layer and its own task gates. The global task list is the clusters'
task lists concatenated; every layer holds all clusters stacked (shared_a [C, S*r, d_in]), so a
batch mixing tasks of several clusters is one op call per layer. Adding or removing a cluster
rebuilds the layers, copying the remaining experts and gates.

Saved tensors are keyed by layer, kind and cluster or task name (`<layer>.task_a[<task>]`), so a
cluster saved from one model loads into another whatever the other clusters are.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .config import CONFIG_NAME, CGCLoRAConfig
from .gates import StackedTaskGate, TaskGate, TokenGate
from .layer import CGCLoRALinear, _is_transposed
from .routing import TaskRouting, build_routing, check_task_ids

WEIGHTS_NAME = "cgc_adapter.safetensors"
DEFAULT_CLUSTER = "default"
# Fields every cluster on one base model must share: they fix the layers' shapes and the op's scaling.
_SHARED_FIELDS = ("num_shared_experts", "num_task_experts", "rank", "alpha", "dropout", "gate",
                  "gate_scope", "gate_embedding_dim", "target_modules")


def module_matches(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch the module path; a list entry matches the path
    itself or its tail after a dot ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_transposed(module)


def _split_config(config: CGCLoRAConfig) -> OrderedDict[str, CGCLoRAConfig]:
    """One single-cluster config per cluster of `config`, in cluster order."""
    if config.clusters is None:
        return OrderedDict([(DEFAULT_CLUSTER, config)])
    out = OrderedDict()
    for c in config.cluster_names:
        tasks = [t for t in config.tasks if config.clusters[t] == c]
        out[c] = replace(config, tasks=tasks, clusters=None)
    return out


def _check_compatible(a: CGCLoRAConfig, b: CGCLoRAConfig, what: str) -> None:
    diff = [f for f in _SHARED_FIELDS if getattr(a, f) != getattr(b, f)]
    if diff:
        detail = ", ".join(f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in diff)
        raise ValueError(f"{what} must share {', '.join(diff)} with the model's clusters ({detail})")


@dataclass
class _TaskRequest:
    """Checked global task ids of one request: [B0] per sequence, or [B0, L0] per token (CPU)."""

    ids: torch.Tensor
    per_sequence: bool

    def expand(self, batch: int, seq: int) -> torch.Tensor:
        """[batch * seq] ids for a base-model call on [batch, seq] tokens."""
        if self.per_sequence:
            b0 = self.ids.shape[0]
            if batch % b0:
                raise ValueError(f"the model was called on {batch} sequences, not a multiple of the "
                                 f"{b0} task ids given")
            # generate() repeats each row (beams, num_return_sequences) with repeat_interleave.
            ids = self.ids.repeat_interleave(batch // b0) if batch != b0 else self.ids
            return ids[:, None].expand(batch, seq).reshape(-1)
        if tuple(self.ids.shape) != (batch, seq):
            raise ValueError(f"per-token task_ids are {tuple(self.ids.shape)} but the model was called on "
                             f"[batch, seq] = [{batch}, {seq}]")
        return self.ids.reshape(-1)


class CGCModel(nn.Module):
    """A transformers model with CGC-LoRA in its `target_modules`; everything else frozen.

    Args:
        model: a transformers model (decoders with nn.Linear or GPT-2's Conv1D projections). It is
            modified in place (modules replaced); `unload()` puts the original modules back.
        config: the CGC-LoRA configuration; `config.clusters` may split the tasks into clusters.
        backend: force the op's backend ("reference" / "triton"); None picks by device.
    """

    def __init__(self, model: nn.Module, config: CGCLoRAConfig, *, backend: str | None = None):
        super().__init__()
        if not isinstance(config, CGCLoRAConfig):
            raise ValueError(f"config must be a CGCLoRAConfig, got {type(config).__name__}")
        if any(isinstance(m, CGCLoRALinear) for m in model.modules()):
            raise ValueError("model already holds CGC-LoRA layers (unload() the other CGCModel first)")
        self.model = model
        self.backend = backend
        self._clusters: OrderedDict[str, CGCLoRAConfig] = _split_config(config)
        self._request: _TaskRequest | None = None
        self._active_routing: TaskRouting | None = None
        self._cluster_index_cache: dict[torch.device, torch.Tensor] = {}
        self._model_gates: dict[str, TaskGate] = {}  # gate_scope="model": one TaskGate per cluster

        self._layer_names = [
            name for name, m in model.named_modules() if name and module_matches(name, config.target_modules)
        ]
        if not self._layer_names:
            raise ValueError(
                f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}"
            )
        bad = [n for n in self._layer_names if not _is_adaptable(model.get_submodule(n))]
        if bad:
            kinds = sorted({type(model.get_submodule(n)).__name__ for n in bad})
            raise ValueError(f"target_modules matched modules that are not nn.Linear or Conv1D: {bad[:4]} "
                             f"({', '.join(kinds)}); narrow target_modules")
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._build_layers()

    # ---- layout ------------------------------------------------------------------------------
    @property
    def cgc_config(self) -> CGCLoRAConfig:
        """The configuration of every cluster as one CGCLoRAConfig (what save_pretrained writes)."""
        return self._config_of(list(self._clusters))

    def _config_of(self, clusters: list[str]) -> CGCLoRAConfig:
        first = self._clusters[clusters[0]]
        tasks = [t for c in clusters for t in self._clusters[c].tasks]
        mapping = None
        if clusters != [DEFAULT_CLUSTER]:
            mapping = {t: c for c in clusters for t in self._clusters[c].tasks}
        return replace(first, tasks=tasks, clusters=mapping)

    @property
    def tasks(self) -> list[str]:
        """Global task list: the clusters' tasks concatenated; a task's index is its global id."""
        return [t for c in self._clusters.values() for t in c.tasks]

    @property
    def clusters(self) -> list[str]:
        return list(self._clusters)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_cluster(self) -> list[int]:
        """[T] cluster index of each global task."""
        return [i for i, c in enumerate(self._clusters.values()) for _ in c.tasks]

    def task_index(self, task: str | int) -> int:
        """Global id of a task given by name or id; ValueError for an unknown one."""
        return self.cgc_config.task_index(task)

    def adapted_layers(self) -> dict[str, CGCLoRALinear]:
        """{module path: CGCLoRALinear} in model order."""
        return {n: self.model.get_submodule(n) for n in self._layer_names}

    def _set_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def _build_layers(self) -> None:
        """(Re)build every adapted layer for the current clusters, keeping the experts and gates
        of clusters and tasks that existed before (matched by name)."""
        cfg = next(iter(self._clusters.values()))
        tasks, task_cluster = self.tasks, self.task_cluster
        S, K, r = cfg.num_shared_experts, cfg.num_task_experts, cfg.rank
        if len(set(tasks)) != len(tasks):
            dup = sorted({t for t in tasks if tasks.count(t) > 1})
            raise ValueError(f"task names must be unique across clusters; repeated: {dup}")
        if cfg.gate == "task" and cfg.gate_scope == "model":
            for c, ccfg in self._clusters.items():
                if c not in self._model_gates:
                    self._model_gates[c] = self._new_task_gate(ccfg)
            for c in list(self._model_gates):
                if c not in self._clusters:
                    del self._model_gates[c]
        for name in self._layer_names:
            current = self.model.get_submodule(name)
            old = current if isinstance(current, CGCLoRALinear) else None
            if old is not None and old.merged_task is not None:
                raise ValueError(
                    f"{name} has task {old.merged_task} merged; unmerge() before changing clusters"
                )
            base = old.base_layer if old is not None else current
            old_tasks = getattr(old, "_task_names", [])
            old_clusters = getattr(old, "_cluster_names", [])
            if cfg.gate == "token":
                gate = TokenGate(len(tasks), S + K, old.in_features if old else _in_features(base))
                if old is not None:
                    with torch.no_grad():
                        for i, t in enumerate(tasks):
                            if t in old_tasks:
                                gate.weight[i] = old.gate.weight[old_tasks.index(t)]
            elif cfg.gate_scope == "model":
                gate = StackedTaskGate([self._model_gates[c] for c in self._clusters])
            else:
                parts = [
                    old.gate.parts[old_clusters.index(c)] if c in old_clusters else self._new_task_gate(ccfg)
                    for c, ccfg in self._clusters.items()
                ]
                gate = StackedTaskGate(parts)
            layer = CGCLoRALinear(
                base, len(tasks), S, K, r, cfg.alpha, dropout=cfg.dropout, task_cluster=task_cluster,
                gate=gate, backend=self.backend,
            )
            if old is not None:
                with torch.no_grad():
                    for i, c in enumerate(self._clusters):
                        if c in old_clusters:
                            layer.shared_a[i] = old.shared_a[old_clusters.index(c)]
                            layer.shared_b[i] = old.shared_b[old_clusters.index(c)]
                    for i, t in enumerate(tasks):
                        if t in old_tasks:
                            layer.task_a[i] = old.task_a[old_tasks.index(t)]
                            layer.task_b[i] = old.task_b[old_tasks.index(t)]
            layer.train(self.model.training)
            layer._task_names, layer._cluster_names = list(tasks), list(self._clusters)
            self._set_module(name, layer)
        self._cluster_index_cache.clear()

    def _new_task_gate(self, cfg: CGCLoRAConfig) -> TaskGate:
        gate = TaskGate(cfg.num_tasks, cfg.num_experts, cfg.gate_embedding_dim)
        device = next((p.device for p in self.model.parameters()), None)
        return gate.to(device) if device is not None else gate

    # ---- 1+N: clusters -------------------------------------------------------------------------
    def add_cluster(self, name: str, config: CGCLoRAConfig) -> None:
        """Plug in a new CGC-LoRA module `name` (fresh experts: A random, B zero) for config.tasks."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"cluster name must be a non-empty string, got {name!r}")
        if name in self._clusters:
            raise ValueError(f"cluster {name!r} already exists; clusters: {self.clusters}")
        if config.clusters is not None and len(config.cluster_names) > 1:
            raise ValueError("add_cluster adds one cluster: config.clusters must be None or name one cluster")
        _check_compatible(next(iter(self._clusters.values())), config, f"cluster {name!r}")
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
        config = CGCLoRAConfig.from_pretrained(directory)
        new = _split_config(config)
        tensors = _load_file(os.path.join(directory, WEIGHTS_NAME))
        if name is not None:
            if len(new) != 1:
                raise ValueError(f"name= renames one cluster, but {directory} holds {list(new)}")
            (old_name, ccfg), = new.items()
            new = OrderedDict([(name, ccfg)])
            tensors = {_rename_cluster_key(k, old_name, name): v for k, v in tensors.items()}
        for c, ccfg in new.items():
            if c in self._clusters:
                raise ValueError(f"cluster {c!r} from {directory} already exists; clusters: {self.clusters}")
            _check_compatible(next(iter(self._clusters.values())), ccfg, f"cluster {c!r} from {directory}")
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

    # ---- task ids in ---------------------------------------------------------------------------
    def resolve_task_ids(self, task_ids, batch: int, seq: int | None = None) -> _TaskRequest:
        """Check task ids once, on the host: a task name or id for the whole batch, [batch] names
        or ids (one task per sequence), or [batch, seq] ids (per token; -1 = base model)."""
        if task_ids is None:
            raise ValueError(
                "task_ids is required: a task name or id per sequence (or per token; -1 = base model)"
            )
        T = self.num_tasks
        if isinstance(task_ids, (str, int)) and not isinstance(task_ids, bool):
            task_ids = [task_ids] * batch
        if isinstance(task_ids, Sequence) and not isinstance(task_ids, str):
            if any(isinstance(t, str) for t in task_ids):
                # one entry per sequence: a name, an id, or -1 / None for the base model
                bad = [t for t in task_ids if t is not None and not isinstance(t, (str, int))]
                if bad:
                    raise ValueError(f"task_ids entries must be names, ints or None, got {bad[:3]}")
                task_ids = [-1 if t is None else self.task_index(t) if isinstance(t, str) else t
                            for t in task_ids]
            try:
                task_ids = torch.tensor(task_ids, dtype=torch.int64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"task_ids must be names, ints or an integer tensor: {e}") from None
        if not isinstance(task_ids, torch.Tensor):
            raise ValueError(f"task_ids must be a tensor, a list of names or ids, or one name/id; got "
                             f"{type(task_ids).__name__}")
        if task_ids.dim() == 0:
            task_ids = task_ids.expand(batch)
        if task_ids.dim() not in (1, 2):
            raise ValueError(f"task_ids must be [batch] or [batch, seq], got shape {tuple(task_ids.shape)}")
        if task_ids.shape[0] != batch:
            raise ValueError(f"task_ids has {task_ids.shape[0]} rows but the batch has {batch} sequences")
        if task_ids.dim() == 2 and seq is not None and task_ids.shape[1] != seq:
            raise ValueError(f"per-token task_ids are {tuple(task_ids.shape)} but input is [{batch}, {seq}]")
        check_task_ids(task_ids.reshape(-1), T)  # one host sync per request, none per layer
        return _TaskRequest(task_ids.detach().to("cpu", torch.int64), per_sequence=task_ids.dim() == 1)

    def _cluster_index(self, device: torch.device) -> torch.Tensor | None:
        if len(self._clusters) == 1:
            return None
        if device not in self._cluster_index_cache:
            index = torch.tensor(self.task_cluster, dtype=torch.int64, device=device)
            self._cluster_index_cache[device] = index
        return self._cluster_index_cache[device]

    def _set_routing(self, routing: TaskRouting | None) -> None:
        self._active_routing = routing
        for name in self._layer_names:
            self.model.get_submodule(name).current_routing = routing

    def _pre_forward_hook(self, module, args, kwargs):
        """Build this base-model call's routing from its [batch, seq] and the request's ids."""
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("CGCModel needs input_ids or inputs_embeds to place the task ids")
        batch, seq = x.shape[0], x.shape[1]
        ids = self._request.expand(batch, seq).to(x.device)
        self._set_routing(build_routing(ids, self.num_tasks, self._cluster_index(x.device), validate=False))

    @contextlib.contextmanager
    def task_context(self, request: _TaskRequest) -> Iterator[None]:
        """Serve `request`'s task ids to every base-model call inside; cleared on exit."""
        if self._request is not None:
            raise RuntimeError("CGCModel calls cannot be nested")
        self._request = request
        handle = self.model.register_forward_pre_hook(self._pre_forward_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._request = None
            self._set_routing(None)

    # ---- forward / generate --------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, **kwargs):
        """The base model's forward with task ids: [batch] (per sequence), [batch, seq] (per token,
        e.g. packed sequences), task names, or one name/id; -1 = the base model for that row."""
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("CGCModel.forward needs input_ids or inputs_embeds")
        request = self.resolve_task_ids(task_ids, x.shape[0], x.shape[1])
        with self.task_context(request):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
        """`model.generate` with one task per sequence ([batch] ids or names); rows of different
        tasks share one batch. Beams and num_return_sequences repeat each row's task."""
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("CGCModel.generate needs input_ids or inputs_embeds")
        request = self.resolve_task_ids(task_ids, x.shape[0])
        if not request.per_sequence:
            raise ValueError("generate takes one task per sequence: task_ids must be [batch], not per token")
        with self.task_context(request):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ---- gradient checkpointing ----------------------------------------------------------------
    def _checkpoint_contexts(self):
        """context_fn for torch checkpoint: the recomputation (during backward, after the forward
        context closed) runs with the routing the forward had."""
        routing = self._active_routing

        @contextlib.contextmanager
        def recompute():
            before = self._active_routing
            self._set_routing(routing)
            try:
                yield
            finally:
                self._set_routing(before)

        return contextlib.nullcontext(), recompute()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        """Enable the base model's checkpointing (non-reentrant) with the routing carried over."""
        kw = dict(activation_checkpointing_kwargs or {})
        if kw.get("use_reentrant", False):
            raise ValueError("CGCModel needs use_reentrant=False checkpointing (to carry task routing)")
        if "context_fn" in kw:
            raise ValueError("CGCModel sets the checkpoint context_fn itself; do not pass one")
        kw.update(use_reentrant=False, context_fn=self._checkpoint_contexts)
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:  # transformers before the rename
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        if hasattr(type(self.model), "is_activation_checkpointing"):
            return bool(self.model.is_activation_checkpointing)
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    is_gradient_checkpointing = is_activation_checkpointing

    # ---- what Trainer and generate read from a model ------------------------------------------
    @property
    def config(self):
        """The base model's transformers config."""
        return self.model.config

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    @property
    def main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "input_ids")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    # ---- gates ---------------------------------------------------------------------------------
    @torch.no_grad()
    def gate_weights(self, task: str | int | None = None) -> dict[str, torch.Tensor]:
        """{layer: [S+K]} expert mixture of `task` (shared experts first), or {layer: [T, S+K]}
        for every task when task is None. Token gates depend on the input: ValueError."""
        t = None if task is None else self.task_index(task)
        out = {}
        for name, layer in self.adapted_layers().items():
            g = layer.task_gates().detach().cpu()
            out[name] = g if t is None else g[t]
        return out

    # ---- deployment ----------------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        if next(iter(self._clusters.values())).gate == "token":
            raise ValueError("a token gate mixes experts per token, so a task has no single update: "
                             "it cannot be merged or exported as a LoRA adapter")

    @torch.no_grad()
    def merge_task(self, task: str | int) -> nn.Module:
        """A plain copy of the base model with `task`'s gate-weighted experts merged into its
        weights (no CGC layers, no overhead). The unified model is untouched."""
        self._check_mergeable()
        t = self.task_index(task)
        if self._request is not None:
            raise RuntimeError("merge_task cannot run inside a forward")
        merged = copy.deepcopy(self.model)
        for name in self._layer_names:
            layer = merged.get_submodule(name)
            layer.merge(t)
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, layer.base_layer)
        for n, p in merged.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        return merged

    @torch.no_grad()
    def peft_adapter_state(self, task: str | int) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config dict, {key: tensor}) of `task` as a standard PEFT LoRA adapter of rank
        R = (S+K) r: A = [shared A of its cluster; its own A], B = [shared B; own B], each expert's
        B columns scaled by its gate weight; lora_alpha = s * R so PEFT's scaling is s."""
        self._check_mergeable()
        t = self.task_index(task)
        cfg = next(iter(self._clusters.values()))
        S, K, r = cfg.num_shared_experts, cfg.num_task_experts, cfg.rank
        R = (S + K) * r
        tensors, conv1d = {}, False
        for name, layer in self.adapted_layers().items():
            c = int(layer.task_cluster[t])
            col = layer.task_gates()[t].repeat_interleave(r).to(layer.task_b.dtype)
            a = torch.cat([layer.shared_a[c], layer.task_a[t]], dim=0)
            b = torch.cat([layer.shared_b[c] * col[: S * r], layer.task_b[t] * col[S * r:]], dim=1)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().clone()
            conv1d = conv1d or _is_transposed(layer.base_layer)
        alpha = cfg.scaling * R
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", None),
            "r": R,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": cfg.target_modules,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }
        return adapter_config, tensors

    def export_peft_adapter(self, task: str | int, directory: str | os.PathLike) -> None:
        """Write `task` as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
        that `peft.PeftModel.from_pretrained(base_model, directory)` loads as is."""
        adapter_config, tensors = self.peft_adapter_state(task)
        os.makedirs(directory, exist_ok=True)
        _atomic_write(directory, {
            "adapter_model.safetensors": lambda p: _save_file(tensors, p),
            "adapter_config.json": lambda p: _write_text(p, json.dumps(adapter_config, indent=2)),
        })

    def unload(self) -> nn.Module:
        """Put the original modules back, restore requires_grad, and return the base model
        (without any adapter). This CGCModel is unusable afterwards."""
        for name in self._layer_names:
            layer = self.model.get_submodule(name)
            layer.unmerge()
            self._set_module(name, layer.base_layer)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        model, self._layer_names = self.model, []
        return model

    # ---- save / load ---------------------------------------------------------------------------
    def _adapter_tensors(self, clusters: list[str]) -> dict[str, torch.Tensor]:
        """{key: tensor} of the adapter and gate weights of `clusters` (empty tensors left out)."""
        cfg = next(iter(self._clusters.values()))
        order = list(self._clusters)
        out: dict[str, torch.Tensor] = {}

        def put(key, t):
            if t.numel():
                out[key] = t.detach()

        for name, layer in self.adapted_layers().items():
            for c in clusters:
                ci = order.index(c)
                put(f"{name}.shared_a[{c}]", layer.shared_a[ci])
                put(f"{name}.shared_b[{c}]", layer.shared_b[ci])
                for t in self._clusters[c].tasks:
                    ti = self.tasks.index(t)
                    put(f"{name}.task_a[{t}]", layer.task_a[ti])
                    put(f"{name}.task_b[{t}]", layer.task_b[ti])
                    if cfg.gate == "token":
                        put(f"{name}.token_gate[{t}]", layer.gate.weight[ti])
                if cfg.gate == "task" and cfg.gate_scope == "layer":
                    for pname, p in layer.gate.parts[ci].named_parameters():
                        put(f"{name}.gate[{c}].{pname}", p)
        if cfg.gate == "task" and cfg.gate_scope == "model":
            for c in clusters:
                for pname, p in self._model_gates[c].named_parameters():
                    put(f"gate[{c}].{pname}", p)
        return out

    @torch.no_grad()
    def _load_adapter_tensors(self, tensors: dict[str, torch.Tensor], clusters: list[str]) -> None:
        """Copy saved tensors into the live ones of `clusters`; every expected tensor must be there
        with the same shape, and nothing else may be (ValueError naming the tensor)."""
        targets = self._adapter_tensors(clusters)
        missing = [k for k in targets if k not in tensors]
        if missing:
            raise ValueError(f"saved adapter lacks tensor {missing[0]!r} ({len(missing)} missing); "
                             f"was it saved from another base model or configuration?")
        extra = [k for k in tensors if k not in targets]
        if extra:
            raise ValueError(f"saved adapter has unexpected tensor {extra[0]!r} ({len(extra)} unexpected); "
                             f"was it saved from another base model or configuration?")
        for k, live in targets.items():
            if tuple(tensors[k].shape) != tuple(live.shape):
                raise ValueError(f"tensor {k!r} is saved as {tuple(tensors[k].shape)} but this model needs "
                                 f"{tuple(live.shape)} (another base model?)")
        for k, live in targets.items():
            live.copy_(tensors[k])  # `live` views the parameter, so this writes into it

    def save_pretrained(self, directory: str | os.PathLike, clusters: list[str] | None = None) -> None:
        """Write the config (cgc_config.json) and the adapter + gate weights (safetensors) of all
        clusters, or of `clusters`. Atomic per file: temp files in `directory`, then os.replace, so
        a crash mid-save leaves the previous files whole."""
        clusters = list(self._clusters) if clusters is None else list(clusters)
        unknown = [c for c in clusters if c not in self._clusters]
        if unknown or not clusters:
            raise ValueError(
                f"clusters to save must be a non-empty subset of {self.clusters}, got {clusters}"
            )
        config = self._config_of(clusters)
        tensors = {k: v.contiguous() for k, v in self._adapter_tensors(clusters).items()}
        os.makedirs(directory, exist_ok=True)
        _atomic_write(directory, {
            WEIGHTS_NAME: lambda p: _save_file(tensors, p),
            CONFIG_NAME: lambda p: _write_text(p, config.to_json_string()),
        })

    def save_cluster(self, name: str, directory: str | os.PathLike) -> None:
        """save_pretrained of one cluster: a plug-in module `load_cluster` adds to any base."""
        self.save_pretrained(directory, [name])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, *,
                        backend: str | None = None) -> CGCModel:
        """Rebuild the CGCModel saved in `directory` on `model` (the same base architecture)."""
        config = CGCLoRAConfig.from_pretrained(directory)
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        tensors = _load_file(path)
        cgc = cls(model, config, backend=backend)
        try:
            cgc._load_adapter_tensors(tensors, cgc.clusters)
        except Exception:
            cgc.unload()  # leave the caller's model as it was
            raise
        return cgc


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


def _in_features(base: nn.Module) -> int:
    from .layer import base_layer_features

    return base_layer_features(base)[0]


def _save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _load_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _atomic_write(directory: str | os.PathLike, writers: dict) -> None:
    """Write every file to a temp file in `directory` first; only when all are written, move
    each into place with os.replace. On failure the temp files go and the old files stay."""
    temps = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            temps[name] = tmp
            write(tmp)
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(directory, name))
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
