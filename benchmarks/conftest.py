"""pytest options and hooks of the benchmark suites (the sweep is benchmarks/cases.py, the providers
providers.py, checking and timing measure.py, the model level model_harness.py).

    pytest benchmarks/                          # time every suite at the device's default size
    pytest benchmarks/ --bench-size=cpu         # or CGC_BENCH_SIZE=cpu|gpu
    pytest benchmarks/ --benchmark-disable      # CI: each case once, every provider checked
                                                # (on CPU at the small "ci" size unless one is given)

Each test module marks its tests with `@pytest.mark.bench(level=..., modes=(...))`; the tests
are parametrized here over (case, provider, mode), case-major, so one case's inputs are built
once and its providers land side by side in one pytest-benchmark group.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import cases, measure
from benchmarks.environment import environment
from benchmarks.providers import PROVIDERS


def pytest_addoption(parser):
    group = parser.getgroup("cgc benchmarks")
    group.addoption("--bench-size", choices=cases.SIZES, default=None,
                    help="cpu (d=512, float32), gpu (d=4096, bfloat16) or ci (d=128, checks only); default: "
                         "CGC_BENCH_SIZE, else gpu with CUDA, else cpu (ci under --benchmark-disable)")
    group.addoption("--bench-out", default=None,
                    help="JSON file for every timed result (default .benchmarks/cgc-results-<size>.json)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 10 on CPU, 30 on CUDA)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench(level, modes): a CGC benchmark at one level with these modes")
    measure.SETTINGS["rounds"] = config.getoption("--bench-rounds", default=None)


def timing_enabled(config) -> bool:
    return not (config.getoption("--benchmark-disable", default=False)
                or config.getoption("--benchmark-skip", default=False))


def bench_size(config) -> str:
    return config.getoption("--bench-size", default=None) or cases.default_size(timing_enabled(config))


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench")
    if marker is None or "provider" not in metafunc.fixturenames:
        return
    level, modes = marker.kwargs["level"], marker.kwargs["modes"]
    if not timing_enabled(metafunc.config):
        modes = modes[-1:]  # checks only: "full" checks the output and the input gradient at once
    providers = [p.name for p in PROVIDERS.values() if level in p.levels]
    params, ids = [], []
    for case in cases.cases(bench_size(metafunc.config)):
        for provider in providers:
            for mode in modes:
                params.append((case, provider, mode))
                ids.append(f"{case.name}-{provider}-{mode}")
    metafunc.parametrize(("case", "provider", "mode"), params, ids=ids)


@pytest.fixture(scope="session")
def size(request) -> str:
    return bench_size(request.config)


_written = {"rows": 0}


def _write_results(config) -> str | None:
    """Write every result so far (rewritten after each test, so a run cut short by a time limit
    still leaves its results)."""
    if len(measure.RESULTS) == _written["rows"]:
        return None
    size = bench_size(config)
    path = config.getoption("--bench-out", default=None) or os.path.join(
        str(config.rootpath), ".benchmarks", f"cgc-results-{size}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": environment(size), "results": measure.RESULTS}, f, indent=1)
    os.replace(tmp, path)
    _written["rows"] = len(measure.RESULTS)
    return path


def pytest_runtest_teardown(item):
    _write_results(item.config)


def pytest_sessionfinish(session, exitstatus):
    path = _write_results(session.config)
    if measure.RESULTS:
        print(f"\ncgc benchmark results: {len(measure.RESULTS)} rows -> {path or 'written'}")
