"""cgc_kernels: CGC-LoRA for the 1+N multi-task fine-tuning pattern, with fused Triton kernels."""

from . import reference
from .collator import CGCDataCollator
from .config import CGCLoRAConfig
from .gates import StackedTaskGate, TaskGate, TokenGate
from .layer import CGCLoRALinear
from .model import CGCModel
from .ops.function import cgc_lora
from .routing import TaskRouting, build_routing

__version__ = "0.1.0"

__all__ = [
    "CGCDataCollator",
    "CGCLoRAConfig",
    "CGCLoRALinear",
    "CGCModel",
    "StackedTaskGate",
    "TaskGate",
    "TaskRouting",
    "TokenGate",
    "build_routing",
    "cgc_lora",
    "reference",
]
