"""cgc_kernels: CGC-LoRA for the 1+N multi-task fine-tuning pattern, with fused Triton kernels."""

from . import reference
from .collator import CGCDataCollator
from .config import CGCLoRAConfig
from .gate_report import GateTable, gate_table, shared_specific_split, write_gate_report
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
    "GateTable",
    "StackedTaskGate",
    "TaskGate",
    "TaskRouting",
    "TokenGate",
    "build_routing",
    "cgc_lora",
    "gate_table",
    "reference",
    "shared_specific_split",
    "write_gate_report",
]
