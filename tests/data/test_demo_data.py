"""The demo's data: rebuilt byte for byte from its builder, and held-out items are really new."""

import json
import re

import pytest

from cgc_kernels.data import demo_tasks as demo_data
from tests.data.shipped import assert_builder_reproduces_shipped, shipped


def test_builder_reproduces_shipped_files(tmp_path):
    assert_builder_reproduces_shipped(demo_data, tmp_path)


@pytest.fixture(scope="module")
def splits():
    train, held = demo_data.build()
    return train, held


def _by_task(rows, task):
    return [r for r in rows if r["task"] == task]


def test_sizes_and_fields(splits):
    train, held = splits
    for t in demo_data.TASKS:
        assert len(_by_task(train, t)) == demo_data.TRAIN_PER_TASK
        assert len(_by_task(held, t)) == demo_data.EVAL_PER_TASK
    for r in train + held:
        assert set(r) == {"task", "prompt", "response"} and r["prompt"] and r["response"]


def test_answers_are_right(splits):
    train, held = splits
    for r in _by_task(train + held, "add"):
        a, b = map(int, re.findall(r"\d+", r["prompt"]))
        assert int(r["response"]) == a + b
    capitals = dict(demo_data._CAPITALS)
    for r in _by_task(train + held, "capital"):
        country = next(c for c in capitals if c in r["prompt"])
        assert r["response"] == capitals[country]
    for r in _by_task(train + held, "sentiment"):
        polar = demo_data._POSITIVE + demo_data._NEGATIVE
        adj = next(w for w in re.findall(r"[a-z]+", r["prompt"]) if w in polar)
        assert r["response"] == ("positive" if adj in demo_data._POSITIVE else "negative")


@pytest.mark.parametrize("word, want", [("box", "boxes"), ("church", "churches"), ("city", "cities"),
                                        ("key", "keys"), ("apple", "apples"), ("bus", "buses")])
def test_plural_rules(word, want):
    assert demo_data.plural(word) == want


def test_held_out_items_are_new(splits):
    train, held = splits

    def nums(rows):
        return {tuple(map(int, re.findall(r"\d+", r["prompt"]))) for r in rows}

    assert not nums(_by_task(train, "add")) & nums(_by_task(held, "add"))
    # Plural: held-out nouns never appear in training.
    def field(rows, task, key):
        return {r[key] for r in _by_task(rows, task)}

    assert not field(train, "plural", "response") & field(held, "plural", "response")
    # Capitals: held-out phrasings never appear in training.
    assert not field(train, "capital", "prompt") & field(held, "capital", "prompt")
    # Sentiment: held-out adjectives never appear in training.
    adjs = set(demo_data._POSITIVE + demo_data._NEGATIVE)

    def words(rows):
        return {w for r in rows for w in re.findall(r"[a-z]+", r["prompt"]) if w in adjs}

    assert not words(_by_task(train, "sentiment")) & words(_by_task(held, "sentiment"))
    # Both labels present in each split.
    assert {r["response"] for r in _by_task(held, "sentiment")} == {"positive", "negative"}


def test_files_are_jsonl_one_object_a_line():
    for name in demo_data.FILES:
        lines = shipped(demo_data, name).splitlines()
        assert all(isinstance(json.loads(line), dict) for line in lines)
