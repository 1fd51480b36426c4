"""The `cgc-lora` command: 1+N multi-task fine-tuning of a causal LM with CGC-LoRA.

    cgc-lora demo                                   # SmolLM2-135M, four tasks, a few minutes on a CPU
    cgc-lora train --model M --data train.jsonl --out DIR [--clusters clusters.json] [--resume DIR] [options]
    cgc-lora export DIR --task NAME --out OUT [--peft | --merged]   # PEFT rank padded for vLLM
    cgc-lora export-base [DIR] --out BASE           # the base as a plain transformers folder (vLLM, PEFT)
    cgc-lora generate DIR --input prompts.jsonl [--output answers.jsonl [--resume]]   # batched across tasks
    cgc-lora inspect DIR [--out GATES]             # gate weights per task and layer
    cgc-lora cluster --data F --num-clusters N      # task affinity -> clusters.json for train --clusters
    cgc-lora compare                                # shared / per-task LoRA, MOELoRA, CGC-LoRA, equal budget
    cgc-lora bench                                  # the op on this device: reference, expert loop, fused

A trained directory holds the CGC-LoRA adapter (CGCModel.save_pretrained), the tokenizer,
cgc_cli.json (which base model it was trained on, its tasks and its system prompt) and, for a GGUF
base, base/: that model dequantized once, as plain weights the later commands load.
A user's mistake (a missing file, an unknown task, a bad JSONL line, a bad number, the wrong base
model, an output that already exists) ends the command with one line on stderr and exit status 2;
`--debug` shows the traceback instead. No command replaces an existing output without
`--overwrite`; each but generate writes into a temporary sibling renamed into place at the end
(output.py), and generate appends each batch's answers to its --output as they come.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..data.reader import UserError
from . import bench, cluster, compare, demo, deploy, generate, inspect, train
from .arguments import Parser

# The subcommands in the order `--help` lists them; each module's register(subparsers) adds its
# parser(s) with set_defaults(func=cmd_...).
COMMANDS = (demo, train, deploy, generate, inspect, cluster, compare, bench)


# ---- parsing -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cgc-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    for command in COMMANDS:
        command.register(sub)
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

