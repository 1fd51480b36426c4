"""Deploying one task: merged into a copy of the base model (merge_task) or into the base model
itself (merge_and_unload), or exported as a standard PEFT LoRA adapter."""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .layer import _is_transposed
from .quantized import dequantize_model_, dequantized_linear, model_activation_dtype
from .save_load import atomic_write, save_file, write_text
from .targets import ALL_LINEAR

# The LoRA ranks vLLM's engine accepts (its max_lora_rank must be one of these, and an adapter of
# a larger rank than max_lora_rank is refused): exports pad up to the next one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= `rank` (ValueError past the largest)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"rank {rank} exceeds the largest LoRA rank vLLM accepts ({VLLM_LORA_RANKS[-1]})")


class MergeExportMixin:
    """CGCModel's deployment verbs."""

    def _check_mergeable(self) -> None:
        if self._shared_config.gate == "token":
            raise ValueError("a token gate mixes experts per token, so a task has no single update: "
                             "it cannot be merged or exported as a LoRA adapter")

    @torch.no_grad()
    def merge_task(self, task: str | int, *, dequantize: bool = False) -> nn.Module:
        """A plain copy of the base model with `task`'s gate-weighted experts merged into its
        weights (no CGC layers, no overhead). The unified model is untouched; `merge_and_unload`
        does the same in place, without the copy.

        A quantized base (bitsandbytes 4-bit / int8) cannot take the update without rounding it
        away: ValueError, unless `dequantize=True`, which returns a full-precision model (every
        quantized linear layer replaced by an nn.Linear holding its dequantized weight, plus the
        task's update where adapted).

        A merged weight tied to another module (an LM head sharing the input embedding) is untied:
        the head gets the merged weight, the embedding keeps the original, and the config says
        `tie_word_embeddings=False`, so the model saves and reloads as merged."""
        t = self._check_merge(task, dequantize, "merge_task")
        return self._merge_into(copy.deepcopy(self.model), t, dequantize)

    @torch.no_grad()
    def merge_and_unload(self, task: str | int, *, dequantize: bool = False) -> nn.Module:
        """PEFT's merge_and_unload for one task, in place: `task` is folded into the base model's
        own weights, the CGC layers are removed, and the base model object itself is returned
        (no copy: memory stays that of one model). This CGCModel is unusable afterwards. Same
        rules as merge_task for quantized bases and tied weights."""
        t = self._check_merge(task, dequantize, "merge_and_unload")
        self._remove_routing_carriers()
        merged = self._merge_into(self.model, t, dequantize)
        self._release()
        return merged

    def _check_merge(self, task, dequantize: bool, verb: str) -> int:
        self._check_mergeable()
        t = self.task_index(task)
        if self._request is not None:
            raise RuntimeError(f"{verb} cannot run inside a forward")
        quantized = [n for n, layer in self.adapted_layers().items() if layer.quantized_base]
        if quantized and not dequantize:
            raise ValueError(
                f"cannot merge task {task!r} into a quantized base model ({quantized[0]} and "
                f"{len(quantized) - 1} other adapted layers hold 4-bit/int8 weights, and re-quantizing "
                f"the merged weights would round the update away); use export_peft_adapter(task, dir) "
                f"to serve the adapter on the quantized base, or {verb}(task, dequantize=True) for "
                f"a full-precision merged model"
            )
        merged = [n for n, layer in self.adapted_layers().items() if layer.merged_task is not None]
        if merged:
            raise ValueError(f"{merged[0]} already has a task merged into it; unmerge it first")
        return t

    def _merge_into(self, model: nn.Module, t: int, dequantize: bool) -> nn.Module:
        """Merge task t into `model` (self.model or a copy of it, holding CGC layers at the same
        paths) and put each layer's base layer back in its place."""
        tied = tied_parameter_ids(model)
        untied = False
        for name in self._layer_names:
            layer = model.get_submodule(name)
            if layer.quantized_base:
                base = dequantized_linear(layer.base_layer, model_activation_dtype(model), layer.get_delta_weight(t))
            else:
                untied = untied or id(layer.base_layer.weight) in tied
                # A new Parameter: a tied original stays with the other module. The layer is
                # dropped, so it keeps no copy of the original to unmerge to.
                layer.merge(t, keep_original=False)
                base = layer.base_layer
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)
        if dequantize:
            dequantize_model_(model)  # the layers no task adapts
        if untied:
            untie_in_config(model)
        for n, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        return model

    @torch.no_grad()
    def peft_adapter_state(self, task: str | int, *, rank: int | None = None,
                           base_model_name_or_path: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """(adapter_config dict, {key: tensor}) of `task` as a standard PEFT LoRA adapter of rank
        R = (S+K) r: A = [shared A of its cluster; its own A], B = [shared B; own B], each expert's
        B columns scaled by its gate weight; lora_alpha = s * R so PEFT's scaling is s.

        `rank` > R pads A with zero rows and B with zero columns (the same function, exactly: the
        padded rank components contribute 0 * 0); e.g. vllm_lora_rank(R) for a rank vLLM serves.
        `base_model_name_or_path` is recorded for loaders such as AutoPeftModelForCausalLM
        (default: the base model's config._name_or_path)."""
        self._check_mergeable()
        t = self.task_index(task)
        cfg = self._shared_config
        S, K, r = cfg.num_shared_experts, cfg.num_task_experts, cfg.rank
        R = (S + K) * r
        padded = R if rank is None else int(rank)
        if padded < R:
            raise ValueError(f"rank {rank} is below the adapter's rank (S+K)*r = {R}")
        tensors, conv1d = {}, False
        for name, layer in self.adapted_layers().items():
            c = int(layer.task_cluster[t])
            col = layer.task_gates()[t].repeat_interleave(r).to(layer.task_b.dtype)
            a = torch.cat([layer.shared_a[c], layer.task_a[t]], dim=0)
            b = torch.cat([layer.shared_b[c] * col[: S * r], layer.task_b[t] * col[S * r:]], dim=1)
            if padded > R:
                a = torch.cat([a, a.new_zeros(padded - R, a.shape[1])], dim=0)
                b = torch.cat([b, b.new_zeros(b.shape[0], padded - R)], dim=1)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().clone()
            conv1d = conv1d or _is_transposed(layer.base_layer)
        alpha = cfg.scaling * padded  # PEFT scales by lora_alpha / r: s whatever the padding
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": padded,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": cfg.dropout,
            # None and "all-linear" are resolved per model: name the modules this adapter holds
            "target_modules": (sorted({n.rpartition(".")[2] for n in self._layer_names})
                               if cfg.target_modules is None or cfg.target_modules == ALL_LINEAR
                               else cfg.target_modules),
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }
        return adapter_config, tensors

    def export_peft_adapter(self, task: str | int, directory: str | os.PathLike, *, rank: int | None = None,
                            base_model_name_or_path: str | None = None) -> None:
        """Write `task` as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
        that `peft.PeftModel.from_pretrained(base_model, directory)` loads as is; `rank` and
        `base_model_name_or_path` as in peft_adapter_state."""
        adapter_config, tensors = self.peft_adapter_state(task, rank=rank,
                                                          base_model_name_or_path=base_model_name_or_path)
        os.makedirs(directory, exist_ok=True)
        atomic_write(directory, {
            "adapter_model.safetensors": lambda p: save_file(tensors, p),
            "adapter_config.json": lambda p: write_text(p, json.dumps(adapter_config, indent=2)),
        })


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that sit in more than one module of `model` (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def untie_in_config(model: nn.Module) -> None:
    """Record in the model's config that its embeddings are no longer tied, so that
    save_pretrained writes both and from_pretrained does not tie them again."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text) and get_text() is not config:
        configs.append(get_text())
    for c in configs:
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
