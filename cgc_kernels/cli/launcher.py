"""The command under a launcher (torchrun, accelerate launch): one writer, one staging folder.

Every process runs the same command. Only the main process (global rank 0) stages and commits the
output folder (output.staged_output: a temporary sibling renamed into place at the end); the
others write into the same staging folder only what transformers' Trainer writes per rank (RNG
states, sharded optimizer states in checkpoints), so they get its path from the main process, and
the main process commits only once every rank is done. The output must therefore lie on a file
system every process sees (one machine, or a shared one).

    with launched_output(args.out, overwrite=..., inputs=...) as staging:
        ... train; every rank takes part in gathering the adapter ...
        if is_main_process():
            save into staging
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..data.reader import UserError
from .output import check_output, staged_output


def launch_world() -> tuple[int, int]:
    """(global rank, number of processes) that the launcher set (RANK, WORLD_SIZE); (0, 1) without one."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def is_main_process() -> bool:
    return launch_world()[0] == 0


def _process_group():
    """torch.distributed, its default process group initialised the way transformers' Trainer does
    it (accelerate's PartialState). On a machine without an accelerator the processes are CPU ones
    (gloo): ACCELERATE_USE_CPU is set for the Trainer too, which otherwise runs each process alone."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        accelerator = getattr(torch, "accelerator", None)
        if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
            os.environ["ACCELERATE_USE_CPU"] = "true"
        cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        PartialState(cpu=cpu, timeout=timedelta(seconds=1800))  # TrainingArguments' ddp_timeout
    return dist


def _share(value: str | None) -> str:
    """Rank 0's `value` on every rank."""
    dist = _process_group()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def launched_output(path: str, **kwargs) -> Iterator[str]:
    """staged_output(path, **kwargs) for a command that may run on several processes: every process
    checks the output first (the same one-line error everywhere), the main process stages it, and
    every process gets the staging folder's path; on a clean exit the main process commits once
    every rank is done. One process: staged_output itself."""
    rank, world = launch_world()
    if world == 1:
        with staged_output(path, **kwargs) as staging:
            yield staging
        return
    check_output(path, overwrite=kwargs.get("overwrite", False), inputs=kwargs.get("inputs", ()),
                 kind=kwargs.get("kind", "directory"), option=kwargs.get("option", "--out"))
    dist = _process_group()
    if rank != 0:
        staging = _share(None)
        yield staging
        dist.barrier()
        return
    with staged_output(path, **kwargs) as staging:
        _share(staging)
        yield staging
        dist.barrier()  # every rank is done with the staging folder before it becomes the output


def check_launch(trainer_world_size: int) -> None:
    """UserError if the launcher started several processes but the Trainer runs each on its own
    (each would train on all the data and write alone): accelerate made no process group of them."""
    _, world = launch_world()
    if world > 1 and trainer_world_size != world:
        raise UserError(f"launched as {world} processes, but transformers' Trainer runs each alone "
                        f"(world size {trainer_world_size}); for CPU processes set ACCELERATE_USE_CPU=true")
