"""The demo's multi-task instruction set, built deterministically (no randomness outside a seeded RNG).

Four tasks of different kinds, each with a train split and a held-out split that shares no
item with it:

    add        arithmetic      "What is 37 + 45?"                         -> "82"
    sentiment  classification  "Review: The soup was bland. Sentiment?"   -> "negative"
    capital    knowledge       "What is the capital of Peru?"             -> "Lima"
    plural     word transform  "Give the plural of: berry"                -> "berries"

Held-out items are new: addition pairs, sentiment adjectives and plural nouns never seen in
training; capitals are asked with phrasings never seen in training. Rows are JSON objects
{"task", "prompt", "response"}, one a line.

    python -m cgc_kernels.data.demo_tasks [OUT_DIR]     # rewrites cgc_kernels/data/demo_{train,eval}.jsonl
"""

from __future__ import annotations

import json
import os
import random
import sys

TRAIN_PER_TASK = 300
EVAL_PER_TASK = 50
SEED = 20240229
FILES = ("demo_train.jsonl", "demo_eval.jsonl")
TASKS = ("add", "sentiment", "capital", "plural")

_ADD_FORMS = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.")

_POSITIVE = (
    "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "brilliant", "charming",
    "amazing", "pleasant", "great", "enjoyable", "impressive", "marvelous", "outstanding", "perfect",
    "beautiful", "fabulous", "terrific", "splendid", "cheerful", "friendly", "elegant", "refreshing",
)
_NEGATIVE = (
    "terrible", "awful", "dreadful", "horrible", "disappointing", "boring", "bland", "rude", "dirty",
    "miserable", "poor", "annoying", "unpleasant", "mediocre", "disgusting", "broken", "painful",
    "useless", "noisy", "gloomy", "tedious", "sloppy", "clumsy", "stale",
)
_THINGS = (
    "movie", "soup", "hotel", "service", "concert", "book", "meal", "room", "staff", "show", "game",
    "trip", "coffee", "phone", "class", "museum", "park", "album", "restaurant", "flight",
)
_SENT_FORMS = ("The {thing} was {adj}.", "What a {adj} {thing}!", "I found the {thing} {adj}.",
               "Honestly, the {thing} is {adj}.")
_SENT_PROMPT = "Review: {text} Is the sentiment positive or negative?"

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Cuba", "Havana"),
    ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Turkey", "Ankara"), ("India", "New Delhi"), ("South Korea", "Seoul"), ("Australia", "Canberra"),
    ("Brazil", "Brasilia"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Ukraine", "Kyiv"), ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"), ("England", "London"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
)
_CAP_TRAIN = ("What is the capital of {c}?", "Name the capital city of {c}.",
              "Which city is the capital of {c}?")
_CAP_EVAL = ("{c} has which city as its capital?", "Tell me the capital of {c}.")

# Regular nouns (plural by rule: +s, +es after s/x/z/ch/sh, consonant+y -> ies).
_NOUNS = (
    "apple", "table", "chair", "window", "garden", "river", "mountain", "bottle", "pencil", "candle",
    "flower", "planet", "rocket", "ticket", "basket", "button", "carpet", "dragon", "engine", "forest",
    "hammer", "island", "jacket", "kitten", "ladder", "magnet", "needle", "orange", "pillow", "rabbit",
    "saddle", "tunnel", "violin", "wallet", "anchor", "barrel", "cactus", "doctor", "farmer", "guitar",
    "helmet", "insect", "jungle", "kettle", "lemon", "monkey", "napkin", "oven", "parrot", "puzzle",
    "box", "fox", "tax", "wax", "bus", "glass", "dress", "class", "kiss", "boss",
    "church", "bench", "brush", "dish", "watch", "match", "peach", "beach", "branch", "bush",
    "wish", "lunch", "torch", "coach", "sandwich", "crash", "witness", "address", "princess", "business",
    "city", "baby", "berry", "party", "story", "lady", "puppy", "cherry", "country", "family",
    "library", "battery", "factory", "memory", "penny", "pony", "enemy", "army", "diary", "candy",
    "boy", "toy", "key", "day", "valley", "turkey", "donkey", "journey", "chimney",
    "book", "door", "house", "horse", "bird", "tree", "car", "road", "star", "cloud", "stone", "shoe",
    "ship", "lamp", "coin", "bell", "drum", "frog", "goat", "lake", "nest", "ring", "rope", "sock",
    "tent", "wave", "year", "zebra", "camera", "pizza", "banana", "tiger", "spider", "dinosaur",
    "letter", "number", "picture", "student", "teacher", "village", "bridge", "castle", "market",
    "mirror", "blanket", "cookie", "rainbow", "shadow", "signal", "pocket", "lesson", "cousin",
)
_PLURAL_FORMS = ("Give the plural of: {w}", "What is the plural form of the word \"{w}\"?",
                 "Write the plural of {w}.")


def plural(word: str) -> str:
    """The regular English plural of `word`."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _split(items: list, n_eval: int, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]


def _add(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    train_pairs, eval_pairs = _split(pairs, EVAL_PER_TASK, rng)
    train_pairs = train_pairs[:TRAIN_PER_TASK]

    def row(a, b, forms):
        return {"task": "add", "prompt": rng.choice(forms).format(a=a, b=b), "response": str(a + b)}

    return [row(a, b, _ADD_FORMS) for a, b in train_pairs], [row(a, b, _ADD_FORMS) for a, b in eval_pairs]


def _sentiment(rng: random.Random) -> tuple[list[dict], list[dict]]:
    # Held-out adjectives: 6 of each polarity never appear in training.
    pos_train, pos_eval = _split(_POSITIVE, 6, rng)
    neg_train, neg_eval = _split(_NEGATIVE, 6, rng)

    def rows(pos, neg, n):
        out = []
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            adj = rng.choice(pos if label == "positive" else neg)
            text = rng.choice(_SENT_FORMS).format(thing=rng.choice(_THINGS), adj=adj)
            out.append({"task": "sentiment", "prompt": _SENT_PROMPT.format(text=text), "response": label})
        return out

    return rows(pos_train, neg_train, TRAIN_PER_TASK), rows(pos_eval, neg_eval, EVAL_PER_TASK)


def _capital(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train = [{"task": "capital", "prompt": rng.choice(_CAP_TRAIN).format(c=c), "response": cap}
             for c, cap in (rng.choice(_CAPITALS) for _ in range(TRAIN_PER_TASK))]
    pairs = [(c, cap, form) for c, cap in _CAPITALS for form in _CAP_EVAL]
    rng.shuffle(pairs)
    held = [{"task": "capital", "prompt": form.format(c=c), "response": cap}
            for c, cap, form in pairs[:EVAL_PER_TASK]]
    return train, held


def _plural(rng: random.Random) -> tuple[list[dict], list[dict]]:
    nouns = list(dict.fromkeys(_NOUNS))  # drop repeats, keep order
    train_nouns, eval_nouns = _split(nouns, EVAL_PER_TASK, rng)

    def row(w):
        return {"task": "plural", "prompt": rng.choice(_PLURAL_FORMS).format(w=w), "response": plural(w)}

    return [row(rng.choice(train_nouns)) for _ in range(TRAIN_PER_TASK)], [row(w) for w in eval_nouns]


def build() -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each task's rows in turn; identical on every run."""
    rng = random.Random(SEED)
    train, held = [], []
    for make in (_add, _sentiment, _capital, _plural):
        tr, ev = make(rng)
        train += tr
        held += ev
    return train, held


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def data_dir() -> str:
    """The directory of the shipped demo data (package data)."""
    return os.path.dirname(os.path.abspath(__file__))


def write_files(out_dir: str, names: tuple[str, ...], splits) -> list[str]:
    """Write each split's rows as JSON lines to `out_dir`/name (the demo's and the suite's files);
    the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in zip(names, splits, strict=True):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(to_jsonl(rows))
        paths.append(path)
    return paths


def write(out_dir: str | None = None) -> list[str]:
    """Write demo_train.jsonl and demo_eval.jsonl into `out_dir` (default: the package data)."""
    return write_files(out_dir or data_dir(), FILES, build())


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else None):
        print(p)
