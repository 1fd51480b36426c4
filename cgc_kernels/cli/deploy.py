"""`cgc-lora export` (one task as a PEFT adapter or a merged model), `cgc-lora export-base` (the
base model as a plain transformers folder) and `cgc-lora generate`."""

from __future__ import annotations

import json
import os
import sys

from ..data.reader import UserError
from ..multitask.models import DTYPES, TINY_MODEL
from .common import (
    check_exportable,
    check_task,
    dtype_name,
    export_task,
    is_plain_model_dir,
    load_trained,
    log,
    model_spec,
    read_meta,
    recorded_base,
    write_plain_base,
)
from .output import check_output, staged_output


def _path_input(spec: str | None) -> str | None:
    """A model spec as an input path of the command (None for the tiny or the default model)."""
    return None if spec in (None, TINY_MODEL) else spec


def _weights_dtype(name: str, spec: str | None):
    from ..multitask.models import stored_dtype

    return stored_dtype(spec) if name == "stored" else DTYPES[name]


def cmd_export(args) -> int:
    meta = read_meta(args.dir)
    check_task(args.task, meta)
    check_exportable(args.dir)
    spec = recorded_base(meta, args.model)
    check_output(args.out, overwrite=args.overwrite, inputs=[args.dir, _path_input(spec)])
    if not args.merged and not is_plain_model_dir(spec):
        what = "a GGUF file" if spec is None or str(spec).endswith(".gguf") else f"{spec!r}"
        raise UserError(f"the adapter's base is {what}, which PEFT and vLLM cannot load by path: write it as a "
                        f"plain folder with `cgc-lora export-base {args.dir} --out BASE` and pass --model BASE")
    with staged_output(args.out, overwrite=args.overwrite, inputs=[args.dir, _path_input(spec)]) as staging:
        # The base in its stored dtype (or --dtype): a merged model keeps the weights' precision,
        # whatever dtype training ran the base in.
        cgc, tokenizer = load_trained(args.dir, meta, args.model, dtype=_weights_dtype(args.dtype, spec))
        base_path = spec if is_plain_model_dir(spec) else None
        what = export_task(cgc, tokenizer, args.task, staging, merged=args.merged, pad_rank=args.pad_rank,
                           base_path=base_path)
    log(f"{what} for task {args.task!r} written to {os.path.abspath(args.out)}"
        + ("" if args.merged else f"; base: {base_path}"))
    return 0


def cmd_export_base(args) -> int:
    from ..multitask.models import load_base

    if args.dir:
        if args.model or args.tiny:
            raise UserError("give DIR (its recorded base) or --model / --tiny, not both")
        spec = recorded_base(read_meta(args.dir), None)
    else:
        spec = model_spec(args)
    with staged_output(args.out, overwrite=args.overwrite, inputs=[args.dir, _path_input(spec)]) as staging:
        dtype = _weights_dtype(args.dtype, spec)
        model, tokenizer = load_base(spec, dtype)
        write_plain_base(model, tokenizer, staging)
    log(f"base model ({dtype_name(dtype)}) written to {os.path.abspath(args.out)}: load it with "
        f"AutoModelForCausalLM.from_pretrained, vLLM's LLM(model=...), or as --model of export --peft")
    return 0


def cmd_generate(args) -> int:
    from ..data.formats import load_rows
    from ..multitask.recipe import generate_answers
    from .arguments import data_options

    loaded = load_rows(args.input, **data_options(args), need_answer=False)
    meta = read_meta(args.dir)
    loaded.check_tasks(meta["tasks"])
    rows = loaded.rows
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
