"""Rows to tokens: the prompt as the model sees it (the chat template with the assistant turn
opened), and training examples with the loss on the answers only.

    encoded = encode_dataset(dataset, tokenizer, cgc.tasks, max_length=256)
    # a datasets.Dataset: input_ids, labels (-100 outside the answers), task_ids (indexes of tasks)

A single-turn row (prompt and response) is the templated prompt, then the response and the
end-of-turn token, which is all the loss sees; a long prompt keeps its end. A conversation
(`messages`) is the template applied to all its turns; the loss is on every assistant turn, each
up to and including its end-of-turn token, and a long conversation keeps its start.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def prompt_text(tokenizer, prompt: str, system: str | None) -> str:
    """The prompt as the model sees it: chat template with the assistant turn opened, if any."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return (system + "\n\n" if system else "") + prompt + "\n"


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation with `system` as its first turn, unless it has a system turn of its own."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("rows of {task, messages} need a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def row_prompt_text(tokenizer, row: dict, system: str | None) -> str:
    """What the model is given to answer `row`: for a conversation, every turn before its final
    assistant turn (the answer), with the assistant turn opened."""
    if "messages" in row:
        turns = row["messages"]
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        return _render(tokenizer, with_system(turns, system), True)
    return prompt_text(tokenizer, row["prompt"], system)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + end-of-turn) of a templated prompt, at most max_length together:
    a long response keeps its first half of max_length, a long prompt its end."""
    resp = _ids(tokenizer, response) + [tokenizer.eos_token_id]
    if len(resp) >= max_length:
        resp = resp[: max_length // 2]
    p = _ids(tokenizer, prompt)
    p = p[-(max_length - len(resp)):]  # keep the end of a long prompt (the assistant turn)
    return p, resp


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: labels on each assistant turn's tokens up to its
    end-of-turn token, IGNORE_INDEX elsewhere; the first max_length tokens."""
    ids = _ids(tokenizer, _render(tokenizer, messages, False))
    labels = [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _ids(tokenizer, _render(tokenizer, messages[:k], True))
        through = _ids(tokenizer, _render(tokenizer, messages[: k + 1], False))
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError("the chat template renders a conversation's first turns differently from the whole "
                             "conversation, so the assistant turns cannot be located in its tokens")
        span = ids[len(before): len(through)]
        end = len(span) - span[::-1].index(eos) if eos in span else len(span)  # through the end-of-turn token
        labels[len(before): len(before) + end] = span[:end]
    return ids[:max_length], labels[:max_length]


def encode_row(tokenizer, row: dict, max_length: int, system: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row (see the module docstring); ValueError if no answer token
    is left within max_length."""
    if "messages" in row:
        ids, labels = encode_conversation(tokenizer, with_system(row["messages"], system), max_length)
    else:
        p, resp = encode_prompt_response(tokenizer, prompt_text(tokenizer, row["prompt"], system),
                                         row["response"], max_length)
        ids, labels = p + resp, [IGNORE_INDEX] * len(p) + resp
    if all(t == IGNORE_INDEX for t in labels):
        raise ValueError(f"no answer token within the first {max_length} tokens")
    return ids, labels


def encode_dataset(dataset, tokenizer, tasks, *, max_length: int = 1024, system: str | None = None,
                   task_column: str = "task", task: str | None = None):
    """Training examples of `dataset` in any accepted row format (see formats.py): a
    datasets.Dataset with input_ids, labels (IGNORE_INDEX outside the answers) and task_ids (the
    index of each row's task in `tasks`, e.g. CGCModel.tasks).

    Args:
        dataset: a datasets.Dataset, a list of dicts, or a path that load_rows reads.
        tokenizer: the model's tokenizer (its chat template wraps the prompts).
        tasks: the task names in the model's order.
        max_length: tokens per example at most.
        system: a system prompt for every row without its own.
        task_column / task: the column naming each row's task, or the one task of every row.
    """
    import datasets

    from .errors import UserError
    from .formats import load_rows, normalize_records

    tasks = list(tasks)
    if isinstance(dataset, (str, bytes)) or hasattr(dataset, "__fspath__"):
        loaded = load_rows(str(dataset), task_column=task_column, task=task)
        rows, where, name = loaded.rows, loaded.where, loaded.path
    else:
        records = dataset.to_list() if isinstance(dataset, datasets.Dataset) else list(dataset)
        where = [f"row {i + 1}" for i in range(len(records))]
        name = "dataset"
        try:
            rows, _ = normalize_records(records, name, where, task_column=task_column, task=task)
        except UserError as e:
            raise ValueError(str(e)) from None
    out = {"input_ids": [], "labels": [], "task_ids": []}
    for r, w in zip(rows, where, strict=True):
        if r["task"] not in tasks:
            raise ValueError(f"{name}: {w}: task {r['task']!r} is not one of the tasks ({', '.join(tasks)})")
        try:
            ids, labels = encode_row(tokenizer, r, max_length, system)
        except ValueError as e:
            raise ValueError(f"{name}: {w}: {e}") from None
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["task_ids"].append(tasks.index(r["task"]))
    return datasets.Dataset.from_dict(out)
