"""Which Triton the kernel tests run: compiled on a CUDA device, or Triton's interpreter on CPU tensors.

The interpreter is used when it is asked for (TRITON_INTERPRET set to a non-zero value) or when no
CUDA device is present and TRITON_INTERPRET is unset (the CPU CI); with a GPU and the variable unset
the kernels run compiled. It must be chosen before any @triton.jit function is defined, so it is
decided here, at the root, before any test imports.

Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy 2.4 on ("only
0-dimensional arrays can be converted to Python scalars"). Where it cannot run, the interpreter is
switched off and the kernel tests skip with that reason; everything else runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

INTERPRETER_UNUSABLE_ENV = "CGC_INTERPRETER_UNUSABLE"


def _release(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version(name))[:2])
    except importlib.metadata.PackageNotFoundError:
        return ()


def interpreter_unusable_reason() -> str | None:
    """Why Triton's interpreter cannot run here (None when it can)."""
    triton, numpy = _release("triton"), _release("numpy")
    if not triton:
        return "Triton is not installed"
    if triton < (3, 7) and numpy >= (2, 4):
        return (f"Triton {importlib.metadata.version('triton')}'s interpreter needs numpy < 2.4 "
                f"(numpy {importlib.metadata.version('numpy')} is installed)")
    return None


def _cuda_present() -> bool:
    # The driver's own answer, without initializing CUDA in this process (forked workers stay usable).
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _choose() -> str | None:
    asked = os.environ.get("TRITON_INTERPRET")
    if asked is not None and asked in ("", "0"):
        return None
    if asked is None and _cuda_present():
        return None
    reason = interpreter_unusable_reason()
    if reason is not None:
        os.environ["TRITON_INTERPRET"] = "0"
        os.environ[INTERPRETER_UNUSABLE_ENV] = reason
        return reason
    os.environ["TRITON_INTERPRET"] = "1"
    return None


UNUSABLE = _choose()


def pytest_report_header(config):
    mode = "interpreter" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "compiled"
    line = f"cgc_kernels: Triton kernels {mode}"
    return line + (f" (interpreter unusable: {UNUSABLE}; kernel tests skip)" if UNUSABLE else "")


def pytest_collection_modifyitems(config, items):
    """With the interpreter unusable and no GPU, the kernel tests skip already (no device to run on);
    this puts the cause in their skip reason."""
    if not UNUSABLE:
        return
    import pytest

    for item in items:
        reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")
                   if m.args and m.args[0] is True or m.kwargs.get("condition") is True]
        reasons += [m.kwargs.get("reason", "") or (m.args[0] if m.args else "") for m in item.iter_markers("skip")]
        # the Triton backend's skip, or no device to run the kernels on (an empty device list)
        if any("triton" in r.lower() or "empty parameter set" in r for r in reasons):
            # first among the skipif marks: pytest reports the first true one
            item.add_marker(pytest.mark.skipif(True, reason=f"kernel test: {UNUSABLE}"), append=False)
