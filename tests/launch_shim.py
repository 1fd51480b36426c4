"""Run a module or script under a launcher for tests/cli/test_distributed_launch.py: record which rank
writes what, and let accelerate's FSDP and DeepSpeed configs run on CPU processes.

    ACCELERATE_USE_CPU=true accelerate launch --config_file fsdp2.yaml tests/launch_shim.py -m cgc_kernels.cli train ...
    torchrun --nproc_per_node 2 tests/launch_shim.py -m cgc_kernels.cli train ...

* With CGC_TEST_WRITERS=FILE, every adapter save (CGCModel.save_pretrained) and every output commit
  (output._commit: the rename that makes an output folder) appends "RANK save|commit PATH" to FILE,
  so the test counts the processes that wrote.
* accelerate turns an FSDP or DeepSpeed config into that engine only on accelerator devices (CUDA,
  XPU, NPU, ...): on CPU processes its state stays MULTI_CPU and the run is plain DDP, whatever the
  config says. When the launcher asked for FSDP (ACCELERATE_USE_FSDP) or DeepSpeed
  (ACCELERATE_USE_DEEPSPEED), this makes accelerate's state that engine for CPU processes, so the
  code under test goes through accelerate's own path (fsdp2_prepare_model / deepspeed.initialize,
  Trainer's save and load) over gloo. On GPUs the same config needs no shim.

Then it runs the target as `python -m MODULE ...` / `python SCRIPT ...` would, and leaves without
the interpreter's finalization (exit_skipping_finalization).
"""

from __future__ import annotations

import os
import runpy
import sys


def _engine_on_cpu(plugin_arg: str, engine: str) -> None:
    """Make accelerate's state `engine` (FSDP / DEEPSPEED) where it would stay MULTI_CPU although
    the launcher gave it that engine's plugin."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get(plugin_arg)
        if plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        self.distributed_type = DistributedType[engine]
        PartialState._shared_state["distributed_type"] = self.distributed_type
        if engine == "FSDP":
            self.fsdp_plugin = plugin
        else:  # what AcceleratorState does for DeepSpeed on an accelerator
            plugin.set_mixed_precision(self._mixed_precision)
            plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = plugin

    AcceleratorState.__init__ = init


def _record_writes(log: str) -> None:
    from cgc_kernels.adapter.save_load import SaveLoadMixin
    from cgc_kernels.cli import output

    rank = os.environ.get("RANK", "0")

    def note(what: str, path) -> None:
        with open(log, "a") as f:
            f.write(f"{rank} {what} {os.path.abspath(path)}\n")

    save, commit = SaveLoadMixin.save_pretrained, output._commit

    def save_pretrained(self, directory, *args, **kwargs):
        note("save", directory)
        return save(self, directory, *args, **kwargs)

    def _commit(tmp, final, kind):
        note("commit", final)
        return commit(tmp, final, kind)

    SaveLoadMixin.save_pretrained, output._commit = save_pretrained, _commit


def exit_skipping_finalization(code: int | str | None) -> None:
    """Leave with `code` as sys.exit would, but without finalizing the interpreter.

    After DistributedDataParallel or fully_shard, torch 2.13's gloo process group outlives
    destroy_process_group (its worker threads keep running), and a worker thread that frees its last
    collective's work once finalization has begun needs the GIL, cannot get it and aborts the process
    ("terminate called without an active exception", SIGABRT). The work under test is done and
    written by then. Measured (a two-process gloo DDP step, 8 launches at a time on 2 cores): 6 aborts
    in 160 launches exiting normally, 0 in 160 exiting here.
    """
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _engine_on_cpu("fsdp_plugin", "FSDP")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _engine_on_cpu("deepspeed_plugin", "DEEPSPEED")
    if os.environ.get("CGC_TEST_WRITERS"):
        _record_writes(os.environ["CGC_TEST_WRITERS"])
    args = sys.argv[1:]
    code = None
    try:
        if args[:1] == ["-m"]:
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
    exit_skipping_finalization(code)


if __name__ == "__main__":
    main()
