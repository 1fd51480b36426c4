"""Saving and loading a CGCModel's adapter: cgc_config.json + cgc_adapter.safetensors, atomically.

Saved tensors are keyed by layer, kind and cluster or task name (`<layer>.task_a[<task>]`), so a
cluster saved from one model loads into another whatever the other clusters are.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import CONFIG_NAME, CGCLoRAConfig

if TYPE_CHECKING:
    from typing_extensions import Self

WEIGHTS_NAME = "cgc_adapter.safetensors"
# The weights file carries a copy of its config in its safetensors metadata: the two files are
# replaced one after the other, so only the weights file is replaced atomically as a whole.
CONFIG_METADATA_KEY = "cgc_config"


class SaveLoadMixin:
    """CGCModel's save / load verbs."""

    def _adapter_tensors(self, clusters: list[str]) -> dict[str, torch.Tensor]:
        """{key: tensor} of the adapter and gate weights of `clusters` (empty tensors left out)."""
        cfg = self._shared_config
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
        a crash mid-save leaves the previous files whole; the weights file, replaced last, embeds
        its config, so a crash between the two replacements still loads the previous checkpoint."""
        clusters = list(self._clusters) if clusters is None else list(clusters)
        unknown = [c for c in clusters if c not in self._clusters]
        if unknown or not clusters:
            raise ValueError(
                f"clusters to save must be a non-empty subset of {self.clusters}, got {clusters}"
            )
        config = self._config_of(clusters)
        tensors = {k: v.contiguous() for k, v in self._adapter_tensors(clusters).items()}
        os.makedirs(directory, exist_ok=True)
        # The weights file goes last: replacing it is the commit point (it carries its own config).
        atomic_write(directory, {
            CONFIG_NAME: lambda p: write_text(p, config.to_json_string()),
            WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={CONFIG_METADATA_KEY: config.to_json_string()}),
        })

    def save_cluster(self, name: str, directory: str | os.PathLike) -> None:
        """save_pretrained of one cluster: a plug-in module `load_cluster` adds to any base."""
        self.save_pretrained(directory, [name])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False,
                        backend: str | None = None, autocast_adapter_dtype: bool = True) -> Self:
        """Rebuild the CGCModel saved in `directory` on `model` (the same base architecture).

        As PEFT's: ready for inference by default (eval mode, every parameter frozen);
        `is_trainable=True` leaves the adapter and gate parameters trainable and the mode as the
        base model's (to continue training)."""
        config, tensors = read_checkpoint(directory)
        cgc = cls(model, config, backend=backend, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            cgc._load_adapter_tensors(tensors, cgc.clusters)
        except Exception:
            cgc.unload()  # leave the caller's model as it was
            raise
        if not is_trainable:
            cgc.eval()
            for p in cgc.parameters():
                p.requires_grad_(False)
        return cgc


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt", **(metadata or {})})


def load_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({key: tensor}, metadata) of a safetensors file; ValueError naming the file if it is damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_checkpoint(directory: str | os.PathLike) -> tuple[CGCLoRAConfig, dict[str, torch.Tensor]]:
    """(config, tensors) saved by save_pretrained in `directory`.

    The config comes from the weights file's own metadata when it has one: a save interrupted
    between replacing cgc_config.json and the weights leaves the previous weights whole, and they
    must be read with the config they were saved with, not the newer JSON file."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    tensors, metadata = load_file(path)
    if CONFIG_METADATA_KEY in metadata:
        return CGCLoRAConfig.from_json_string(metadata[CONFIG_METADATA_KEY]), tensors
    try:  # written before the config was embedded, or by hand
        return CGCLoRAConfig.from_pretrained(directory), tensors
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} is not valid JSON (truncated or "
                         f"corrupted?): {e}") from None


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def atomic_write(directory: str | os.PathLike, writers: dict) -> None:
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
