"""A multi-task suite that can tell sharing methods apart, built deterministically (seeded RNG only).

The demo's four tasks barely interact (gradient cosines <= 0.2), so no method wins there. This
suite plants the two effects that multi-task adapters are about, plus a bystander:

    part       task                train / held-out  prompt -> response
    transfer   add                 300 / 100   "What is 37 + 45?" -> "82"
    transfer   sub                 300 / 100   "What is 82 - 45?" -> "37"
    transfer   word_problem         30 / 100   "Mia has 37 coins and finds 45 more. How many ...?" -> "82"
    conflict   sentiment           300 / 100   "Review: The soup was bland.\nTask: sentiment. ..." -> "negative"
    conflict   sentiment_inverted  300 / 100   "Review: The soup was bland.\nTask: inverted sentiment. ..."
                                               -> "positive"
    unrelated  plural              300 / 100   "Give the plural of: berry" -> "berries"

* Transfer: the three arithmetic tasks share one skill and one answer format (the bare number).
  word_problem is the low-resource task (30 rows beside 300): on its own it has almost nothing to
  learn from, so sharing with add and sub should lift it. Held-out number pairs are new to every
  arithmetic task (no training row of any task uses them).
* Conflict (the seesaw): sentiment and sentiment_inverted see exactly the same reviews, train and
  held-out alike, and always answer opposite labels. The task is named in the prompt, so a
  shared adapter is not blind to it, but whatever it shares between the two pulls both ways.
* Unrelated: plural, a word transform; its held-out nouns never appear in training.

Rows are JSON objects {"task", "prompt", "response"}, one a line, each task's rows in turn.

    python -m cgc_kernels.data.suite_tasks [OUT_DIR]   # rewrites cgc_kernels/data/suite_{train,eval}.jsonl
"""

from __future__ import annotations

import os
import random
import sys

from . import demo_tasks

SEED = 20261202
FILES = ("suite_train.jsonl", "suite_eval.jsonl")
SYSTEM = "Answer briefly."  # the system prompt the suite is meant to be trained and scored with
EVAL_PER_TASK = 100
TRAIN_ROWS = {"add": 300, "sub": 300, "word_problem": 30, "sentiment": 300, "sentiment_inverted": 300,
              "plural": 300}
TASKS = tuple(TRAIN_ROWS)
PARTS = {"transfer": ("add", "sub", "word_problem"), "conflict": ("sentiment", "sentiment_inverted"),
         "unrelated": ("plural",)}
LOW_RESOURCE = "word_problem"

_ADD_FORMS = ("What is {x} + {y}?", "Add {x} and {y}.", "Compute {x} plus {y}.")
_SUB_FORMS = ("What is {s} - {y}?", "Subtract {y} from {s}.", "Compute {s} minus {y}.")
_NAMES = ("Mia", "Leo", "Ava", "Omar", "Zoe", "Ivan", "Nora", "Ravi", "Lena", "Sam", "Yuki", "Ben")
_ITEMS = ("apples", "coins", "stamps", "marbles", "books", "cards", "shells", "pencils", "stickers", "buttons")
# Each story is an addition (x + y) or a subtraction ((x + y) - y = x) of the pair (x, y).
_STORY_ADD = ("{n} has {x} {i} and finds {y} more. How many {i} does {n} have now?",
              "{n} had {x} {i}. A friend gave {n} {y} more. How many {i} does {n} have?")
_STORY_SUB = ("{n} had {s} {i} and gave {y} away. How many {i} are left?",
              "{n} had {s} {i} and lost {y} of them. How many {i} does {n} have now?")

_REVIEW = "Review: {text}"
_TASK_LINE = {"sentiment": "Task: sentiment. Is the review positive or negative?",
              "sentiment_inverted": "Task: inverted sentiment. Is the review positive or negative?"}

# Regular nouns beyond the demo's, so that 100 held-out nouns leave enough for training.
_MORE_NOUNS = (
    "acorn", "arrow", "badge", "balloon", "blossom", "bucket", "cabin", "canal", "carrot", "cereal",
    "collar", "comet", "corner", "cradle", "crayon", "dolphin", "eagle", "elbow", "falcon", "feather",
    "fence", "finger", "folder", "fountain", "gadget", "glove", "goblin", "harbor", "heron", "hollow",
    "jewel", "kernel", "kitchen", "lantern", "lizard", "locket", "marble", "meadow", "melon",
    "mitten", "muffin", "nugget", "oyster", "paddle", "pebble", "pepper", "pirate", "planner", "pond",
    "pumpkin", "quilt", "raven", "ribbon", "robot", "rocket", "salad", "sailor", "scarf", "seagull",
    "shovel", "singer", "sister", "sparrow", "squirrel", "stapler", "sweater", "tablet", "tailor", "thimble",
    "tower", "trumpet", "turtle", "umbrella", "vessel", "wagon", "walnut", "whistle", "winter", "wizard",
    "yacht", "zipper", "beard", "canyon", "desert", "harp", "igloo", "jar", "kite", "lion",
    "mask", "owl", "pearl", "rose", "seal", "trail", "vase", "wand", "bear", "crown",
    "fax", "inbox", "mailbox", "sandbox", "ostrich", "peach", "radish", "saucer", "wrench", "paintbrush",
    "ally", "bakery", "bunny", "daisy", "fairy", "gallery", "jelly", "lily", "nanny", "ferry",
    "alley", "jockey", "monkey", "trolley", "essay", "highway", "railway", "tray", "ray", "jersey",
)


def plural(word: str) -> str:
    """The regular English plural of `word` (the demo's rule)."""
    return demo_tasks.plural(word)


def _arithmetic(rng: random.Random) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """add, sub and word_problem over number pairs (x, y), 10 <= x, y <= 99; no held-out pair is
    used by any arithmetic task's training rows."""
    pairs = [(x, y) for x in range(10, 100) for y in range(10, 100)]
    rng.shuffle(pairs)
    n_eval = EVAL_PER_TASK
    eval_pairs = {"add": pairs[:n_eval], "sub": pairs[n_eval:2 * n_eval], "word_problem": pairs[2 * n_eval:3 * n_eval]}
    rest = pairs[3 * n_eval:]
    train_pairs, start = {}, 0
    for t in PARTS["transfer"]:
        train_pairs[t] = rest[start:start + TRAIN_ROWS[t]]
        start += TRAIN_ROWS[t]

    def row(task: str, x: int, y: int) -> dict:
        if task == "add":
            return {"task": task, "prompt": rng.choice(_ADD_FORMS).format(x=x, y=y), "response": str(x + y)}
        if task == "sub":
            return {"task": task, "prompt": rng.choice(_SUB_FORMS).format(s=x + y, y=y), "response": str(x)}
        adding = rng.random() < 0.5
        form = rng.choice(_STORY_ADD if adding else _STORY_SUB)
        text = form.format(n=rng.choice(_NAMES), i=rng.choice(_ITEMS), x=x, y=y, s=x + y)
        return {"task": task, "prompt": text, "response": str(x + y if adding else x)}

    train = {t: [row(t, x, y) for x, y in train_pairs[t]] for t in PARTS["transfer"]}
    held = {t: [row(t, x, y) for x, y in eval_pairs[t]] for t in PARTS["transfer"]}
    return train, held


def _review_texts(rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (review text, label), half positive; no text in both."""
    texts = [(form.format(thing=thing, adj=adj), label)
             for label, adjs in (("positive", demo_tasks._POSITIVE), ("negative", demo_tasks._NEGATIVE))
             for adj in adjs for thing in demo_tasks._THINGS for form in demo_tasks._SENT_FORMS]
    by_label = {lab: [t for t in texts if t[1] == lab] for lab in ("positive", "negative")}
    for v in by_label.values():
        rng.shuffle(v)
    n_tr, n_ev = TRAIN_ROWS["sentiment"] // 2, EVAL_PER_TASK // 2
    pos, neg = by_label["positive"], by_label["negative"]
    held = [x for pair in zip(pos[:n_ev], neg[:n_ev], strict=True) for x in pair]
    train = [x for pair in zip(pos[n_ev:n_ev + n_tr], neg[n_ev:n_ev + n_tr], strict=True) for x in pair]
    return train, held


def _conflict(rng: random.Random) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    flip = {"positive": "negative", "negative": "positive"}
    train_texts, held_texts = _review_texts(rng)

    def rows(task: str, texts: list[tuple[str, str]]) -> list[dict]:
        return [{"task": task, "prompt": _REVIEW.format(text=text) + "\n" + _TASK_LINE[task],
                 "response": label if task == "sentiment" else flip[label]} for text, label in texts]

    train = {t: rows(t, train_texts) for t in PARTS["conflict"]}
    held = {t: rows(t, held_texts) for t in PARTS["conflict"]}
    return train, held


def _plural(rng: random.Random) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    nouns = list(dict.fromkeys(demo_tasks._NOUNS + _MORE_NOUNS))  # drop repeats, keep order
    rng.shuffle(nouns)
    held_nouns, train_nouns = nouns[:EVAL_PER_TASK], nouns[EVAL_PER_TASK:]

    def row(w: str) -> dict:
        return {"task": "plural", "prompt": rng.choice(demo_tasks._PLURAL_FORMS).format(w=w), "response": plural(w)}

    train = [row(rng.choice(train_nouns)) for _ in range(TRAIN_ROWS["plural"])]
    return {"plural": train}, {"plural": [row(w) for w in held_nouns]}


def build() -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each task's rows in turn in TASKS order; identical on every run."""
    rng = random.Random(SEED)
    train: dict[str, list[dict]] = {}
    held: dict[str, list[dict]] = {}
    for make in (_arithmetic, _conflict, _plural):
        tr, ev = make(rng)
        train.update(tr)
        held.update(ev)
    return [r for t in TASKS for r in train[t]], [r for t in TASKS for r in held[t]]


def review_of(prompt: str) -> str:
    """The review text of a conflict-task prompt: what sentiment and sentiment_inverted share."""
    first = prompt.split("\n", 1)[0]
    if not first.startswith("Review: "):
        raise ValueError(f"not a review prompt: {prompt!r}")
    return first[len("Review: "):]


def data_dir() -> str:
    """The directory of the shipped suite files (package data, beside the demo's)."""
    return os.path.dirname(os.path.abspath(__file__))


def paths() -> tuple[str, str]:
    """(train file, held-out file) as shipped."""
    return tuple(os.path.join(data_dir(), name) for name in FILES)


def write(out_dir: str | None = None) -> list[str]:
    """Write suite_train.jsonl and suite_eval.jsonl into `out_dir` (default: the package data)."""
    return demo_tasks.write_files(out_dir or data_dir(), FILES, build())


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else None):
        print(p)
