"""The check both shipped data sets share: their builder reproduces the package's files."""

import os

from cgc_kernels.data import demo_tasks


def shipped(module, name: str) -> str:
    """The text of a data file shipped beside `module` (demo_tasks or suite_tasks)."""
    with open(os.path.join(module.data_dir(), name), encoding="utf-8", newline="") as f:
        return f.read()


def assert_builder_reproduces_shipped(module, tmp_path) -> None:
    """Two independent builds and the files in the package agree byte for byte, and `write` writes
    those bytes."""
    built = [demo_tasks.to_jsonl(rows) for rows in module.build()]
    assert built == [demo_tasks.to_jsonl(rows) for rows in module.build()]  # deterministic
    for name, text in zip(module.FILES, built, strict=True):
        assert shipped(module, name) == text, f"{name} differs from its builder: python -m {module.__name__}"
    for path in module.write(str(tmp_path)):
        with open(path, "rb") as f:
            assert f.read() == shipped(module, os.path.basename(path)).encode("utf-8")
