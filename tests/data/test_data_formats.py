"""The data layer (data/formats.py, data/encode.py): every row format from every file type, the
loss masks against an independent tokenization (the character tokenizer's vocabulary looked up
by hand, the chat template written out by hand), multi-turn masking token by token, `train` on
each format, and a table of bad files, each one line naming the problem, nothing written."""

import json
import os

import pytest

from cgc_kernels import encode_dataset
from cgc_kernels.cli import main
from cgc_kernels.data.encode import IGNORE_INDEX, encode_row
from cgc_kernels.data.formats import load_rows
from cgc_kernels.multitask.models import char_tokenizer

TOK = char_tokenizer()
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]
PAIRS = [("add", "1 + 2", "3"), ("upper", "ab", "AB"), ("add", "2 + 2", "4"), ("upper", "cd", "CD")]
ROWS = {  # each format: the same four questions and answers
    "prompt-response": [{"task": t, "prompt": p, "response": r} for t, p, r in PAIRS],
    "prompt-completion": [{"task": t, "prompt": p, "completion": r} for t, p, r in PAIRS],
    "alpaca": [{"task": t, "instruction": "Answer.", "input": p, "output": r} for t, p, r in PAIRS],
    "messages": [{"task": t, "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                 for t, p, r in PAIRS],
}


def char_ids(text: str) -> list[int]:
    """The character tokenizer's ids, looked up in its vocabulary by hand."""
    vocab, out, i = TOK.get_vocab(), [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        out.append(vocab[special or text[i]])
        i += len(special) if special else 1
    return out


def turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def write(path, rows, kind: str) -> str:
    """rows as a file (or folder) of the given kind."""
    import datasets

    path = str(path)
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    elif kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(path, index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


KINDS = {"jsonl": "f.jsonl", "json": "f.json", "csv": "f.csv", "parquet": "f.parquet", "saved": "f_saved"}


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_format_from_every_file_type(tmp_path, fmt, kind):
    if kind == "csv" and fmt == "messages":
        pytest.skip("a CSV cell holds text, not a list of turns")
    loaded = load_rows(write(tmp_path / KINDS[kind], ROWS[fmt], kind))
    assert loaded.format == fmt
    assert [r["task"] for r in loaded.rows] == [t for t, _, _ in PAIRS]
    assert [r["response"] for r in loaded.rows] == [r for _, _, r in PAIRS]
    if fmt == "messages":
        assert [r["messages"][0]["content"] for r in loaded.rows] == [p for _, p, _ in PAIRS]
    else:
        prefix = "Answer.\n\n" if fmt == "alpaca" else ""
        assert [r["prompt"] for r in loaded.rows] == [prefix + p for _, p, _ in PAIRS]


def test_json_lines_in_a_json_file_and_an_alpaca_row_without_input(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps({"task": "a", "instruction": "Say hi.", "output": "hi"}) + "\n")
    assert load_rows(str(path)).rows == [{"task": "a", "prompt": "Say hi.", "response": "hi"}]


@pytest.mark.parametrize("fmt", list(ROWS))
def test_the_loss_is_on_the_answer_and_its_end_of_turn_token(fmt):
    rows = ROWS[fmt]
    if fmt == "alpaca":  # the tiny tokenizer reads "\n\n" (instruction, blank line, input) as one unknown token
        rows = [dict(r, instruction=r["input"], input="") for r in rows]
    ds = encode_dataset(rows, TOK, ["upper", "add"], max_length=64)
    assert ds["task_ids"] == [1, 0, 1, 0]
    for (_, p, r), ids, labels in zip(PAIRS, ds["input_ids"], ds["labels"], strict=True):
        prompt = char_ids(turn("user", p) + "<|im_start|>assistant\n")
        answer = char_ids(r + "<|im_end|>")
        assert ids[: len(prompt) + len(answer)] == prompt + answer
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt): len(prompt) + len(answer)] == answer
        assert all(t == IGNORE_INDEX for t in labels[len(prompt) + len(answer):])  # the template's last "\n"


def test_multi_turn_masking_token_by_token():
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    ids, labels = encode_row(TOK, {"task": "t", "messages": convo}, max_length=200)
    pieces = [(turn("system", "Be brief."), False), (turn("user", "hi"), False), ("<|im_start|>assistant\n", False),
              ("yo<|im_end|>", True), ("\n", False), (turn("user", "2+2?"), False),
              ("<|im_start|>assistant\n", False), ("4<|im_end|>", True), ("\n", False)]
    want_ids, want_labels = [], []
    for text, trained in pieces:
        t = char_ids(text)
        want_ids += t
        want_labels += t if trained else [IGNORE_INDEX] * len(t)
    assert ids == want_ids
    for k, (got, want) in enumerate(zip(labels, want_labels, strict=True)):
        assert got == want, f"token {k} ({TOK.decode([ids[k]])!r}): label {got}, expected {want}"
    # --system goes first unless the conversation has its own; a long conversation keeps its start.
    ids2, _ = encode_row(TOK, {"task": "t", "messages": convo[1:]}, max_length=200, system="Be brief.")
    assert ids2 == ids
    cut = next(k for k, t in enumerate(labels) if t != IGNORE_INDEX) + 2  # within the first answer
    short_ids, short_labels = encode_row(TOK, {"task": "t", "messages": convo}, max_length=cut)
    assert short_ids == ids[:cut] and short_labels == labels[:cut]
    with pytest.raises(ValueError, match="no answer token within the first"):
        encode_row(TOK, {"task": "t", "messages": convo}, max_length=cut - 2)


def test_encode_dataset_names_the_row_of_a_bad_one():
    rows = [dict(ROWS["prompt-response"][0]), {"task": "add", "prompt": "", "response": "1"}]
    with pytest.raises(ValueError, match="row 2: prompt is empty"):
        encode_dataset(rows, TOK, ["add"])
    with pytest.raises(ValueError, match="row 2: task 'upper' is not one of the tasks"):
        encode_dataset(ROWS["prompt-response"], TOK, ["add"])


# ---- the command: one training run per format, each from another file type ----------------------
RUNS = [("prompt-response", "saved"), ("prompt-completion", "csv"), ("alpaca", "json"), ("messages", "parquet")]


@pytest.mark.parametrize("fmt, kind", RUNS)
def test_train_reads_each_format(tmp_path, capsys, fmt, kind):
    data = write(tmp_path / KINDS[kind], ROWS[fmt], kind)
    out = tmp_path / "run"
    assert main(["train", "--tiny", "--data", data, "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--rank", "2", "--save-steps", "100"]) == 0
    log = capsys.readouterr().out
    assert f"{data}: 4 rows, format" in log and "2 steps" in log
    assert json.loads((out / "cgc_cli.json").read_text())["tasks"] == ["add", "upper"]
    if fmt == "messages":  # generate reads conversations too: the answer to the last user turn
        prompts = [{"task": "add", "messages": [{"role": "user", "content": "1 + 1"}]},
                   {"task": "upper", "messages": [{"role": "user", "content": "ab"}, {"role": "assistant",
                                                  "content": "AB"}, {"role": "user", "content": "cd"}]}]
        answers = tmp_path / "answers.jsonl"
        assert main(["generate", str(out), "--input", write(tmp_path / "p.parquet", prompts, "parquet"),
                     "--output", str(answers), "--max-new-tokens", "2"]) == 0
        got = [json.loads(line) for line in answers.read_text().splitlines()]
        assert [g["task"] for g in got] == ["add", "upper"] and all(isinstance(g["output"], str) for g in got)
    if fmt == "prompt-completion":  # and compare
        assert main(["compare", "--tiny", "--data", data, "--eval-data", data, "--out", str(tmp_path / "cmp"),
                     "--steps", "1", "--batch-size", "4", "--warmup-steps", "0", "--rank", "4", "--seeds", "0",
                     "--max-new-tokens", "2", "--target-modules", "q_proj", "--cgc-shared", "2", "--cgc-task", "1",
                     "--moe-experts", "4"]) == 0
        assert (tmp_path / "cmp" / "compare.json").is_file()
    if fmt == "alpaca":  # and cluster
        clusters = tmp_path / "clusters.json"
        assert main(["cluster", "--tiny", "--data", data, "--num-clusters", "2", "--clusters-out", str(clusters),
                     "--warmup-steps", "1", "--batches", "1", "--batch-size", "2", "--rank", "2"]) == 0
        assert sorted(json.loads(clusters.read_text())) == ["add", "upper"]


def test_task_and_task_column(tmp_path, capsys):
    one = write(tmp_path / "one.jsonl", [{"prompt": p, "response": r} for _, p, r in PAIRS], "jsonl")
    assert main(["train", "--tiny", "--data", one, "--task", "solo", "--out", str(tmp_path / "a"),
                 "--steps", "1", "--batch-size", "4", "--rank", "2"]) == 0
    assert json.loads((tmp_path / "a" / "cgc_cli.json").read_text())["tasks"] == ["solo"]
    renamed = write(tmp_path / "kind.csv", [{"kind": t, "prompt": p, "completion": r} for t, p, r in PAIRS], "csv")
    rows = load_rows(renamed, task_column="kind").rows
    assert [r["task"] for r in rows] == [t for t, _, _ in PAIRS]


# ---- bad files: one line naming the file, the row and the problem; nothing written -----------------
GOOD = json.dumps({"task": "add", "prompt": "1 + 1", "response": "2"})
BAD = [  # (file name, content, extra arguments, what the one line says)
    ("chat.jsonl", json.dumps({"task": "a", "messages": "hi"}) + "\n", [],
     ["chat.jsonl:1:", "messages must be a list"]),
    ("turns.jsonl", json.dumps({"task": "a", "messages": [{"role": "bot", "content": "x"}]}) + "\n", [],
     ["turns.jsonl:1:", "role 'bot'"]),
    ("noanswer.jsonl", json.dumps({"task": "a", "messages": [{"role": "user", "content": "x"}]}) + "\n", [],
     ["noanswer.jsonl:1:", "must end with an assistant turn"]),
    ("cut.jsonl", GOOD + "\n\n" + GOOD[:-1] + "\n", [], ["cut.jsonl:3:", "not valid JSON"]),
    ("array.json", "[" + GOOD + ", 3]", [], ["array.json:1:", "array of JSON objects"]),
    ("empty.jsonl", GOOD + "\n" + json.dumps({"task": "add", "prompt": " ", "response": "2"}) + "\n", [],
     ["empty.jsonl:2:", "prompt is empty", "{task, prompt, response}"]),
    ("cols.csv", "question,answer\nx,y\n", [], ["cols.csv", "match no row format", "{task, messages}",
                                                  "{task, instruction, input, output}"]),
    ("notask.jsonl", json.dumps({"prompt": "x", "response": "y"}) + "\n", [], ["no 'task' column", "--task NAME"]),
    ("both.jsonl", GOOD + "\n", ["--task", "x"], ["has a 'task' column"]),
    ("fake.parquet", "not parquet\n", [], ["fake.parquet: cannot read it as Parquet"]),
    ("data.txt", "task,prompt,response\n", [], ["data.txt:1: not valid JSON"]),  # read as JSON Lines
    ("latin1.jsonl", GOOD + "\n" + '{"task": "add", "prompt": "caf\xe9", "response": "1"}\n', [],
     ["latin1.jsonl:2:", "not UTF-8"]),
]


@pytest.mark.parametrize("name, content, extra, needles", BAD, ids=[b[0] for b in BAD])
def test_a_bad_file_is_one_line_and_nothing_is_written(tmp_path, capsys, name, content, extra, needles):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1") if name.startswith("latin1") else content.encode())
    out = tmp_path / "out"
    assert main(["train", "--tiny", "--data", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [name]


def test_a_folder_that_is_not_a_saved_dataset(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert main(["train", "--tiny", "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "o")]) == 2
    assert "not one written by Dataset.save_to_disk" in capsys.readouterr().err


def test_eval_rows_are_named_by_their_line_before_interleaving(tmp_path, capsys):
    train = write(tmp_path / "t.jsonl", ROWS["prompt-response"], "jsonl")
    held = tmp_path / "h.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS["prompt-response"][:2],
                                                              {"task": "poetry", "prompt": "x", "response": "y"}]))
    assert main(["train", "--tiny", "--data", train, "--eval-data", str(held), "--out", str(tmp_path / "o")]) == 2
    assert f"{held}:3: task 'poetry'" in capsys.readouterr().err
