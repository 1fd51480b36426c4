"""`cgc-lora export` (one task as a PEFT adapter or a merged model) and `cgc-lora export-base` (the
base model as a plain transformers folder)."""

from __future__ import annotations

import os

from ..adapter.merge import VLLM_LORA_RANKS
from ..data.reader import UserError
from ..multitask.models import DTYPES, TINY_MODEL
from .arguments import WEIGHT_DTYPES, add_model_args, add_overwrite
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


def register(subparsers) -> None:
    """`cgc-lora export` and `cgc-lora export-base`: their parsers."""
    p = subparsers.add_parser("export", help="one task as a PEFT LoRA adapter (vLLM, PEFT) or a merged model")
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
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("export-base", help="the base model as a plain transformers safetensors folder with its "
                                           "tokenizer (for vLLM and PEFT; a GGUF file is converted)")
    p.add_argument("dir", nargs="?", help="a directory written by `cgc-lora train`: its recorded base "
                                          "(default: --model, --tiny, or the demo's model)")
    add_model_args(p, default_help="the demo's SmolLM2-135M-Instruct", writes_weights=True)
    p.add_argument("--out", required=True, help="output directory")
    add_overwrite(p)
    p.set_defaults(func=cmd_export_base)


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
    spec = recorded_base(meta, args.model, args.dir)
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
        spec = recorded_base(read_meta(args.dir), None, args.dir)
    else:
        spec = model_spec(args)
    with staged_output(args.out, overwrite=args.overwrite, inputs=[args.dir, _path_input(spec)]) as staging:
        dtype = _weights_dtype(args.dtype, spec)
        model, tokenizer = load_base(spec, dtype)
        write_plain_base(model, tokenizer, staging)
    log(f"base model ({dtype_name(dtype)}) written to {os.path.abspath(args.out)}: load it with "
        f"AutoModelForCausalLM.from_pretrained, vLLM's LLM(model=...), or as --model of export --peft")
    return 0
