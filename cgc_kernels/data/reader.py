"""UserError, and the helpers over rows that every command shares. Data files are read by
formats.py (any accepted file type and row format, through `datasets`)."""

from __future__ import annotations

import json

from .errors import UserError
from .formats import load_rows

__all__ = ["UserError", "read_json", "read_jsonl", "tasks_of"]


def read_json(path: str, error: type[Exception] = UserError):
    """The value of a JSON file (a run's metadata, a clusters file); `error` naming the file when
    it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg})") from None


# ---- data --------------------------------------------------------------------------------------
def read_jsonl(path: str, *, need_response: bool = True) -> list[dict]:
    """The rows of a data file as plain dicts {task, prompt, response} (or {task, messages,
    response}): formats.load_rows with the defaults; UserError naming the file and row."""
    return load_rows(path, need_answer=need_response).rows


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(r["task"] for r in rows))

