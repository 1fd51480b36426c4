"""The `cgc-lora` parser's parts: checked argument types, help that shows every default, one-line
errors, and the option groups that several subcommands share.

One meaning per option name across subcommands:

    --out DIR          the output directory (cluster: --clusters-out FILE; generate: --output FILE)
    --overwrite        replace an existing output as a whole
    --model PATH       the base model: a transformers model directory or a .gguf file
    --clusters FILE    a JSON file {task: cluster}; the number of clusters is --num-clusters
    --data / --eval-data FILE   rows in any accepted format and file type (data/formats.py)
    --task-column NAME / --task NAME   the column naming each row's task / the task of every row
"""

from __future__ import annotations

import argparse
import math
import re

from ..adapter.param_groups import DEFAULT_GATE_LR_RATIO

DEFAULT_TARGETS = "q_proj,v_proj,o_proj,down_proj"


# ---- types: each rejects a bad value before any work, naming what it wanted ---------------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(parse, ok, wanted: str, name: str):
    """An argument type: `parse` the text, then reject a value for which `ok` is false."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{wanted}, got {text}")
        return value
    check.__name__ = name
    return check


positive_int = _checked(_int, lambda v: v >= 1, "must be a positive integer", "positive_int")
non_negative_int = _checked(_int, lambda v: v >= 0, "must be 0 or more", "non_negative_int")
positive_float = _checked(_float, lambda v: v > 0, "must be greater than 0", "positive_float")
non_negative_float = _checked(_float, lambda v: v >= 0, "must be 0 or more", "non_negative_float")
# A dropout probability: in [0, 1).
probability = _checked(_float, lambda v: 0 <= v < 1, "must lie in [0, 1)", "probability")
# A nucleus-sampling mass: in (0, 1].
top_p = _checked(_float, lambda v: 0 < v <= 1, "must lie in (0, 1]", "top_p")


# Room for a chat-templated prompt and a response of at least a token: the command also checks,
# once the tokenizer is loaded, that the template itself leaves room (train.py).
MIN_MAX_LENGTH = 8


def max_length(text: str) -> int:
    value = _int(text)
    if value < MIN_MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_MAX_LENGTH} tokens (a prompt and a response), "
                                         f"got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """Comma-separated seeds, each 0 or more: "0,1,2"."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return [non_negative_int(p) for p in parts]


def target_modules(text: str) -> str:
    """Comma-separated module names, or re:REGEX (checked here: a bad pattern is the user's)."""
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as e:
            raise argparse.ArgumentTypeError(f"{text[3:]!r} is not a valid regular expression ({e})") from None
        return text
    if not [t for t in text.split(",") if t.strip()]:
        raise argparse.ArgumentTypeError(f"expected module names, got {text!r}")
    return text


def split_targets(text: str) -> str | list[str]:
    """What CGCLoRAConfig.target_modules takes: a regex string, "all-linear", or a list of names."""
    if text.strip() == "all-linear":
        return "all-linear"
    return text[3:] if text.startswith("re:") else [t.strip() for t in text.split(",") if t.strip()]


# ---- parser: every default shown, every error one line -----------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already says what the default
    is, or there is nothing to show (a flag, a required option, a default of None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or not action.option_strings:
            return text
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(
                action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (status 2), without the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"cgc-lora: error: {message} (see {self.prog} --help)\n")


# ---- shared option groups -----------------------------------------------------------------------
DTYPE_HELP = ("the frozen base model's dtype while it runs; adapters stay float32. auto: bfloat16 where "
              "the device computes it natively (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX-BF16), "
              "else float32 (the tiny model: float32)")


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output as a whole (default: refuse)")


WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p, *, default_help: str, writes_weights: bool = False) -> None:
    """--model, --tiny, --dtype. writes_weights: --dtype is the dtype written, default the stored one."""
    p.add_argument("--model", help=f"a local transformers model directory or a .gguf file (default: {default_help})")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama (for trying the command quickly)")
    if writes_weights:
        p.add_argument("--dtype", choices=("stored", *WEIGHT_DTYPES), default="stored",
                       help="the written weights' dtype; stored: the model's own")
    else:
        p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help=DTYPE_HELP)


def add_cgc_args(p) -> None:
    g = p.add_argument_group("CGC-LoRA")
    g.add_argument("--shared-experts", type=non_negative_int, default=2, help="S: shared experts per cluster")
    g.add_argument("--task-experts", type=non_negative_int, default=1, help="K: task experts per task")
    g.add_argument("--rank", type=positive_int, default=8, help="rank of one expert")
    g.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha; scaling = alpha / rank")
    g.add_argument("--target-modules", type=target_modules, default=DEFAULT_TARGETS,
                   help="comma-separated module names, all-linear (every linear layer but the output head), "
                        "or re:REGEX")
    g.add_argument("--gate-lr-ratio", type=non_negative_float, default=DEFAULT_GATE_LR_RATIO,
                   help="the gates' learning rate over the experts' (their own optimizer group, like "
                        "LoRA+ for B; 0 freezes the gates)")



def add_gate_form_args(g) -> None:
    """--gate-scope, --gate-embedding-dim and --gate-init: where the task gates live and how their
    logits are made (train and compare)."""
    g.add_argument("--gate-scope", choices=("layer", "model"), default="layer",
                   help="a gate per adapted layer, or one for the whole model")
    g.add_argument("--gate-embedding-dim", type=positive_int, default=None,
                   help="task gate logits from a learned task embedding of this size (default: free logits)")
    g.add_argument("--gate-init", choices=("uniform", "random"), default="uniform",
                   help="uniform: every task starts from an even mixture; random: MOELoRA's random "
                        "task-embedding gate (needs --gate-embedding-dim)")

DATA_HELP = ("a .jsonl, .json, .csv or .parquet file, or a Dataset.save_to_disk folder, of rows {task, prompt, "
             "response}, {task, prompt, completion}, {task, messages} or {task, instruction, input, output}")


def add_data_args(p) -> None:
    """--task-column and --task: which column names each row's task, or the one task of a file
    without such a column (every subcommand that reads data files)."""
    p.add_argument("--task-column", default="task", help="the column that names each row's task")
    p.add_argument("--task", dest="data_task", metavar="NAME",
                   help="the task of every row, for a file of one task without a task column (default: the "
                        "task column)")


def data_options(args) -> dict:
    """The keyword arguments of data.formats.load_rows that add_data_args gave."""
    return {"task_column": args.task_column, "task": args.data_task}
