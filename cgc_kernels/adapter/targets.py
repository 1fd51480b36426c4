"""Which modules of a model CGC-LoRA adapts: PEFT's target_modules matching rule."""

from __future__ import annotations

import re

from torch import nn

from .layer import _is_transposed


def module_matches(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex string must fullmatch the module path; a list entry matches the path
    itself or its tail after a dot ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_transposed(module)

