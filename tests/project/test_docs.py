"""docs/api.md: every Python example runs, and prints the output the page shows after it.

An example is a ```python block followed (after a line starting with "Output") by a plain ```
block. Each runs in a fresh interpreter. Lines are compared one by one: text exactly, integers
exactly (token ids, counts), decimals to 5% (losses and differences move in their last digits from
one CPU to another), and "..." in the page matches anything (run times).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(ROOT, "docs", "api.md")
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def examples(path: str = PAGE) -> list[tuple[str, str, str]]:
    """[(name, code, expected output)] of the page, named by the heading above each."""
    text = open(path, encoding="utf-8").read()
    found = []
    # The code may not span a closing fence: a fragment without output is not an example.
    pattern = re.compile(r"```python\n((?:(?!```).)*?)```\s*\n+Output[^\n]*\n+```\n(.*?)```", re.S)
    for m in pattern.finditer(text):
        heading = re.findall(r"^#+ (.+)$", text[: m.start()], re.M)
        found.append((heading[-1] if heading else "top", m.group(1), m.group(2)))
    return found


def line_matches(expected: str, actual: str) -> bool:
    parts = re.split(rf"(\.\.\.|{NUMBER})", expected)
    regex, numbers = "", []
    for part in parts:
        if part == "...":
            regex += ".*"
        elif re.fullmatch(NUMBER, part):
            regex += f"({NUMBER})"
            numbers.append(part)
        else:
            regex += re.escape(part)
    m = re.fullmatch(regex, actual)
    if m is None:
        return False
    for want, got in zip(numbers, m.groups(), strict=True):
        if re.fullmatch(r"-?\d+", want):
            if want != got:
                return False
        elif abs(float(want) - float(got)) > 0.05 * max(abs(float(want)), abs(float(got))) + 1e-12:
            return False
    return True


def test_the_page_has_examples():
    names = [name for name, _, _ in examples()]
    assert len(names) >= 4, names


@pytest.mark.parametrize("name,code,expected", examples(), ids=[e[0] for e in examples()])
def test_example_prints_what_the_page_shows(name, code, expected, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    want, got = expected.strip("\n").splitlines(), run.stdout.strip("\n").splitlines()
    assert len(got) == len(want), f"{len(got)} lines printed, the page shows {len(want)}:\n{run.stdout}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert line_matches(w, g), f"line {i + 1}: the page shows\n  {w}\nthe example printed\n  {g}"


def test_line_matching():
    assert line_matches("step 0 loss 5.430", "step 0 loss 5.431")
    assert not line_matches("step 0 loss 5.430", "step 1 loss 5.430")  # integers exactly
    assert not line_matches("[[5, 6, 7, 8, 10]]", "[[5, 6, 7, 8, 9]]")
    assert not line_matches("loss 5.430", "loss 6.430")
    assert line_matches("{'train_runtime': ...}", "{'train_runtime': '50.9', 'epoch': '1.5'}")
    assert not line_matches("merged == unified: True", "merged == unified: False")
