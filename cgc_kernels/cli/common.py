"""What the `cgc-lora` subcommands share: the run's metadata file, model and CGC-LoRA arguments,
loading a trained directory, exporting one task."""

from __future__ import annotations

import json
import os

from ..data.reader import UserError
from ..multitask.models import TINY_MODEL

META_NAME = "cgc_cli.json"
DEFAULT_TARGETS = "q_proj,v_proj,o_proj,down_proj"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def positive_ratio(text: str) -> float:
    """argparse type of --gate-lr-ratio: a finite number >= 0."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# ---- shared steps ------------------------------------------------------------------------------
def model_spec(args) -> str | None:
    if getattr(args, "tiny", False):
        if getattr(args, "model", None):
            raise UserError("--tiny and --model exclude each other")
        return TINY_MODEL
    spec = getattr(args, "model", None)
    return os.path.abspath(spec) if spec else None


def base_dtype(args, spec):
    import torch

    from ..multitask.models import pick_dtype

    if spec == TINY_MODEL and args.dtype == "auto":
        return torch.float32  # the tiny model is for quick checks: exact arithmetic
    return pick_dtype(args.dtype)


def cgc_config_from_args(args, tasks: list[str]):
    from ..adapter.config import CGCLoRAConfig

    clusters = None
    if args.clusters:
        if not os.path.isfile(args.clusters):
            raise UserError(f"no such file: {args.clusters}")
        try:
            with open(args.clusters, encoding="utf-8") as f:
                clusters = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{args.clusters}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(clusters, dict):
            raise UserError(f"{args.clusters}: expected a JSON object {{task: cluster}}")
        unknown = sorted(set(clusters) - set(tasks))
        missing = [t for t in tasks if t not in clusters]
        if unknown or missing:
            raise UserError(f"{args.clusters}: must name a cluster for every task of the data"
                            + (f"; missing {missing}" if missing else "")
                            + (f"; tasks not in the data {unknown}" if unknown else ""))
    tm = args.target_modules
    targets = tm[3:] if tm.startswith("re:") else [t.strip() for t in tm.split(",") if t.strip()]
    try:
        return CGCLoRAConfig(tasks=tasks, clusters=clusters, num_shared_experts=args.shared_experts,
                             num_task_experts=args.task_experts, rank=args.rank, alpha=args.alpha,
                             dropout=args.dropout, gate=args.gate, gate_scope=args.gate_scope,
                             gate_embedding_dim=getattr(args, "gate_embedding_dim", None),
                             gate_init=getattr(args, "gate_init", "uniform"), target_modules=targets)
    except ValueError as e:
        raise UserError(str(e)) from None


def wrap(model, config):
    from ..adapter.model import CGCModel

    try:
        return CGCModel(model, config)
    except ValueError as e:
        raise UserError(str(e)) from None


def save_trained(cgc, tokenizer, out: str, spec: str | None, base, system: str | None, dtype) -> None:
    from ..multitask.models import model_fingerprint, quiet_transformers

    with quiet_transformers():
        cgc.save_pretrained(out)
        tokenizer.save_pretrained(out)
    meta = {"base_model": spec, "fingerprint": model_fingerprint(base), "tasks": list(cgc.tasks),
            "system": system, "dtype": str(dtype).removeprefix("torch.")}
    with open(os.path.join(out, META_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def read_meta(directory: str) -> dict:
    """cgc_cli.json of a trained directory; UserError if `directory` is not one."""
    from ..adapter.config import CONFIG_NAME

    if not os.path.isdir(directory):
        raise UserError(f"no such directory: {directory}")
    meta_path = os.path.join(directory, META_NAME)
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise UserError(f"{directory} is not a cgc-lora training output (no {META_NAME} / {CONFIG_NAME})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), list):
        raise UserError(f"{meta_path}: no task list")
    return meta


def check_task(task: str, meta: dict) -> None:
    if task not in meta["tasks"]:
        raise UserError(f"unknown task {task!r}; the adapter's tasks: {', '.join(meta['tasks'])}")


def load_trained(directory: str, meta: dict, model_override: str | None):
    """(cgc, tokenizer) of a trained directory; UserError if the base model is not the one it was
    trained on."""
    from transformers import AutoTokenizer

    from ..adapter.model import CGCModel
    from ..multitask.models import DTYPES, describe, load_base, model_fingerprint

    spec = meta.get("base_model")
    if model_override:
        spec = TINY_MODEL if model_override == TINY_MODEL else os.path.abspath(model_override)
    own_tokenizer = spec != TINY_MODEL and os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    base, tokenizer = load_base(spec, DTYPES.get(meta.get("dtype"), DTYPES["float32"]),
                                with_tokenizer=not own_tokenizer)
    fp, want = model_fingerprint(base), meta.get("fingerprint")
    if want and fp != want:
        where = "the model given" if model_override else f"its recorded base model {spec}"
        same_shape = describe(fp) == describe(want)
        raise UserError(f"the adapter in {directory} was trained on {describe(want)}, but {where} is "
                        f"{describe(fp)}" + (" with other weights" if same_shape else ""))
    if own_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(directory)  # the training run's own copy
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    try:
        cgc = CGCModel.from_pretrained(base, directory)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        raise UserError(f"cannot load the adapter in {directory}: {str(e).splitlines()[0]}") from None
    cgc.eval()
    return cgc, tokenizer


def export_task(cgc, tokenizer, task: str, out: str, merged: bool) -> None:
    from ..multitask.models import quiet_transformers

    if task not in cgc.tasks:
        raise UserError(f"unknown task {task!r}; the adapter's tasks: {', '.join(cgc.tasks)}")
    with quiet_transformers():
        if merged:
            model = cgc.merge_task(task)
            model.hf_quantizer = None  # a dequantized GGUF base saves as plain weights
            model.save_pretrained(out)
        else:
            cgc.export_peft_adapter(task, out)
        tokenizer.save_pretrained(out)
