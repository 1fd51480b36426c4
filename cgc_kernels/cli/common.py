"""What the `cgc-lora` subcommands share: the run's metadata file (cgc_cli.json: the base model,
its fingerprint, the tasks, the system prompt, the dtype the base ran in and why), the CGC-LoRA
config from the arguments, loading a trained directory, exporting one task or the base model."""

from __future__ import annotations

import json
import os
import re

import torch

from ..data.reader import UserError, read_json
from ..multitask.models import TINY_MODEL

META_NAME = "cgc_cli.json"


def log(msg: str = "") -> None:
    """Print a progress line; under a launcher, on the main process only."""
    from .launcher import is_main_process

    if is_main_process():
        print(msg, flush=True)


# ---- shared steps ------------------------------------------------------------------------------
def model_spec(args) -> str | None:
    if getattr(args, "tiny", False):
        if getattr(args, "model", None):
            raise UserError("--tiny and --model exclude each other")
        return TINY_MODEL
    spec = getattr(args, "model", None)
    if spec and not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise UserError(f"no such model: {spec} (--model takes local paths only: download a Hub model first, "
                        f"e.g. `hf download {spec} --local-dir DIR`, and pass --model DIR)")
    return os.path.abspath(spec) if spec else None


def base_dtype(args, spec) -> tuple[torch.dtype, str]:
    """(dtype the base runs in, why): --dtype, or for auto the device's capabilities (auto_dtype)."""
    from ..multitask.models import auto_dtype, pick_dtype

    if args.dtype != "auto":
        return pick_dtype(args.dtype), f"--dtype {args.dtype}"
    if spec == TINY_MODEL:
        return torch.float32, "auto: float32 for the tiny model (exact arithmetic for quick checks)"
    dtype, why = auto_dtype()
    return dtype, f"auto: {why}"


def cgc_config_from_args(args, tasks: list[str]):
    from ..adapter.config import CGCLoRAConfig
    from ..multitask.clustering import read_clusters
    from .arguments import split_targets

    try:
        clusters = read_clusters(args.clusters, tasks) if args.clusters else None
        return CGCLoRAConfig(tasks=tasks, clusters=clusters, num_shared_experts=args.shared_experts,
                             num_task_experts=args.task_experts, rank=args.rank, alpha=args.alpha,
                             dropout=args.dropout, gate=args.gate, gate_scope=args.gate_scope,
                             gate_embedding_dim=getattr(args, "gate_embedding_dim", None),
                             gate_init=getattr(args, "gate_init", "uniform"),
                             target_modules=split_targets(args.target_modules))
    except ValueError as e:
        raise UserError(str(e)) from None


def wrap(model, config):
    from ..adapter.model import CGCModel

    try:
        return CGCModel(model, config)
    except ValueError as e:
        raise UserError(str(e)) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_trained(cgc, tokenizer, out: str, spec: str | None, base, system: str | None, dtype: torch.dtype,
                 dtype_reason: str, fingerprint: dict | None = None, plain_base: str | None = None) -> None:
    """The adapter, the tokenizer and cgc_cli.json (the base model, its fingerprint, the tasks, the
    system prompt, the dtype the base ran in with why it was chosen, and `plain_base`: the path,
    relative to `out`, of the base written as a plain transformers folder, which later commands
    load instead of dequantizing a GGUF file again). `fingerprint`: the base's, taken before FSDP
    sharded it (default: taken from `base` now)."""
    from ..multitask.models import model_fingerprint, quiet_transformers

    with quiet_transformers():
        cgc.save_pretrained(out)
        tokenizer.save_pretrained(out)
    meta = {"base_model": spec, "fingerprint": fingerprint or model_fingerprint(base), "tasks": list(cgc.tasks),
            "system": system, "dtype": dtype_name(dtype), "dtype_reason": dtype_reason}
    if plain_base:
        meta["plain_base"] = plain_base
    with open(os.path.join(out, META_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def first_per_task(rows: list[dict], limit: int) -> list[dict]:
    """The first `limit` rows of each task, in order (--eval-limit; 0: every row)."""
    if not limit:
        return rows
    seen: dict[str, int] = {}
    kept = []
    for r in rows:
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        if seen[r["task"]] <= limit:
            kept.append(r)
    return kept


def read_meta(directory: str) -> dict:
    """cgc_cli.json of a trained directory; UserError if `directory` is not one."""
    from ..adapter.config import CONFIG_NAME

    if not os.path.isdir(directory):
        raise UserError(f"no such directory: {directory}")
    meta_path = os.path.join(directory, META_NAME)
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise UserError(f"{directory} is not a cgc-lora training output (no {META_NAME} / {CONFIG_NAME})")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), list):
        raise UserError(f"{meta_path}: no task list")
    return meta


def check_task(task: str, meta: dict) -> None:
    if task not in meta["tasks"]:
        raise UserError(f"unknown task {task!r}; the adapter's tasks: {', '.join(meta['tasks'])}")


# The folder, inside a run's --out, that holds its base as plain weights when the base is a GGUF file.
PLAIN_BASE = "base"


def needs_plain_copy(spec: str | None) -> bool:
    """True for a base that takes long to load (a GGUF file, dequantized on every load; None is the
    demo's GGUF): `train` writes it once as a plain folder that later commands load in seconds."""
    return spec is None or (spec != TINY_MODEL and str(spec).endswith(".gguf"))


def recorded_base(meta: dict, model_override: str | None, directory: str | None = None) -> str | None:
    """The base model spec to load: --model if given, else the plain copy the run wrote (if it is
    still in `directory`), else the one the run recorded."""
    if model_override:
        return TINY_MODEL if model_override == TINY_MODEL else os.path.abspath(model_override)
    plain = meta.get("plain_base")
    if plain and directory and is_plain_model_dir(os.path.join(os.path.abspath(directory), plain)):
        return os.path.normpath(os.path.join(os.path.abspath(directory), plain))
    return meta.get("base_model")


def is_plain_model_dir(spec: str | None) -> bool:
    """True for a transformers model folder (what PEFT, vLLM and AutoModel load by path)."""
    return spec not in (None, TINY_MODEL) and os.path.isfile(os.path.join(spec, "config.json"))


def check_exportable(directory: str) -> None:
    """UserError, before any model loads, if the adapter in `directory` has per-token gates (a
    task then has no single low-rank update to export or merge)."""
    from ..adapter.config import CONFIG_NAME

    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            gate = json.load(f).get("gate", "task")
    except (OSError, ValueError, AttributeError):
        return  # load_trained reports a damaged adapter
    if gate == "token":
        raise UserError(f"the adapter in {directory} has per-token gates (--gate token): a task has no single "
                        f"update, so it cannot be exported or merged; train with --gate task to deploy")


def load_trained(directory: str, meta: dict, model_override: str | None, dtype: torch.dtype | None = None):
    """(cgc, tokenizer) of a trained directory, the base in `dtype` (default: the dtype it was
    trained in); UserError if the base model is not the one it was trained on."""
    from transformers import AutoTokenizer

    from ..adapter.model import CGCModel
    from ..multitask.models import DTYPES, describe, load_base, model_fingerprint

    spec = recorded_base(meta, model_override, directory)
    own_tokenizer = spec != TINY_MODEL and os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    if dtype is None:
        dtype = DTYPES.get(meta.get("dtype"), torch.float32)
    base, tokenizer = load_base(spec, dtype, with_tokenizer=not own_tokenizer)
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


def export_task(cgc, tokenizer, task: str, out: str, merged: bool, *, pad_rank: bool = True,
                base_path: str | None = None) -> str:
    """Write `task` into the (new, empty) folder `out`: a PEFT LoRA adapter, its rank padded with
    zeros to the next rank vLLM accepts unless not `pad_rank`, recording `base_path` as its base;
    or the merged model. Returns a one-line description of what was written."""
    from ..adapter.merge import vllm_lora_rank
    from ..multitask.models import quiet_transformers

    if task not in cgc.tasks:
        raise UserError(f"unknown task {task!r}; the adapter's tasks: {', '.join(cgc.tasks)}")
    cfg = cgc.cgc_config
    rank = (cfg.num_shared_experts + cfg.num_task_experts) * cfg.rank
    try:
        with quiet_transformers():
            if merged:
                model = cgc.merge_task(task)
                model.hf_quantizer = None  # a dequantized GGUF base saves as plain weights
                model.save_pretrained(out)
                what = f"merged model ({dtype_name(next(model.parameters()).dtype)})"
            else:
                padded = vllm_lora_rank(rank) if pad_rank else rank
                cgc.export_peft_adapter(task, out, rank=padded, base_model_name_or_path=base_path)
                what = f"PEFT adapter of rank {padded}" + (f" ((S+K)*r = {rank}, zero-padded for vLLM)"
                                                           if padded != rank else "")
            tokenizer.save_pretrained(out)
    except ValueError as e:
        raise UserError(f"cannot export task {task!r}: {str(e).splitlines()[0]}") from None
    return what


def write_plain_base(model, tokenizer, out: str) -> None:
    """The base model as a plain transformers safetensors folder with its tokenizer, in `out`."""
    from ..multitask.models import quiet_transformers

    model.hf_quantizer = None  # a dequantized GGUF model saves as plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
