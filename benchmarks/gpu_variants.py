"""The Triton kernel variants a GPU run launches: recorded here on CPU, compiled there in parallel.

A fresh GPU machine JIT-compiles every kernel variant (one per kernel, constexpr values and
argument specialization: dtypes, 16-byte alignment, integers equal to 1 or divisible by 16) on
first use, 1-2 s each plus a C launcher, serially inside each test. `benchmarks/gpu_check.py`'s
compile step instead warms Triton's on-disk cache with every variant of benchmarks/gpu_variants.json
at once, over all cores, before the smoke test, the suites and the benchmarks run.

    python -m benchmarks.gpu_variants compile [--workers N] [--dry-run]   # on the GPU machine
    python -m benchmarks.gpu_variants record                             # here: rewrite the JSON

`record` runs what the GPU check runs (the smoke test at its GPU size, the kernel suites, the
benchmark subset at the "gpu" size) on CPU with every launch recorded and none executed (so the
sizes cost nothing), with the GPU's block configs and operand types (CGC_KERNELS_GPU_CONFIGS=1, no
interpreter upcast). Assertions fail there (the outputs are never computed); only the launches
count. Rerun it when a kernel, a launcher or the GPU check's selection changes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "benchmarks" / "gpu_variants.json"
RECORD_ENV = "CGC_RECORD_VARIANTS"  # a file: the pytest plugin below appends the launches it sees
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ---- recording (CPU, TRITON_INTERPRET=1) --------------------------------------------------------
def _spec(value, constexpr: bool):
    """What Triton specializes a launch argument on, with a value that reproduces it."""
    if constexpr:
        return ["c", value if isinstance(value, (bool, int, float, str, type(None))) else str(value)]
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return ["t", str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        return ["i", value]
    if isinstance(value, float):
        return ["f", value]
    if value is None:
        return ["n", None]
    return ["c", str(value)]


def _int_class(v: int) -> str:
    if v == 1:
        return "1"
    big = "64" if not -(2**31) <= v < 2**31 else "32"
    return ("d" if v % 16 == 0 else "i") + big


def variant_key(v: dict) -> str:
    """Two launches with the same key compile to the same binary (Triton's own cache key classes)."""
    parts = []
    for name, (kind, *rest) in sorted(v["args"].items()):
        parts.append(f"{name}={kind}:{_int_class(rest[0]) if kind == 'i' else rest}")
    return v["kernel"] + "|" + ",".join(parts) + "|" + json.dumps(v["options"], sort_keys=True)


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


@contextlib.contextmanager
def recording(sink: list, execute: bool = False):
    """Within the block every interpreted kernel launch appends its variant to `sink`; with
    execute=False the kernel does not run (the host side does, at any size, in no time)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        sink.append(dict(kernel=f"{self.fn.__module__}:{self.fn.__name__}",
                         args={k: _spec(v, _is_constexpr(params[k])) for k, v in bound.items()},
                         options={k: kwargs[k] for k in OPTIONS if k in kwargs}))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    InterpretedFunction.run = run
    try:
        yield sink
    finally:
        InterpretedFunction.run = original


def _gpu_operands() -> None:
    """The GPU's choices in the interpreter: its block configs, tensor-core operand types."""
    from cgc_kernels.op.triton import common

    common.GPU_CONFIGS_IN_INTERPRETER = True
    common.upcast_operands = lambda: False


# pytest plugin (`-p benchmarks.gpu_variants` with CGC_RECORD_VARIANTS=FILE): record, run nothing.
_SINK: list = []
_REC = None


def pytest_configure(config):
    global _REC
    if os.environ.get(RECORD_ENV):
        _gpu_operands()
        with contextlib.suppress(ImportError):  # failing examples (nothing is computed) must not shrink
            from hypothesis import Phase, settings

            settings.register_profile("cgc-record", phases=[Phase.explicit, Phase.reuse, Phase.generate])
            settings.load_profile("cgc-record")
        _REC = recording(_SINK)
        _REC.__enter__()


def pytest_unconfigure(config):
    if _REC is not None:
        _REC.__exit__(None, None, None)
        with open(os.environ[RECORD_ENV], "a") as f:
            for v in _SINK:
                f.write(json.dumps(v) + "\n")


def _record_smoke(sink_file: str) -> None:
    """The smoke test's launches at its GPU size (benchmarks/gpu_smoke.py)."""
    import torch

    from benchmarks import gpu_smoke

    _gpu_operands()
    sink: list = []
    with recording(sink):
        for dtype in (torch.bfloat16, torch.float32):
            with contextlib.suppress(Exception):
                gpu_smoke.check(gpu_smoke.gpu_case(), dtype, "cpu")
    with open(sink_file, "a") as f:
        for v in sink:
            f.write(json.dumps(v) + "\n")


def _record_bench(sink_file: str) -> None:
    """The fused ops' launches in the benchmark subset at the "gpu" size (op and layer levels, and
    the extra cases' op rows: dropout, the largest rank tier; the model rows are not recorded and
    compile on first use), host side only: the checks' float64 references at those sizes would
    take CPU minutes."""
    import torch

    from benchmarks import gpu_check
    from benchmarks.cases import build_problem, cases, dtype_for
    from benchmarks.providers import PROVIDERS, make_runner

    _gpu_operands()
    sink: list = []
    with recording(sink):
        for case in cases("gpu"):
            extra = any(case.name.endswith(c) for c in gpu_check.EXTRA_CASES)  # the fused op's full pass only
            if not extra and gpu_check.BENCH_CASE not in case.name:
                continue
            for provider in ("fused",) if extra else ("fused", "fused_v1"):  # "-k fused" selects both
                for level in ("op",) if extra else PROVIDERS[provider].levels:
                    p = build_problem(case, torch.device("cpu"), dtype_for("gpu"))
                    training = level != "infer"
                    with torch.set_grad_enabled(training), contextlib.suppress(Exception):
                        runner = make_runner(provider, level, p)
                        y = runner.fn(p.x.clone().requires_grad_(training))
                        if training:
                            y.backward(p.dy)
    with open(sink_file, "a") as f:
        for v in sink:
            f.write(json.dumps(v) + "\n")


def record(out: Path = MANIFEST, only: list[str] | None = None) -> dict:
    """Run the sources (all, or `only` these, keeping the others' variants from `out`); write `out`."""
    import tempfile

    from benchmarks import gpu_check

    sink = Path(tempfile.mkdtemp(prefix="cgc-variants-")) / "launches.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1", CGC_KERNELS_GPU_CONFIGS="1", **{RECORD_ENV: str(sink)},
               PYTHONPATH=str(ROOT), CGC_FUZZ_EXAMPLES=os.environ.get("CGC_FUZZ_EXAMPLES", "40"))
    sources = {}
    runs = {
        "smoke": [sys.executable, "-m", "benchmarks.gpu_variants", "_record-smoke", str(sink)],
        "suites": [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_variants", *gpu_check.kernel_suites(),
                   "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        "bench": [sys.executable, "-m", "benchmarks.gpu_variants", "_record-bench", str(sink)],
    }
    kept = []
    if only:
        old = json.loads(out.read_text())
        sources = {k: v for k, v in old["launches_recorded"].items() if k not in only}
        kept = [v for v in old["variants"] if v.get("source") not in only]
        runs = {k: v for k, v in runs.items() if k in only}
    for name, cmd in runs.items():
        before = sum(1 for _ in open(sink)) if sink.exists() else 0
        # The suites' assertions fail when no kernel runs, so their exit status says nothing; a
        # source that recorded no launch at all is broken (an import error, a renamed module).
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=3600)
        sources[name] = (sum(1 for _ in open(sink)) if sink.exists() else 0) - before
        if sources[name] == 0:
            raise RuntimeError(f"recording {name!r} launched no kernel (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
    launches = [json.loads(line) for line in open(sink)] if sink.exists() else []
    sink.unlink(missing_ok=True)
    bounds, at = [], 0
    for name in runs:  # which source each launch came from (the order they ran in)
        bounds.append((name, at, at + sources[name]))
        at += sources[name]
    for i, v in enumerate(launches):
        v["source"] = next(name for name, lo, hi in bounds if lo <= i < hi)
    unique = {}
    for v in kept + launches:
        unique.setdefault(variant_key(v), v)
    import triton

    data = dict(recorded_with=f"triton {triton.__version__}", launches_recorded=sources,
                variants=sorted(unique.values(), key=variant_key))
    out.write_text(json.dumps(data, indent=None, separators=(",", ":")).replace('},{"kernel"', '},\n{"kernel"') + "\n")
    return data


# ---- compiling (the GPU machine) ----------------------------------------------------------------
class _Ptr:
    """A tensor stand-in for Triton's warmup: its dtype and (16-byte or not) alignment."""

    def __init__(self, dtype, aligned: bool):
        self.dtype, self._ptr = dtype, 0 if aligned else 8

    def data_ptr(self):
        return self._ptr


def _resolve(v: dict):
    mod, name = v["kernel"].split(":")
    return getattr(importlib.import_module(mod), name)


def _arguments(v: dict) -> dict:
    import torch

    args = {}
    for name, (kind, *rest) in v["args"].items():
        if kind == "t":
            args[name] = _Ptr(getattr(torch, rest[0]), rest[1])
        else:
            args[name] = rest[0]
    return args


def _offline_binder(fn):
    """Triton's argument binder for an sm_90 target, without a driver (what warmup runs first); None
    where this Triton's internals differ (the dry run then checks argument names only)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        return create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    except (ImportError, AttributeError, TypeError):
        return None


def compile_variant(v: dict, dry: bool) -> tuple[str, float, str]:
    """Compile one variant into Triton's cache (and build its launcher); ("ok" | "error", s, why)."""
    t0 = time.monotonic()
    try:
        fn = _resolve(v)
        args = _arguments(v)
        params = inspect.signature(getattr(fn, "fn", fn)).parameters
        missing = {n for n, p in params.items() if p.default is inspect.Parameter.empty} - set(args)
        if missing:
            raise TypeError(f"the kernel's arguments changed (now also {sorted(missing)}): re-record")
        if dry:
            bind = _offline_binder(fn)
            if bind is not None:  # Triton's own specialization of these arguments, for sm_90
                bind(**args, **v["options"], debug=False, instrumentation_mode="")
        else:
            kernel = fn.warmup(grid=(1,), **args, **v["options"])
            kernel._init_handles()  # the C launcher (gcc) and the binary's load
        return "ok", time.monotonic() - t0, ""
    except Exception as e:  # one bad variant must not stop the others
        return "error", time.monotonic() - t0, f"{v['kernel']}: {type(e).__name__}: {str(e)[:200]}"


def _worker_init():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "0"


def compile_all(variants: list[dict], workers: int, dry: bool) -> dict:
    """All variants over a pool of `workers` processes (spawned: CUDA in each); the summary."""
    import multiprocessing as mp

    t0 = time.monotonic()
    errors, took = [], []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(compile_variant, v, dry) for v in variants]
        for f in as_completed(futures):
            status, s, why = f.result()
            took.append(s)
            if status != "ok":
                errors.append(why)
    kernels = sorted({v["kernel"].split(":")[1] for v in variants})
    return dict(variants=len(variants), kernels=len(kernels), workers=workers, seconds=round(time.monotonic() - t0, 1),
                compile_s_sum=round(sum(took), 1), errors=len(errors), first_errors=errors[:5], dry_run=dry)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile every recorded variant into Triton's cache, in parallel")
    c.add_argument("--manifest", default=str(MANIFEST))
    c.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    c.add_argument("--json", default=None, help="write the summary here")
    c.add_argument("--dry-run", action="store_true",
                   help="resolve every variant's kernel and arguments in the pool, compile nothing (no GPU)")
    r = sub.add_parser("record", help=f"rewrite {MANIFEST.relative_to(ROOT)} from a recorded CPU run")
    r.add_argument("--only", default=None, help="comma-separated sources to rerun: smoke,suites,bench")
    for hidden in ("_record-smoke", "_record-bench"):
        sub.add_parser(hidden).add_argument("sink")
    a = ap.parse_args(argv)
    if a.cmd == "record":
        data = record(only=a.only.split(",") if a.only else None)
        print(f"{len(data['variants'])} variants from {data['launches_recorded']} launches")
        return 0
    if a.cmd in ("_record-smoke", "_record-bench"):
        (_record_smoke if a.cmd == "_record-smoke" else _record_bench)(a.sink)
        return 0
    variants = json.loads(Path(a.manifest).read_text())["variants"]
    res = compile_all(variants, max(1, a.workers), a.dry_run)
    print(f"compile: {res['variants']} variants of {res['kernels']} kernels in {res['seconds']} s over "
          f"{res['workers']} processes ({res['compile_s_sum']} s of compiling); {res['errors']} failed"
          + ("; dry run: resolved, nothing compiled" if a.dry_run else ""), flush=True)
    for e in res["first_errors"]:
        print("   " + e)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
