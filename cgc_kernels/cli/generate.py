"""`cgc-lora generate`: answer JSONL {task, prompt} rows with a trained adapter, batched across tasks."""

from __future__ import annotations

import json
import os
import sys

from ..multitask.models import DTYPES
from .arguments import WEIGHT_DTYPES, add_overwrite, positive_int
from .common import dtype_name, load_trained, log, read_meta
from .output import check_output, staged_output


def register(subparsers) -> None:
    """`cgc-lora generate`: its parser, run by cmd_generate."""
    p = subparsers.add_parser("generate", help="answer JSONL {task, prompt} rows, batched across tasks")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--input", required=True, help="rows, JSONL {task, prompt}")
    p.add_argument("--output", help="JSONL file to write (default: stdout)")
    add_overwrite(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy tokens per answer, at most")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per generate call, tasks mixed")
    p.add_argument("--model", help="the base model, if not the one recorded in DIR (default: DIR's recorded base)")
    p.add_argument("--dtype", choices=("trained", *WEIGHT_DTYPES), default="trained",
                   help="the dtype the base runs in; trained: the one training ran it in (DIR's cgc_cli.json). "
                        "float32 gives the answers of a float32 PEFT or vLLM deployment")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from ..data.reader import check_tasks, read_jsonl
    from ..multitask.recipe import generate_answers

    rows = read_jsonl(args.input, need_response=False)
    meta = read_meta(args.dir)
    check_tasks(rows, meta["tasks"], args.input)
    if args.output:  # refuse a bad --output before the model loads
        check_output(args.output, overwrite=args.overwrite, inputs=[args.input, args.dir], kind="file",
                     option="--output")
    dtype = None if args.dtype == "trained" else DTYPES[args.dtype]
    cgc, tokenizer = load_trained(args.dir, meta, args.model, dtype=dtype)
    # stderr: without --output, stdout carries the answers alone
    print(f"base model in {dtype_name(cgc.dtype)} ({'as trained' if dtype is None else '--dtype'})",
          file=sys.stderr, flush=True)
    answers = generate_answers(cgc, tokenizer, rows, list(cgc.tasks), system=meta.get("system"),
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    lines = [json.dumps(dict(r, output=a), ensure_ascii=False) for r, a in zip(rows, answers, strict=True)]
    if args.output:
        with staged_output(args.output, overwrite=args.overwrite, inputs=[args.input, args.dir], kind="file",
                           option="--output") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        log(f"{len(lines)} answers written to {os.path.abspath(args.output)}")
    else:
        for line in lines:
            print(line)
    return 0
