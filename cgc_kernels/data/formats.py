"""Instruction data from a file, through Hugging Face `datasets`: JSON Lines (.jsonl, and any other
extension), JSON (.json, lines or one array), CSV (.csv), Parquet (.parquet) or a
`Dataset.save_to_disk` folder.

The row format is found from the columns, as TRL finds it, and every row becomes one plain dict:

    {task, prompt, response}               -> {"task", "prompt", "response"}        (this package's own)
    {task, prompt, completion}             -> {"task", "prompt", "response"}        (TRL's names)
    {task, messages}                       -> {"task", "messages", "response"}      (multi-turn chat;
                                              "response" is the last assistant turn)
    {task, instruction, input, output}     -> {"task", "prompt", "response"}        (Alpaca; "input"
                                              may be missing or empty; the prompt is the instruction,
                                              then a blank line and the input)

The task column is `task` unless told (`task_column`); a file of one task without one gets `task`.
Generation reads prompts only (`need_answer=False`): then the answer column may be missing, and
a conversation may end on a user turn. A mistake in the file is a UserError naming the file, the
row (the line of a .jsonl file, else the row number in the file) and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from .errors import UserError

FORMATS = {
    "messages": "{task, messages} (multi-turn chat)",
    "alpaca": "{task, instruction, input, output} (Alpaca)",
    "prompt-completion": "{task, prompt, completion}",
    "prompt-response": "{task, prompt, response}",
}
ACCEPTED = "; ".join(FORMATS.values())
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


@dataclass
class LoadedRows:
    """What a file held: its rows as plain dicts (see the module docstring), the format found,
    `where[i]`, how an error names row i ("F.jsonl:3" for line 3 of a JSON Lines file, else
    "F.csv: row 3"), and `records`, the file's own records with every column (what `generate`
    echoes beside each answer)."""

    path: str
    rows: list[dict]
    format: str
    where: list[str]
    records: list[dict]

    def check_tasks(self, known: list[str]) -> None:
        """UserError naming the first row whose task is not in `known` (the tasks trained)."""
        for r, w in zip(self.rows, self.where, strict=True):
            if r["task"] not in known:
                raise UserError(f"{w}: task {r['task']!r} is not one of the tasks trained ({', '.join(known)})")

    def describe(self) -> str:
        return f"{self.path}: {len(self.rows)} rows, format {FORMATS[self.format]}"


def detect_format(columns, *, need_answer: bool = True) -> str | None:
    """The row format the columns hold (TRL's order: a conversation first), or None."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "instruction" in cols and ("output" in cols or not need_answer):
        return "alpaca"
    if "prompt" in cols and "completion" in cols:
        return "prompt-completion"
    if "prompt" in cols and ("response" in cols or not need_answer):
        return "prompt-response"
    return None


def load_rows(path: str, *, task_column: str = "task", task: str | None = None, need_answer: bool = True,
              known_tasks: list[str] | None = None) -> LoadedRows:
    """The rows of a data file; UserError for a file it cannot read or a bad row. `known_tasks`:
    a row naming another task is an error (the tasks trained)."""
    records = _read_records(path)
    lines = _jsonl_lines(path) if os.path.isfile(path) and _is_json_lines(path) else None
    where = [f"{path}:{lines[i]}" if lines and i < len(lines) else f"{path}: row {i + 1}" for i in range(len(records))]
    rows, fmt = normalize_records(records, path, where, task_column=task_column, task=task,
                                  need_answer=need_answer, columns=_columns(records, path))
    loaded = LoadedRows(path, rows, fmt, where, records)
    if known_tasks is not None:
        loaded.check_tasks(known_tasks)
    return loaded


def normalize_records(records: list[dict], path: str, where: list[str], *, task_column: str = "task",
                      task: str | None = None, need_answer: bool = True,
                      columns: list[str] | None = None) -> tuple[list[dict], str]:
    """(rows as plain dicts, format) of records in any accepted format; UserError naming the row
    (`where[i]`: the file and its row) for a bad one."""
    if not records:
        raise UserError(f"{path}: no rows")
    columns = columns if columns is not None else list(dict.fromkeys(k for r in records for k in r))
    fmt = detect_format(columns, need_answer=need_answer)
    if fmt is None:
        raise UserError(f"{path}: columns {', '.join(columns)} match no row format; expected one of: {ACCEPTED}")
    if task is not None and task_column in columns:
        raise UserError(f"{path}: --task {task} names the task of every row, but the file has a "
                        f"{task_column!r} column; leave one out")
    if task is None and task_column not in columns:
        raise UserError(f"{path}: no {task_column!r} column (columns: {', '.join(columns)}); name the task column "
                        f"with --task-column, or give --task NAME for a file of one task")
    rows = []
    for rec, w in zip(records, where, strict=True):
        row = _normalize(rec, fmt, task if task is not None else rec.get(task_column), need_answer)
        if isinstance(row, str):
            raise UserError(f"{w}: {row} (format {FORMATS[fmt]})")
        rows.append(row)
    return rows, fmt


# ---- one row -----------------------------------------------------------------------------------
def _text(rec: dict, key: str, *, empty_ok: bool = False, missing_ok: bool = False):
    """The string in rec[key], or an error message (a str starting with '!')."""
    value = rec.get(key)
    if value is None:
        if missing_ok:
            return ""
        return f"!{key} is missing"
    if not isinstance(value, str):
        return f"!{key} must be text, got {type(value).__name__}"
    if not value.strip() and not empty_ok:
        return f"!{key} is empty"
    return value


def _normalize(rec: dict, fmt: str, task, need_answer: bool) -> dict | str:
    """The plain row of one record, or an error message."""
    if isinstance(task, bool) or task is None or (isinstance(task, str) and not task.strip()):
        return "the task is missing or empty"
    if isinstance(task, (int, float)) and float(task).is_integer():
        task = str(int(task))  # a CSV column of numbers
    if not isinstance(task, str):
        return f"the task must be a name, got {type(task).__name__}"
    if fmt == "messages":
        return _conversation(rec.get("messages"), task, need_answer)
    if fmt == "alpaca":
        fields = {"prompt": _text(rec, "instruction"), "input": _text(rec, "input", empty_ok=True, missing_ok=True)}
        if need_answer:
            fields["response"] = _text(rec, "output", empty_ok=True)
    else:
        answer = "completion" if fmt == "prompt-completion" else "response"
        fields = {"prompt": _text(rec, "prompt")}
        if need_answer or rec.get(answer) is not None:
            fields["response"] = _text(rec, answer, empty_ok=True)
    for v in fields.values():
        if v.startswith("!"):
            return v[1:]
    row = {"task": task, "prompt": fields["prompt"]}
    if fields.get("input", "").strip():
        row["prompt"] = fields["prompt"] + "\n\n" + fields["input"]
    if "response" in fields:
        row["response"] = fields["response"]
    return row


def _conversation(messages, task: str, need_answer: bool) -> dict | str:
    if isinstance(messages, str):
        return "messages must be a list of {role, content} turns, got text"
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content} turns"
    turns = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"turn {i} of messages must be {{role, content}} with text values"
        if m["role"] not in ROLES:
            return f"turn {i} of messages has role {m['role']!r}; roles are {', '.join(ROLES)}"
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(t["role"] == "user" for t in turns):
        return "messages has no user turn"
    if need_answer and turns[-1]["role"] != "assistant":
        return "messages must end with an assistant turn (the answer to learn)"
    row = {"task": task, "messages": turns}
    if turns[-1]["role"] == "assistant":
        row["response"] = turns[-1]["content"]
    return row


# ---- files -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_datasets():
    """datasets without progress bars or its own error log lines (its errors are reported here)."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _read_records(path: str) -> list[dict]:
    """The records of a data file or save_to_disk folder, through datasets (no cache left behind)."""
    if os.path.isdir(path):
        return _read_saved(path)
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    builder = FILE_TYPES.get(ext, "json")  # another extension: JSON Lines, as this command always read
    kind = {".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}.get(ext, "JSON Lines")
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory() as cache:
        try:
            records = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train",
                                            cache_dir=cache, keep_in_memory=True).to_list()
        except Exception as e:  # datasets wraps pyarrow's and pandas' errors; bad UTF-8 fails in to_list
            bad = _first_bad_json_line(path) if builder == "json" else None
            if bad:
                raise UserError(f"{path}:{bad[0]}: {bad[1]}") from None
            raise UserError(f"{path}: cannot read it as {kind} ({_cause(e)})") from None
    if builder == "csv":  # a CSV file has no null: an empty cell is empty text
        records = [{k: "" if v is None else v for k, v in r.items()} for r in records]
    return records


def _read_saved(path: str) -> list[dict]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise UserError(f"{path}: a folder, but not one written by Dataset.save_to_disk "
                            f"({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise UserError(f"{path}: a DatasetDict of splits {', '.join(ds)}; expected a 'train' split or one "
                                f"split")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds.to_list()


def _columns(records: list[dict], path: str) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    """The innermost error's first line (pyarrow's or pandas' reason, not datasets' wrapper)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return _first_line(e)


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
    """(line, what is wrong) of the first line of a JSON file that is not a JSON object on its
    own, unless the whole file is one JSON document (an array of objects); None if none is."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line, col = _line_of_byte(path, e.start)
        return line, f"not UTF-8 text (byte at column {col}); save the file as UTF-8"
    try:
        whole = json.loads(text)
        if isinstance(whole, list) and not all(isinstance(x, dict) for x in whole):
            return 1, "expected an array of JSON objects"
        return None
    except json.JSONDecodeError:
        pass
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return n, f"not valid JSON ({e.msg})"
            if not isinstance(value, dict):
                return n, f"expected a JSON object, got {type(value).__name__}"
    return None


def _line_of_byte(path: str, offset: int) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read()[:offset]
    return head.count(b"\n") + 1, offset - (head.rfind(b"\n") + 1) + 1


def _is_json_lines(path: str) -> bool:
    return os.path.splitext(path)[1].lower() not in (".json", ".csv", ".parquet")


def _jsonl_lines(path: str) -> list[int]:
    """The line number of each record of a JSON Lines file (datasets skips blank lines)."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]
