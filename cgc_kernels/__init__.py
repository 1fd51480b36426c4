"""cgc_kernels: CGC-LoRA for the 1+N multi-task fine-tuning pattern, with fused Triton kernels.

Four layers, each importing only itself and the layers below: `op` (the op and its kernels) <
`adapter` (CGC-LoRA in transformers models) < `multitask` (clustering, comparison, the recipe) <
`cli` (the `cgc-lora` command); `data` (data files, encoding) sits beside `adapter`. This module
re-exports the public names of `op`, `adapter` and `data`.
"""

from .adapter.collator import CGCDataCollator
from .adapter.config import CGCLoRAConfig
from .adapter.gate_report import (
    GateMovement,
    GateTable,
    gate_movement,
    gate_snapshot,
    gate_table,
    shared_specific_split,
    write_gate_report,
)
from .adapter.gates import StackedTaskGate, TaskGate, TokenGate
from .adapter.layer import CGCLoRALinear
from .adapter.model import CGCModel
from .adapter.param_groups import gate_parameters, parameter_groups
from .data.encode import encode_dataset
from .op import reference
from .op.dispatch import cgc_lora
from .op.routing import TaskRouting, build_routing

__version__ = "0.1.0"


def __getattr__(name: str):
    # CGCTrainer imports transformers.Trainer (and accelerate), CGCSFTTrainer TRL: only when asked for.
    if name == "CGCTrainer":
        from .adapter.trainer import CGCTrainer

        return CGCTrainer
    if name == "CGCSFTTrainer":
        from .adapter.sft import CGCSFTTrainer

        return CGCSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CGCDataCollator",
    "CGCLoRAConfig",
    "CGCLoRALinear",
    "CGCModel",
    "CGCSFTTrainer",
    "CGCTrainer",
    "GateMovement",
    "GateTable",
    "StackedTaskGate",
    "TaskGate",
    "TaskRouting",
    "TokenGate",
    "build_routing",
    "cgc_lora",
    "encode_dataset",
    "gate_movement",
    "gate_parameters",
    "gate_snapshot",
    "gate_table",
    "parameter_groups",
    "reference",
    "shared_specific_split",
    "write_gate_report",
]
