"""The multi-task suite: rebuilt byte for byte from its builder, and each part has the property it
claims (transfer: related arithmetic with a low-resource task and new held-out pairs; conflict:
the same reviews with opposite labels; unrelated: new held-out nouns). Answers are recomputed
here from the prompts, independently of the builder."""

import re
from collections import Counter

import pytest

from cgc_kernels.data import demo_tasks, suite_tasks
from cgc_kernels.data.reader import read_jsonl, tasks_of
from tests.data.shipped import assert_builder_reproduces_shipped


def test_builder_reproduces_shipped_files(tmp_path):
    assert_builder_reproduces_shipped(suite_tasks, tmp_path)


@pytest.fixture(scope="module")
def splits():
    train, held = (read_jsonl(p) for p in suite_tasks.paths())  # what a user trains on
    return train, held


def _of(rows, task):
    return [r for r in rows if r["task"] == task]


def test_sizes_parts_and_low_resource(splits):
    train, held = splits
    assert tasks_of(train) == list(suite_tasks.TASKS) == tasks_of(held)
    assert sorted(t for part in suite_tasks.PARTS.values() for t in part) == sorted(suite_tasks.TASKS)
    for t in suite_tasks.TASKS:
        assert len(_of(train, t)) == suite_tasks.TRAIN_ROWS[t]
        assert len(_of(held, t)) == suite_tasks.EVAL_PER_TASK >= 100
    low = suite_tasks.LOW_RESOURCE
    assert low in suite_tasks.PARTS["transfer"] and len(_of(train, low)) == 30
    # The low-resource task's relatives have ten times its rows.
    assert all(len(_of(train, t)) >= 10 * 30 for t in suite_tasks.PARTS["transfer"] if t != low)
    for r in train + held:
        assert set(r) == {"task", "prompt", "response"} and r["prompt"] and r["response"]


def _pair(r) -> tuple[int, int]:
    """(x, y) of an arithmetic row, checking its answer: additions x + y, subtractions (x + y) - y."""
    nums = list(map(int, re.findall(r"\d+", r["prompt"])))
    assert len(nums) == 2, r
    p = r["prompt"]
    if r["task"] == "add" or (r["task"] == "word_problem" and " more" in p):
        x, y = nums
        assert int(r["response"]) == x + y, r
        return x, y
    if r["task"] == "sub" and p.startswith("Subtract"):
        y, s = nums
    else:
        assert r["task"] == "sub" or any(w in p for w in ("away", "lost")), r
        s, y = nums
    assert int(r["response"]) == s - y > 0, r
    return s - y, y


def test_transfer_answers_and_new_held_out_pairs(splits):
    train, held = splits
    arithmetic = suite_tasks.PARTS["transfer"]
    seen = {_pair(r) for t in arithmetic for r in _of(train, t)}
    for t in arithmetic:
        pairs = [_pair(r) for r in _of(held, t)]
        assert len(set(pairs)) == len(pairs)
        assert not set(pairs) & seen, f"{t}: a held-out pair is in some arithmetic task's training rows"
    # The word problems mix both operations, so they need what add and sub teach.
    kinds = Counter(" more" in r["prompt"] for r in _of(train + held, "word_problem"))
    assert kinds[True] > 20 and kinds[False] > 20


def test_conflict_same_inputs_opposite_answers(splits):
    train, held = splits
    a, b = suite_tasks.PARTS["conflict"]
    polarity = {w: "positive" for w in demo_tasks._POSITIVE} | {w: "negative" for w in demo_tasks._NEGATIVE}
    for rows in (train, held):
        ra, rb = _of(rows, a), _of(rows, b)
        inputs_a = Counter(suite_tasks.review_of(r["prompt"]) for r in ra)
        inputs_b = Counter(suite_tasks.review_of(r["prompt"]) for r in rb)
        assert inputs_a == inputs_b  # the same reviews, as often, in both tasks
        label_a = {suite_tasks.review_of(r["prompt"]): r["response"] for r in ra}
        label_b = {suite_tasks.review_of(r["prompt"]): r["response"] for r in rb}
        for text, la in label_a.items():
            assert {la, label_b[text]} == {"positive", "negative"}, text
            adj = next(w for w in re.findall(r"[a-z]+", text) if w in polarity)
            assert la == polarity[adj], text  # sentiment is the review's polarity, inverted the opposite
        # The task is named in the prompt: the two tasks' prompts for one review differ.
        assert not {r["prompt"] for r in ra} & {r["prompt"] for r in rb}
        assert Counter(r["response"] for r in ra) == {"positive": len(ra) // 2, "negative": len(ra) // 2}
    train_reviews = {suite_tasks.review_of(r["prompt"]) for r in _of(train, a)}
    assert not train_reviews & {suite_tasks.review_of(r["prompt"]) for r in _of(held, a)}


@pytest.mark.parametrize("word, want", [("box", "boxes"), ("ferry", "ferries"), ("tray", "trays"),
                                        ("paintbrush", "paintbrushes"), ("essay", "essays")])
def test_plural_rule(word, want):
    assert suite_tasks.plural(word) == want  # the regular rule; irregular nouns are kept out of the lists


def test_unrelated_held_out_nouns_are_new(splits):
    train, held = splits

    def noun(r):
        return next(w for w in re.findall(r"[a-z]+", r["prompt"]) if suite_tasks.plural(w) == r["response"])

    train_nouns = {noun(r) for r in _of(train, "plural")}
    held_nouns = [noun(r) for r in _of(held, "plural")]
    assert len(set(held_nouns)) == len(held_nouns) == 100
    assert not train_nouns & set(held_nouns)
    assert len(train_nouns) >= 150  # enough variety that training is not a 20-word lookup
