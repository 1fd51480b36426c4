"""What a CGCModel needs under several processes (torchrun, accelerate launch): the same adapter
on every rank, FSDP2 groups of one dtype, and whole tensors to save or load when FSDP2 or
DeepSpeed ZeRO-3 shards them.

    broadcast_adapter(cgc)              # rank 0's experts and gates on every rank (before wrapping)
    with whole_adapter(cgc):            # on every rank: sharded adapter tensors gathered whole
        if rank == 0:
            cgc.save_pretrained(out)
    with whole_adapter(cgc, write_back=True):   # on every rank: load, then shard back
        cgc._load_adapter_tensors(tensors, cgc.clusters)

FSDP2 keeps each trainable parameter as a DTensor holding this rank's shard. `whole_adapter`
gathers only the trainable parameters (the adapter, a small fraction of the model), not the frozen
base, so a save costs no more memory than the adapter itself.

Auto-wrap: `fsdp_wrap_classes` names the modules FSDP2 should shard on their own: the task gates
(float32 whatever the base dtype: FSDP2 flattens one dtype per group, and a model-wide gate sits
in every layer, so it must be a group of its own) and the base model's decoder block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .gates import TaskGate, TokenGate

GATE_CLASSES = (TaskGate, TokenGate)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "device_mesh") and hasattr(t, "full_tensor")


def _trainable(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every trainable parameter, each once, in module order (the
    same order on every rank, which the collectives below rely on)."""
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield module, name, p


@torch.no_grad()
def broadcast_adapter(model: nn.Module, device: torch.device | None = None) -> int:
    """Copy rank 0's trainable parameters to every rank (a collective: call it on every rank, before
    the model is wrapped). Returns how many tensors were sent (0 without a process group). Ranks
    that initialised their experts from different random states then train the same adapter.
    `device`: where the collective runs (NCCL needs CUDA tensors); default the tensors' own."""
    if not _distributed():
        return 0
    import torch.distributed as dist

    sent = 0
    for _, _, p in _trainable(model):
        if _is_dtensor(p) or hasattr(p, "ds_id"):
            continue  # already sharded by FSDP2 / DeepSpeed ZeRO-3: one adapter across ranks
        t = p.data if device is None or p.device == device else p.data.to(device)
        dist.broadcast(t, src=0)
        if t is not p.data:
            p.data.copy_(t)
        sent += 1
    return sent


@contextlib.contextmanager
def whole_adapter(model: nn.Module, *, write_back: bool = False) -> Iterator[None]:
    """Inside, every trainable parameter that FSDP2 or DeepSpeed ZeRO-3 shards is a whole tensor
    on every rank (gathered on entry: call it on every rank); the frozen base stays sharded. With
    `write_back`, what was written into them is sharded back into the live parameters on exit
    (ZeRO-3: rank 0's). Without sharding it does nothing. No forward may run inside."""
    zero3 = [p for _, _, p in _trainable(model) if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if write_back else None):
            yield
        return
    _reshard(model)
    swapped = []
    for module, name, p in list(_trainable(model)):
        if _is_dtensor(p):
            whole = p.detach().full_tensor()
            whole = whole.wait() if hasattr(whole, "wait") else whole  # a plain tensor, not an async one
            whole = nn.Parameter(whole, requires_grad=True)
            module._parameters[name] = whole
            swapped.append((module, name, p, whole))
    try:
        yield
    finally:
        for module, name, p, whole in swapped:
            if write_back:
                from torch.distributed.tensor import distribute_tensor

                with torch.no_grad():
                    shard = distribute_tensor(whole.detach().to(p.dtype), p.device_mesh, p.placements,
                                              src_data_rank=None)  # every rank holds the whole tensor
                    p.to_local().copy_(shard.to_local())
            module._parameters[name] = p


def _reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back in place: a module whose parameters a forward left
    unsharded (reshard_after_forward=False, the root's default) registers whole tensors whose
    storage FSDP2 frees when it reshards. Local, no collective."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Class names of the modules to shard on their own (accelerate's TRANSFORMER_BASED_WRAP reads
    them from `_no_split_modules`): the gate classes the model holds, then the base model's decoder
    blocks (its own `_no_split_modules`)."""
    present = {type(m).__name__ for m in model.modules()}
    gates = [c.__name__ for c in GATE_CLASSES if c.__name__ in present]
    inner = getattr(getattr(model, "model", None), "_no_split_modules", None) or []
    return gates + [name for name in inner if name in present and name not in gates]
