"""The `cgc-lora train` command, a CGCTrainer script and a CGCSFTTrainer (TRL) script in one
process, for tests/cli/test_distributed_launch.py.

    accelerate launch --config_file ddp.yaml tests/launch_shim.py tests/launch_worker.py \
        --data rows.jsonl --out DIR --batch-size 4 --report report.json

Run under a launcher (each rank runs this), or imported by the test for the single-process runs
at twice the batch. It writes DIR/cmd (the command's output), DIR/trainer and DIR/sft (CGCTrainer's
and CGCSFTTrainer's save_model after 2 steps), and rank 0 writes a JSON report: the world size the
Trainers saw, and under FSDP2 which modules were sharded on their own and whether the adapter
was sharded.

The CGCTrainer and CGCSFTTrainer scripts are what a user writes: a seeded CGCModel over a float64
base (float64 experts, float32 gates: FSDP2 must put the gates in groups of their own, or it
refuses the mixed dtypes), trained and saved with no distributed code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package under test

STEPS = 2
TRAINING = dict(max_steps=STEPS, learning_rate=1e-2, warmup_steps=0, save_steps=1, report_to=[], seed=0,
                disable_tqdm=True, logging_steps=1)


def command_argv(data: str, out: str, batch_size: int, *extra: str) -> list[str]:
    return ["train", "--tiny", "--data", data, "--out", out, "--steps", str(STEPS), "--batch-size",
            str(batch_size), "--warmup-steps", "0", "--save-steps", "1", "--rank", "4", "--seed", "0", *extra]


def fresh_cgc(tasks: list[str], dtype: str):
    """A seeded CGCModel over a fresh tiny `dtype` base, as a user's script builds it; and the tokenizer."""
    import torch
    from transformers import set_seed

    from cgc_kernels import CGCLoRAConfig, CGCModel
    from cgc_kernels.multitask.models import tiny_model

    base, tokenizer = tiny_model()
    set_seed(0)
    config = CGCLoRAConfig(tasks=tasks, num_shared_experts=2, num_task_experts=1, rank=4, alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    return CGCModel(base.to(getattr(torch, dtype)), config), tokenizer


def train_cgctrainer(data: str, out: str, batch_size: int, dtype: str = "float64"):
    """2 steps of CGCTrainer on a fresh tiny CGCModel over a `dtype` base, then save_model(out);
    returns the trainer. (DeepSpeed ZeRO-3 flattens every trainable parameter into one dtype: it
    refuses float64 experts beside float32 gates, so its runs use a float32 base.)"""
    from transformers import TrainingArguments

    from cgc_kernels.adapter.trainer import CGCTrainer
    from cgc_kernels.data.reader import read_jsonl, tasks_of
    from cgc_kernels.multitask.recipe import encode_for_trainer

    rows = read_jsonl(data)
    tasks = tasks_of(rows)
    cgc, tokenizer = fresh_cgc(tasks, dtype)
    args = TrainingArguments(output_dir=os.path.join(out, "checkpoints"), per_device_train_batch_size=batch_size,
                             remove_unused_columns=False, **TRAINING)
    trainer = CGCTrainer(model=cgc, args=args, processing_class=tokenizer,
                         train_dataset=encode_for_trainer(tokenizer, rows, tasks, None, 64))
    trainer.train()
    trainer.save_model(out)
    return trainer


def train_sft(data: str, out: str, batch_size: int, dtype: str = "float64"):
    """The same with TRL: 2 steps of CGCSFTTrainer on the rows as TRL's prompt/completion format
    with a `task` column (TRL tokenizes them), then save_model(out); returns the trainer."""
    from datasets import Dataset
    from trl import SFTConfig

    from cgc_kernels import CGCSFTTrainer
    from cgc_kernels.data.reader import read_jsonl, tasks_of

    rows = read_jsonl(data)
    cgc, tokenizer = fresh_cgc(tasks_of(rows), dtype)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"], "task": r["task"]} for r in rows])
    args = SFTConfig(output_dir=os.path.join(out, "checkpoints"), per_device_train_batch_size=batch_size,
                     max_length=64, bf16=False, **TRAINING)
    trainer = CGCSFTTrainer(model=cgc, args=args, processing_class=tokenizer, train_dataset=dataset)
    trainer.train()
    trainer.save_model(out)
    return trainer


def fsdp_facts(model) -> dict:
    """Which modules FSDP2 sharded on their own, and whether every trainable parameter is sharded."""
    from torch.distributed.fsdp import FSDPModule

    from cgc_kernels.adapter.gates import TaskGate

    gates = [m for m in model.modules() if isinstance(m, TaskGate)]
    blocks = list(model.model.model.layers)
    return dict(gates=len(gates), gates_sharded_alone=sum(isinstance(g, FSDPModule) for g in gates),
                blocks=len(blocks), blocks_sharded_alone=sum(isinstance(b, FSDPModule) for b in blocks),
                adapter_dtensors=all(type(p).__name__ == "DTensor" for p in model.parameters() if p.requires_grad))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--trainer-dtype", default="float64")
    a = ap.parse_args()

    from cgc_kernels.cli import main as cli_main

    rc = cli_main(command_argv(a.data, os.path.join(a.out, "cmd"), a.batch_size))
    trainer = train_cgctrainer(a.data, os.path.join(a.out, "trainer"), a.batch_size, a.trainer_dtype)
    sft = train_sft(a.data, os.path.join(a.out, "sft"), a.batch_size, a.trainer_dtype)
    report = dict(command_rc=rc, world_size=trainer.args.world_size, fsdp=trainer.is_fsdp_enabled,
                  deepspeed=trainer.is_deepspeed_enabled,
                  sft_world_size=sft.args.world_size, sft_fsdp=sft.is_fsdp_enabled)
    if trainer.is_fsdp_enabled:
        report.update(fsdp_facts(trainer.model))
    if os.environ.get("RANK", "0") == "0":
        with open(a.report, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
