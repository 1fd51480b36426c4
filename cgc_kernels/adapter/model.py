"""CGCModel: CGC-LoRA injected into a transformers model (the 1+N pattern end to end).

    cgc = CGCModel(model, CGCLoRAConfig(tasks=["qa", "sum"], target_modules=["q_proj", "v_proj"]))
    loss = cgc(input_ids=ids, labels=ids, task_ids=tids).loss     # tids [batch], [batch, seq] or names
    out = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=tids, max_new_tokens=32)

How task ids reach the layers without touching the model's code: every matched linear module is
replaced, on this model instance, by a CGCLoRALinear wrapping it. For the duration of a forward
(or a whole `generate`), a forward pre-hook on the base model sets a TaskRouting of the request's
task ids as `current_routing` on every adapted layer for each base-model call (ids expanded to the
call's [batch, seq]; during cached decoding seq is 1, with beams the batch is repeated), one per
call shape, built at its first call and outside torch.compile, so the decode steps of a generate
share one and a compiled step is one graph that reads it (task_ids.py); leaving the context clears
it, also on exceptions. Gradient checkpointing reruns layers during the backward, after that
context has closed: checkpointing.py carries the routing into the recomputation. Calls without task
ids use the active task (`set_task`, `with cgc.task(name)`), which is how transformers' pipelines
and third-party evaluation code call it.

1+N: the model holds an ordered list of clusters (plug-in CGC-LoRA modules), each with its own
tasks, S shared experts per layer and its own task gates. The global task list is the clusters'
task lists concatenated; every layer holds all clusters stacked (shared_a [C, S*r, d_in]), so a
batch mixing tasks of several clusters is one op call per layer. Adding or removing a cluster
rebuilds the layers, copying the remaining experts and gates.

The concerns live in files of their own, mixed into CGCModel: task ids, task selection and routing
(task_ids.py), target modules (targets.py), checkpointing (checkpointing.py), clusters
(clusters.py), merge and export (merge.py), save and load (save_load.py); the transformers.Trainer
integration is trainer.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import replace

import torch
from torch import nn

from .checkpointing import CheckpointingMixin
from .clusters import DEFAULT_CLUSTER, ClustersMixin, split_config
from .config import CGCLoRAConfig
from .gate_report import GateTable, gate_table
from .gates import StackedTaskGate, TaskGate, TokenGate
from .layer import CGCLoRALinear, base_layer_features
from .merge import MergeExportMixin
from .quantized import guard_quantized_layers
from .save_load import SaveLoadMixin
from .targets import resolve_target_modules
from .task_ids import LayerRouting, TaskIdsMixin, TaskRequest, check_input_rank
from .trl_support import TRLMixin


class _QuietPipelineCheck(logging.Filter):
    """transformers.pipeline checks the model's class name against the classes it knows and, for a
    CGCModel, logs that whole list (~5 KB) as an error; the pipeline runs all the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The model 'CGCModel' is not supported")


logging.getLogger("transformers.pipelines.base").addFilter(_QuietPipelineCheck())

LOW_PRECISION = (torch.float16, torch.bfloat16)


class CGCModel(TaskIdsMixin, CheckpointingMixin, ClustersMixin, MergeExportMixin, SaveLoadMixin, TRLMixin,
               nn.Module):
    """A transformers model with CGC-LoRA in its `target_modules`; everything else frozen.

    Args:
        model: a transformers model (decoders with nn.Linear or GPT-2's Conv1D projections). It is
            modified in place (modules replaced); `unload()` puts the original modules back.
        config: the CGC-LoRA configuration; `config.clusters` may split the tasks into clusters.
        backend: force the op's backend ("reference" / "triton"); None picks by device.
        autocast_adapter_dtype: keep the experts in float32 over a float16 / bfloat16 base (PEFT's
            default and name); False keeps them in the base weights' dtype. Gates are float32 always.
    """

    def __init__(self, model: nn.Module, config: CGCLoRAConfig, *, backend: str | None = None,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        if not isinstance(config, CGCLoRAConfig):
            raise ValueError(f"config must be a CGCLoRAConfig, got {type(config).__name__}")
        if any(isinstance(m, CGCLoRALinear) for m in model.modules()):
            raise ValueError("model already holds CGC-LoRA layers (unload() the other CGCModel first)")
        self.model = model
        self.backend = backend
        self.autocast_adapter_dtype = bool(autocast_adapter_dtype)
        self._active_task: str | None = None  # set_task / task(): what calls without task_ids use
        self._adapter_disabled = False  # inside disable_adapter()
        self._clusters: OrderedDict[str, CGCLoRAConfig] = split_config(config)
        self._request: TaskRequest | None = None
        self._routing = LayerRouting(self.adapted_layers)  # what the layers read during a call
        self._cluster_index_cache: dict[torch.device, torch.Tensor] = {}
        self._model_gates: dict[str, TaskGate] = {}  # gate_scope="model": one TaskGate per cluster

        self._layer_names = resolve_target_modules(model, config.target_modules)
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

    @property
    def targeted_module_names(self) -> list[str]:
        """Full paths of the adapted modules, in model order (PEFT's name)."""
        return list(self._layer_names)

    def _set_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def _build_layers(self) -> None:
        """(Re)build every adapted layer for the current clusters, keeping the experts and gates
        of clusters and tasks that existed before (matched by name)."""
        cfg = self._shared_config
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
            old_tasks = list(old.task_names) if old is not None else []
            old_clusters = list(old.cluster_names) if old is not None else []
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
                gate=gate, backend=self.backend, task_names=tasks, cluster_names=list(self._clusters),
            )
            if self.autocast_adapter_dtype:
                for p in (layer.shared_a, layer.shared_b, layer.task_a, layer.task_b):
                    if p.dtype in LOW_PRECISION:
                        p.data = p.data.float()  # PEFT's default: small updates accumulate in fp32
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
        if torch.is_grad_enabled() and self.model.training:
            self._carry_routing_into_checkpoints()  # checkpointing may have been enabled on the base
        with self.task_context(request):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task_ids=None, **kwargs):
        """`model.generate` with one task per sequence ([batch] ids or names); rows of different
        tasks share one batch. Beams and num_return_sequences repeat each row's task. Without
        task_ids, the active task (`set_task`)."""
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("CGCModel.generate needs input_ids or inputs_embeds")
        check_input_rank(x, input_ids is not None, "CGCModel.generate")
        request = self.resolve_task_ids(task_ids, x.shape[0])
        if not request.per_sequence:
            raise ValueError("generate takes one task per sequence: task_ids must be [batch], not per token")
        with self.task_context(request):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

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

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def can_generate(self) -> bool:
        """What transformers' pipelines ask before calling `generate`."""
        can = getattr(self.model, "can_generate", None)
        return bool(can()) if callable(can) else hasattr(self.model, "generate")

    @property
    def dtype(self) -> torch.dtype:
        """The base model's dtype (its first floating parameter's; the adapters may be float32)."""
        if "dtype" in dir(type(self.model)):
            return self.model.dtype
        return next(p.dtype for p in self.model.parameters() if p.dtype.is_floating_point)

    @property
    def name_or_path(self) -> str | None:
        return getattr(self.model, "name_or_path", None)

    @property
    def _no_split_modules(self) -> list[str]:
        """What FSDP auto-wrap shards on its own (accelerate's TRANSFORMER_BASED_WRAP reads it):
        the float32 gates, then the base model's decoder block (sharding.fsdp_wrap_classes)."""
        from .sharding import fsdp_wrap_classes

        return fsdp_wrap_classes(self)

    # ---- PEFT's calls ------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The wrapped transformers model (with the CGC-LoRA layers in it)."""
        return self.model

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the CGC-LoRA layers in it), as PEFT's."""
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as PEFT counts them (a bitsandbytes
        4-bit parameter packs two values per byte of its storage)."""
        trainable = total = 0
        for p in self.model.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":
                n *= 2 * (p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count over the wrapped model (adapters included)."""
        count = getattr(self.model, "num_parameters", None)
        if callable(count):
            return count(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not only_trainable)

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (for reentrant checkpointing of a
        frozen base, as PEFT and transformers do)."""
        self.model.enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        self.model.disable_input_require_grads()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, every call is the base model exactly: each adapted layer returns its base
        layer's output and task_ids are ignored (none needed)."""
        if self._adapter_disabled:  # nested: the outer context restores
            yield
            return
        layers = list(self.adapted_layers().values())
        if any(layer.merged_task is not None for layer in layers):
            raise ValueError("a task is merged into the base weights; unmerge before disable_adapter()")
        self._adapter_disabled = True
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            self._adapter_disabled = False
            for layer in layers:
                layer.disable_adapters = False

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
        self._release()
        return self.model

    def _release(self) -> None:
        """Hand the base model back: no hooks or routing carriers, requires_grad as it was."""
        for handle in self._quantized_hooks:
            handle.remove()
        self._quantized_hooks = []
        self._remove_routing_carriers()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        self._layer_names = []
