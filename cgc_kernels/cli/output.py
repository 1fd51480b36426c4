"""Where a command writes, so that no command loses data by accident.

Every writing command (train, export, export-base, generate --output, cluster, compare, demo,
inspect --out) goes through `staged_output`:

* an existing non-empty output is refused unless the command was given `--overwrite`;
* an output that is, lies inside, or holds one of the command's inputs is refused (replacing it
  would destroy what the command reads);
* everything is written into a temporary sibling (`.NAME.XXXX.partial`, in the same folder, so
  the final rename never crosses file systems) and renamed into place at the end: a failed or
  interrupted run leaves the old output whole and no half-written one;
* with `--overwrite` the old output is replaced as a whole (no mixed checkpoints, no stale files);
* what a failed run must not lose (train's checkpoints: hours of compute to resume from) is moved
  out of the staging folder into a visible sibling `NAME.interrupted-XXXX/`, never into NAME.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator

from ..data.reader import UserError

PARTIAL_SUFFIX = ".partial"


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    """True if `path` is `folder` or lies below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _non_empty(path: str) -> bool:
    if os.path.isdir(path) and not os.path.islink(path):
        return any(os.scandir(path))
    return os.path.lexists(path) and (os.path.islink(path) or os.path.getsize(path) > 0)


def check_output(path: str, *, overwrite: bool, inputs: Iterable[str | None] = (), kind: str = "directory",
                 option: str = "--out") -> str:
    """The real path of output `path` (a "directory" or a "file"), or UserError if writing it
    could destroy data: it exists and is not empty (without `overwrite`), it holds the current
    directory, or it overlaps one of `inputs` (paths the command reads; None entries are skipped)."""
    final = _real(path)
    here = _real(os.getcwd())
    if _inside(here, final):
        raise UserError(f"{option} {path} is the current directory or holds it; name a new {kind}")
    for inp in inputs:
        if inp is None:
            continue
        src = _real(inp)
        if _inside(final, src):
            where = "is" if final == src else "lies inside"
            raise UserError(f"{option} {path} {where} the input {inp}; write the output elsewhere")
        if _inside(src, final):
            raise UserError(f"{option} {path} holds the input {inp}, which replacing it would delete; "
                            f"write the output elsewhere")
    if not overwrite and _non_empty(final):
        what = "a file" if os.path.isfile(final) else ("a directory" if os.path.isdir(final) else "something")
        raise UserError(f"{option} {path} already exists ({what}, not empty); pass --overwrite to replace it")
    # An empty entry of the other kind is still something the user made: not replaced unasked.
    other = os.path.isdir(final) if kind == "file" else (os.path.lexists(final) and not os.path.isdir(final))
    if not overwrite and other:
        what = "a directory" if kind == "file" else "a file"
        raise UserError(f"{option} {path} already exists ({what}, empty) where a {kind} is to be written; "
                        f"pass --overwrite to replace it")
    return final


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _default_mode(kind: str) -> int:
    # mkdtemp / mkstemp create private (0700 / 0600) entries; an output gets the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if kind == "directory" else 0o666) & ~umask


def _commit(tmp: str, final: str, kind: str) -> None:
    """Move `tmp` to `final`, replacing what is there as a whole."""
    os.chmod(tmp, _default_mode(kind))
    if kind == "directory":
        # Files written through temp files (safetensors, atomic saves) are private (0600): an
        # output is read by others too (a server under another user), so give them the usual mode.
        file_mode = _default_mode("file")
        for root, _, files in os.walk(tmp):
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, file_mode)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if kind == "file" and os.path.isfile(final):
        os.replace(tmp, final)  # atomic
        return
    # A directory cannot be replaced atomically: move the old one aside first, then put the new
    # one in place, and only then delete the old one; if the second rename fails, restore it.
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".old", dir=os.path.dirname(final))
    os.rmdir(aside)
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    _remove(aside)


@contextlib.contextmanager
def staged_output(path: str, *, overwrite: bool, inputs: Iterable[str | None] = (), kind: str = "directory",
                  option: str = "--out", keep_on_failure: str | None = None) -> Iterator[str]:
    """Check output `path` (see check_output), then yield a temporary sibling to write into: a
    new empty directory (kind "directory") or file path (kind "file"). On a clean exit the sibling
    replaces `path` as a whole; on any exception (KeyboardInterrupt included) it is deleted and
    `path` is left as it was, except the sibling's non-empty subfolder `keep_on_failure`, which is
    moved to a new `NAME.interrupted-XXXX/` beside `path` (its location printed on stderr)."""
    if kind not in ("directory", "file"):
        raise ValueError(f"kind must be 'directory' or 'file', got {kind!r}")
    final = check_output(path, overwrite=overwrite, inputs=inputs, kind=kind, option=option)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create {parent} ({e.strerror})") from None
    name = os.path.basename(final)
    try:
        if kind == "directory":
            tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=parent)
            os.close(fd)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {parent} ({e.strerror})") from None
    try:
        yield tmp
        _commit(tmp, final, kind)
    except BaseException:
        if keep_on_failure is not None:
            _rescue(os.path.join(tmp, keep_on_failure), parent, name)
        _remove(tmp)
        raise


def _rescue(folder: str, parent: str, name: str) -> None:
    """Move a failed run's non-empty `folder` into a new sibling NAME.interrupted-XXXX/ of the
    output, and say where on stderr."""
    if not (os.path.isdir(folder) and any(os.scandir(folder))):
        return
    try:
        kept = tempfile.mkdtemp(prefix=f"{name}.interrupted-", dir=parent)
        dest = os.path.join(kept, os.path.basename(folder))
        os.rename(folder, dest)
        os.chmod(kept, _default_mode("directory"))
    except OSError:
        return
    print(f"cgc-lora: the run's {os.path.basename(folder)} are kept in {dest} (--resume from one of "
          f"them, with a new --out or --overwrite)", file=sys.stderr)
