"""UserError, and the helpers over rows that every command shares. Data files are read by
formats.py (any accepted file type and row format, through `datasets`)."""

from __future__ import annotations

from .errors import UserError
from .formats import load_rows

__all__ = ["UserError", "read_jsonl", "tasks_of"]


# ---- data --------------------------------------------------------------------------------------
def read_jsonl(path: str, *, need_response: bool = True) -> list[dict]:
    """The rows of a data file as plain dicts {task, prompt, response} (or {task, messages,
    response}): formats.load_rows with the defaults; UserError naming the file and row."""
    return load_rows(path, need_answer=need_response).rows


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(r["task"] for r in rows))

