"""Run a module or script with accelerate's FSDP on CPU processes (gloo), for the tests.

    ACCELERATE_USE_CPU=true accelerate launch --config_file fsdp2.yaml tests/cpu_fsdp_launch.py -m cgc_kernels.cli train ...

accelerate turns an FSDP config into FSDP only on accelerator devices (CUDA, XPU, NPU, ...): on CPU
processes its state stays MULTI_CPU and the run is plain DDP, whatever the config says. This shim
makes accelerate's state FSDP when the launcher asked for it (ACCELERATE_USE_FSDP) and the
processes are CPU ones, then runs the target as `python -m` / `python script` would, so the code
under test goes through accelerate's own FSDP2 path (fsdp2_prepare_model, Trainer's FSDP save and
load) over gloo. On GPUs the same config needs no shim.
"""

from __future__ import annotations

import os
import runpy
import sys


def _patch_accelerate() -> None:
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def main() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _patch_accelerate()
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
