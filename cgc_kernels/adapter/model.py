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

The concerns live in files of their own, mixed into CGCModel: task ids and routing (task_ids.py),
clusters (clusters.py), merge and export (merge.py), save and load (save_load.py).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import replace

import torch
from torch import nn

from ..op.routing import TaskRouting
from .clusters import DEFAULT_CLUSTER, ClustersMixin, split_config
from .config import CGCLoRAConfig
from .gate_report import GateTable, gate_table
from .gates import StackedTaskGate, TaskGate, TokenGate
from .layer import CGCLoRALinear, base_layer_features
from .merge import MergeExportMixin
from .quantized import guard_quantized_layers
from .save_load import SaveLoadMixin
from .targets import is_adaptable, module_matches
from .task_ids import TaskIdsMixin, TaskRequest, check_input_rank


class CGCModel(TaskIdsMixin, ClustersMixin, MergeExportMixin, SaveLoadMixin, nn.Module):
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
        self._clusters: OrderedDict[str, CGCLoRAConfig] = split_config(config)
        self._request: TaskRequest | None = None
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
        bad = [n for n in self._layer_names if not is_adaptable(model.get_submodule(n))]
        if bad:
            kinds = sorted({type(model.get_submodule(n)).__name__ for n in bad})
            raise ValueError(f"target_modules matched modules that are not nn.Linear or Conv1D: {bad[:4]} "
                             f"({', '.join(kinds)}); narrow target_modules")
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._build_layers()
        # Quantized layers that no adapter wraps still have to pass gradients (see quantized.py).
        self._quantized_hooks = guard_quantized_layers(model, exclude=self._layer_names)

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
                gate = TokenGate(len(tasks), S + K, old.in_features if old else base_layer_features(base)[0])
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
        gate = TaskGate(cfg.num_tasks, cfg.num_experts, cfg.gate_embedding_dim, cfg.gate_init)
        device = next((p.device for p in self.model.parameters()), None)
        return gate.to(device) if device is not None else gate

    # ---- forward / generate --------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None, **kwargs):
        """The base model's forward with task ids: [batch] (per sequence), [batch, seq] (per token,
        e.g. packed sequences), task names, or one name/id; -1 = the base model for that row."""
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("CGCModel.forward needs input_ids or inputs_embeds")
        check_input_rank(x, input_ids is not None, "CGCModel.forward")
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
        check_input_rank(x, input_ids is not None, "CGCModel.generate")
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

    def gate_table(self) -> GateTable:
        """Every task's expert mixture as a table: `.weights` [T, L, S+K] (task x layer x expert;
        L = 1 for a model-wide gate), `.split()` the shared / task-specific share per task.
        Token gates: ValueError. See gate_report.py."""
        return gate_table(self)


    def unload(self) -> nn.Module:
        """Put the original modules back, restore requires_grad, and return the base model
        (without any adapter). This CGCModel is unusable afterwards."""
        for name in self._layer_names:
            layer = self.model.get_submodule(name)
            layer.unmerge()
            self._set_module(name, layer.base_layer)
        for handle in self._quantized_hooks:
            handle.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        model, self._layer_names = self.model, []
        return model
