"""The CGC-LoRA op: the spec (`reference`), input checks, routing, the backends and their dispatch.

Knows nothing of modules or models; `adapter` builds on it."""

from . import reference
from .dispatch import cgc_lora
from .routing import TaskRouting, build_routing

__all__ = ["TaskRouting", "build_routing", "cgc_lora", "reference"]
