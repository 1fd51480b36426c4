"""Instruction files: JSON objects one a line, {"task": name, "prompt": text, "response": text}
("response" is not needed to generate). A bad file is the user's mistake: UserError, naming the
file and line."""

from __future__ import annotations

import json
import os


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never a traceback."""


# ---- data --------------------------------------------------------------------------------------
def read_jsonl(path: str, *, need_response: bool = True) -> list[dict]:
    """Rows of a JSONL instruction file; UserError naming the file and line for a bad row."""
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    needed = ("task", "prompt", "response") if need_response else ("task", "prompt")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in needed if k not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            bad = [k for k in needed if not isinstance(row[k], str) or (k != "response" and not row[k])]
            if bad:
                raise UserError(f"{path}:{lineno}: field(s) {', '.join(bad)} must be non-empty strings")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(r["task"] for r in rows))


def check_tasks(rows: list[dict], known: list[str], path: str) -> None:
    """UserError if a row names a task the adapter does not have."""
    for i, r in enumerate(rows):
        if r["task"] not in known:
            raise UserError(f"{path}: row {i + 1} has task {r['task']!r}, which the adapter does not have "
                            f"(its tasks: {', '.join(known)})")
