"""Replace every Triton kernel the op launches by a stub that counts launches and does nothing, and
let the Triton path accept CPU tensors, so the host side of a call can be tested and timed on any
machine (tests/op/test_dispatch.py, benchmarks/test_host.py; here, since the benchmarks import no tests)."""

from __future__ import annotations

import collections
import contextlib
import importlib
from collections.abc import Callable, Iterator

from cgc_kernels.op.triton import common

# (module, kernel attribute) of every launch the op's Triton path makes
KERNELS = [
    ("cgc_kernels.op.triton.forward", "_fwd_kernel"),
    ("cgc_kernels.op.triton.forward", "_shrink_kernel"),
    ("cgc_kernels.op.triton.backward", "_bwd_rows_kernel"),
    ("cgc_kernels.op.triton.backward", "_bwd_weight_kernel"),
    ("cgc_kernels.op.triton.backward", "_bwd_reduce_kernel"),
]


class _StubKernel:
    """`kernel[grid](*args, **meta)` that only counts (and calls `on_launch(name)` if given)."""

    def __init__(self, name: str, counts: collections.Counter, on_launch: Callable[[str], None] | None):
        self.name, self.counts, self.on_launch = name, counts, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
            if self.on_launch is not None:
                self.on_launch(self.name)

        return launch


@contextlib.contextmanager
def stubbed_kernels(on_launch: Callable[[str], None] | None = None) -> Iterator[collections.Counter]:
    """Within the block, launches count into the yielded Counter (by kernel name) and run nothing."""
    counts: collections.Counter = collections.Counter()
    saved = []
    for mod_name, attr in KERNELS:
        mod = importlib.import_module(mod_name)
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, _StubKernel(attr, counts, on_launch))
    interpret = common.INTERPRET
    common.INTERPRET = True  # the Triton path's "CPU tensors need the interpreter" check
    try:
        yield counts
    finally:
        common.INTERPRET = interpret
        for mod, attr, kernel in saved:
            setattr(mod, attr, kernel)
