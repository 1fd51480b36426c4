"""One training step of CGCModel under torch.distributed, run by torchrun from tests/adapter/test_distributed.py.

    torchrun --nproc_per_node=2 tests/distributed_worker.py --out result.json [--backend reference]

Two processes (gloo, CPU). Each rank builds the same tiny random Llama with the same CGC-LoRA
adapters, takes its half of a mixed-task batch (every sequence the same length, so the mean loss
over each half averages to the mean over the whole batch), and runs one step:

  ddp:    DistributedDataParallel; the all-reduced gradients must equal a single-process step on
          the whole batch, and after one SGD step every rank must hold the same adapter weights.
  broadcast: ranks whose adapters differ (rank 1's moved by +1) hold rank 0's after
          sharding.broadcast_adapter (what CGCTrainer.train does first);
  fsdp2:  torch.distributed.fsdp.fully_shard on each task gate, each decoder layer and the root;
          the gathered gradients must equal the single-process ones as well, and a checkpoint saved
          after the step (unshard, save on rank 0) must load as the single-process step's weights
          (skipped, with the reason, where this torch cannot shard on CPU with gloo).

Rank 0 writes a JSON report to --out; the test reads it. float64 throughout, so "equal" means
within 1e-10 (sums in another order, nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package under test

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cgc_kernels import CGCLoRAConfig, CGCModel  # noqa: E402
from tests.cases import TOLERANCES  # noqa: E402
from tests.launch_shim import exit_skipping_finalization  # noqa: E402
from tests.models import randn_trainable  # noqa: E402

# Rank 0 gets the first half, rank 1 the second. Rank 1 has no token of task 2 ("cls", alone in
# cluster "b"): its experts still get a (zero) gradient there, or DDP would wait for it forever.
TASK_IDS = [0, 1, 2, -1, 1, 0, 1, -1]
BATCH, SEQ, VOCAB = len(TASK_IDS), 10, 96


def build(backend: str | None) -> CGCModel:
    """The same model on every rank: a fixed seed for the base, random B and gates for the adapters."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    cgc = CGCModel(base.double(), CGCLoRAConfig(
        tasks=["qa", "sum", "cls"], clusters={"qa": "a", "sum": "a", "cls": "b"}, num_shared_experts=2,
        num_task_experts=1, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), backend=backend)
    randn_trainable(cgc, 0.2)
    return cgc


def batch(rows: slice | None = None) -> dict:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    tids = torch.tensor(TASK_IDS)
    if rows is not None:
        ids, tids = ids[rows], tids[rows]
    return dict(input_ids=ids, labels=ids, task_ids=tids)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare(grads: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    """Which gradients differ from the single-process ones beyond their dtype's tolerance (float64
    experts, float32 gates)."""
    missing = sorted(set(want) - set(grads))
    diffs = {n: float((grads[n] - want[n]).abs().max()) for n in want if n in grads}
    mismatched = sorted(n for n in diffs if not torch.allclose(grads[n], want[n], **TOLERANCES[want[n].dtype]))
    worst = max(diffs, key=diffs.get)
    return dict(n_grads=len(diffs), missing=missing, mismatched=mismatched, max_grad_diff=diffs[worst],
                worst=worst, max_grad=max(float(g.abs().max()) for g in want.values()))


def ranks_agree(params: dict[str, torch.Tensor]) -> bool:
    """Every rank holds the same values (rank 0's broadcast equals each rank's own)."""
    ok = torch.tensor(1)
    for p in params.values():
        mine = p.detach().clone()
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        if not torch.equal(mine, theirs):
            ok.zero_()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def run_ddp(backend, rows, want) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    cgc = build(backend)
    ddp = DDP(cgc)
    ddp(**batch(rows)).loss.backward()
    report = compare({n: p.grad for n, p in trainable(cgc).items() if p.grad is not None}, want)
    torch.optim.SGD(trainable(cgc).values(), lr=0.1).step()
    report["ranks_agree_after_step"] = ranks_agree(trainable(cgc))
    return report


def run_broadcast(backend) -> dict:
    from cgc_kernels.adapter.sharding import broadcast_adapter

    cgc = build(backend)  # rank 0's adapter; rank 1 moves its own away from it
    with torch.no_grad():
        for p in trainable(cgc).values():
            p.add_(float(dist.get_rank()))
    differed = not ranks_agree(trainable(cgc))
    sent = broadcast_adapter(cgc)
    rank0 = trainable(build(backend))
    equal_rank0 = all(torch.equal(p, rank0[n]) for n, p in trainable(cgc).items())
    return dict(differed_before=differed, sent=sent, n_trainable=len(rank0),
                agree_after=ranks_agree(trainable(cgc)), equal_rank0=equal_rank0)


def run_fsdp2(backend, rows, want, single_step, save_dir) -> dict:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        return dict(skipped=f"torch {torch.__version__} has no fully_shard: {e}")
    cgc = build(backend)
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        # FSDP2 flattens each group's parameters into one dtype: the task gates are float32 while the
        # base (and so the experts) is float64 here (bf16 in a real run), so each gate is its own group.
        for layer in cgc.adapted_layers().values():
            fully_shard(layer.gate, mesh=mesh)
        for layer in cgc.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(cgc, mesh=mesh)
    except Exception as e:  # this torch cannot shard on CPU / gloo
        return dict(skipped=f"fully_shard on CPU with gloo failed in torch {torch.__version__}: "
                            f"{type(e).__name__}: {e}")
    cgc(**batch(rows)).loss.backward()
    grads = {n: full(p.grad) for n, p in trainable(cgc).items() if p.grad is not None}
    report = compare(grads, want)
    torch.optim.SGD(trainable(cgc).values(), lr=0.1).step()
    report["ranks_agree_after_step"] = ranks_agree({n: full(p.detach()) for n, p in trainable(cgc).items()})
    # Saving: unshard every FSDP module (a collective, on all ranks) so the parameters are whole
    # tensors, save on rank 0, reshard. The saved adapters must equal a single-process SGD step.
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in cgc.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    if dist.get_rank() == 0:
        cgc.save_pretrained(save_dir)
    for m in sharded:
        m.reshard()
    dist.barrier()
    if dist.get_rank() == 0:
        loaded = CGCModel.from_pretrained(build(backend).unload(), save_dir, is_trainable=True)
        stepped = {n: p.detach() for n, p in trainable(loaded).items()}
        report["saved_equals_single_step"] = compare(stepped, single_step)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert BATCH % world == 0
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)

    single = build(args.backend)  # the single-process step on the whole batch, on every rank
    single(**batch()).loss.backward()
    want = {n: p.grad.clone() for n, p in trainable(single).items()}
    torch.optim.SGD(trainable(single).values(), lr=0.1).step()
    single_step = {n: p.detach().clone() for n, p in trainable(single).items()}

    report = dict(world=world, torch=torch.__version__)
    runs = (("ddp", lambda: run_ddp(args.backend, rows, want)),
            ("broadcast", lambda: run_broadcast(args.backend)),
            ("fsdp2", lambda: run_fsdp2(args.backend, rows, want, single_step, args.out + ".fsdp2_checkpoint")))
    for name, fn in runs:
        try:
            report[name] = fn()
        except Exception:
            report[name] = dict(error=traceback.format_exc())
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    exit_skipping_finalization(0)  # DDP's and FSDP2's gloo group outlives it: see there


if __name__ == "__main__":
    main()
