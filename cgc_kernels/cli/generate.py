"""`cgc-lora generate`: answer {task, prompt} rows (any format `train` reads) with a trained
adapter, batched across tasks.

With --output, each batch's answers are appended to the file as soon as they exist, one JSON line
per input row in the input's order: an interrupted run keeps what it wrote, and `--resume` answers
only the rows after the last complete line (checking that those lines answer the same rows)."""

from __future__ import annotations

import json
import os
import sys

from ..data.reader import UserError
from ..multitask.models import DTYPES
from .arguments import (
    WEIGHT_DTYPES,
    add_data_args,
    add_overwrite,
    data_options,
    non_negative_float,
    non_negative_int,
    positive_int,
    top_p,
)
from .common import dtype_name, load_trained, log, read_meta
from .output import check_output


def register(subparsers) -> None:
    """`cgc-lora generate`: its parser, run by cmd_generate."""
    p = subparsers.add_parser("generate", help="answer {task, prompt} rows (or any train format), batched across tasks")
    p.add_argument("dir", help="a directory written by `cgc-lora train` (or the demo's adapter/)")
    p.add_argument("--input", required=True, help="rows to answer, any format that train reads, the answer "
                                                   "column not needed: {task, prompt}, {task, messages}, ...")
    add_data_args(p)
    p.add_argument("--output", help="JSONL file to write, a line appended per row as each batch finishes "
                                    "(default: stdout)")
    add_overwrite(p)
    p.add_argument("--resume", nargs="?", const="", metavar="FILE",
                   help="FILE (default: --output) holds the answers to the first rows, from an interrupted run: "
                        "answer the rest and append them to it")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="new tokens per answer, at most")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="sampling temperature; 0: greedy (the default, deterministic)")
    p.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling (with --temperature > 0)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per generate call, tasks mixed")
    p.add_argument("--model", help="the base model, if not the one recorded in DIR (default: DIR's recorded base)")
    p.add_argument("--dtype", choices=("trained", *WEIGHT_DTYPES), default="trained",
                   help="the dtype the base runs in; trained: the one training ran it in (DIR's cgc_cli.json). "
                        "float32 gives the answers of a float32 PEFT or vLLM deployment")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..data.formats import load_rows
    from ..multitask.recipe import generate_answers

    loaded = load_rows(args.input, **data_options(args), need_answer=False)
    meta = read_meta(args.dir)
    loaded.check_tasks(meta["tasks"])
    rows = loaded.rows
    # Each answer line is the input's own record (every column: ids and the like) plus "output".
    echoed = [json.loads(json.dumps(r, ensure_ascii=False, default=str)) for r in loaded.records]
    done = _check_destination(args, echoed)  # before the model loads
    if done == len(rows):
        log(f"all {len(rows)} rows of {args.input} are already answered in {args.output}")
        return 0
    dtype = None if args.dtype == "trained" else DTYPES[args.dtype]
    cgc, tokenizer = load_trained(args.dir, meta, args.model, dtype=dtype)
    # stderr: without --output, stdout carries the answers alone
    print(f"base model in {dtype_name(cgc.dtype)} ({'as trained' if dtype is None else '--dtype'})",
          file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    sink = open(args.output, "a" if done else "w", encoding="utf-8") if args.output else sys.stdout
    bar = tqdm(total=len(rows), initial=done, desc="generating", unit="row", file=sys.stderr)
    written = done
    try:
        for s in range(done, len(rows), args.batch_size):
            chunk, records = rows[s:s + args.batch_size], echoed[s:s + args.batch_size]
            answers = generate_answers(cgc, tokenizer, chunk, list(cgc.tasks), system=meta.get("system"),
                                       max_new_tokens=args.max_new_tokens, batch_size=len(chunk),
                                       temperature=args.temperature, top_p=args.top_p)
            sink.write("".join(json.dumps(dict(r, output=a), ensure_ascii=False) + "\n"
                               for r, a in zip(records, answers, strict=True)))
            sink.flush()
            written += len(chunk)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        bar.close()
        if args.output:
            print(f"cgc-lora: {written} of {len(rows)} answers are in {args.output}; add --resume to the same "
                  f"command to answer the rest", file=sys.stderr, flush=True)
        raise
    finally:
        bar.close()
        if sink is not sys.stdout:
            sink.close()
    if args.output:
        log(f"{len(rows)} answers in {os.path.abspath(args.output)}"
            + (f" ({len(rows) - done} new)" if done else ""))
    return 0


def _check_destination(args, rows: list[dict]) -> int:
    """How many rows --output already answers (0 unless --resume); UserError for an output that
    must not be written."""
    if args.resume:
        if args.output and os.path.abspath(args.resume) != os.path.abspath(args.output):
            raise UserError("--resume FILE and --output name different files; give one of them")
        args.output = args.output or args.resume
    if args.resume is not None and not args.output:
        raise UserError("--resume needs the file an interrupted run wrote: --resume FILE or --output FILE")
    if not args.output:
        return 0
    if args.resume is not None and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if not (args.resume is not None and os.path.isfile(args.output)):
        check_output(args.output, overwrite=args.overwrite, inputs=[args.input, args.dir], kind="file",
                     option="--output")
        return 0
    check_output(args.output, overwrite=True, inputs=[args.input, args.dir], kind="file", option="--output")
    return _answered(args.output, rows, args.input)


def _answered(path: str, rows: list[dict], input_path: str) -> int:
    """The number of complete answer lines at the start of `path`, each checked against the input
    record it answers (`rows`: the input's records as JSON gives them back); a last line cut off
    mid-write is removed from the file."""
    keep, count = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the run stopped while writing it
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{path}:{count + 1}: not a JSON line; --resume needs a file generate wrote") from None
            if count >= len(rows):
                raise UserError(f"{path} holds more lines than {input_path} has rows; is it another input's output?")
            row = rows[count]
            if not isinstance(line, dict) or "output" not in line or {
                    k: v for k, v in line.items() if k != "output"} != row:
                raise UserError(f"{path}:{count + 1} does not answer row {count + 1} of {input_path}; "
                                f"is it another input's output?")
            keep += len(raw)
            count += 1
    if keep != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return count
