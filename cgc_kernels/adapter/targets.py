"""Which modules of a model CGC-LoRA adapts: PEFT's target_modules rules.

    ["q_proj", "v_proj"]   each entry matches a module path or its tail after a dot; every entry
                           must match at least one module (a typo is an error, not a skipped entry)
    r".*\\.(q|v)_proj"     one regex string, re.fullmatch against full module paths
    "all-linear"           every nn.Linear / Conv1D but the output head (get_output_embeddings)
    None                   PEFT's default for the model's architecture (config.model_type), read
                           from peft.utils.constants: peft must be installed

Errors list the model's linear module tails (deduplicated, in model order), so the fix is in sight.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .layer import _is_transposed

ALL_LINEAR = "all-linear"


def module_matches(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch the module path; a list entry matches the path
    itself or its tail after a dot ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(_entry_matches(name, t) for t in target_modules)


def _entry_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_transposed(module)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full paths of every linear-like module (nn.Linear and its subclasses such as bitsandbytes'
    layers, GPT-2's Conv1D), in model order."""
    return [name for name, m in model.named_modules() if name and is_adaptable(m)]


def linear_tails(model: nn.Module) -> list[str]:
    """The deduplicated last components of the linear module paths ("q_proj", "lm_head", ...)."""
    return list(dict.fromkeys(n.rpartition(".")[2] for n in linear_module_names(model)))


def output_head_name(model: nn.Module) -> str | None:
    """Path of the model's output embedding (the LM head), which "all-linear" leaves out."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's LoRA target modules for the model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        raise ValueError(
            "target_modules=None means PEFT's default modules for the architecture, which needs peft "
            f"(pip install peft); or name them, e.g. target_modules={ALL_LINEAR!r} or a list of: "
            f"{', '.join(linear_tails(model))}"
        ) from None
    targets = mapping.get(model_type)
    if targets is None:
        raise ValueError(
            f"PEFT has no default target modules for model type {model_type!r}; set target_modules, "
            f"e.g. {ALL_LINEAR!r} or a list of: {', '.join(linear_tails(model))}"
        )
    return targets if isinstance(targets, str) else list(targets)


def resolve_target_modules(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Full paths of the modules to adapt, in model order; ValueError naming the problem (and the
    model's linear module tails) when nothing, or not every list entry, matches, or when a match
    is not a linear layer."""
    kind = type(model).__name__
    if target_modules is None:
        target_modules = default_target_modules(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = output_head_name(model)
        names = [n for n in linear_module_names(model) if n != head]
        if not names:
            raise ValueError(f"{kind} has no linear module other than its output head for {ALL_LINEAR!r}")
        return names
    names = [name for name, _ in model.named_modules() if name and module_matches(name, target_modules)]
    candidates = f"its linear modules are: {', '.join(linear_tails(model))}"
    if not names:
        raise ValueError(f"no module of {kind} matches target_modules={target_modules!r}; {candidates}")
    if not isinstance(target_modules, str):
        unmatched = [t for t in target_modules if not any(_entry_matches(n, t) for n in names)]
        if unmatched:
            raise ValueError(f"target_modules entries {unmatched} match no module of {kind}; {candidates}")
    bad = [n for n in names if not is_adaptable(model.get_submodule(n))]
    if bad:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in bad})
        raise ValueError(f"target_modules matched modules that are not nn.Linear or Conv1D: {bad[:4]} "
                         f"({', '.join(kinds)}); narrow target_modules ({candidates})")
    return names


def summarize_targets(names: list[str]) -> str:
    """One line: how many modules are adapted, and of which kinds ("8 modules: q_proj x2, ...")."""
    counts = Counter(n.rpartition(".")[2] for n in names)
    kinds = ", ".join(f"{tail} x{n}" if n > 1 else tail for tail, n in counts.items())
    return f"{len(names)} module{'s' if len(names) != 1 else ''}: {kinds}"
