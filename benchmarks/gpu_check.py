"""The GPU check: one run on the GPU machines' image, offline, from the checkout.

    python3 benchmarks/gpu_check.py [--out DIR] [--wheels DIR] [--dry-run]   (gpu_check.sh calls this)

The image has torch, Triton, transformers, numpy and the test packages, and no package index: nothing
is installed. The project runs from the checkout (PYTHONPATH); a wheel it lacks may travel in the
working tree as `--wheels DIR` (installed with --no-index into a folder put on PYTHONPATH). Steps, in
order, each in its own process group with a time limit (on timeout the whole group is killed) and a
log; a failed or timed-out step is recorded and the run goes on:

    pre    preflight, one line each: imports (and versions), gcc and Python.h for Triton's
           launchers, one tiny Triton launch, free GPU memory
    warm   compile every kernel variant the steps below launch (benchmarks/gpu_variants.json)
           into Triton's cache, over all cores; prints the count and the seconds
    a      smoke: the op on CUDA against the reference, forward and every gradient, bf16 and fp32
    b      every kernel suite on CUDA (tests/op/test_kernels_grid.py included; the fuzz test capped)
    c      a benchmark subset, fused op first: results JSON, markdown report, GB/s vs copy GB/s;
           with training rows of dropout p = 0.1 (against p = 0) and of r = 32 (the largest rank tier)
    d      the CUDA C++ reference's tests, when nvcc is present (else one line why)
    e      a CGCModel decode step captured in a CUDA graph: replay equals eager
    f      CGCModel decode tokens/s, mixed tasks, torch.compile(mode="reduce-overhead") against
           eager (benchmarks/decode_speed.py; its row in logs/decode.json and the summary)

What comes back (at most 8 files, 16 MiB each): summary.md, summary.json, smoke.json, compile.json,
the results JSON with its report (.md, .png), and logs.tar.gz (every step's log, the junit XML,
pytest-benchmark's JSON, the decode row). The summary table is printed last.

--dry-run rehearses the same steps on CPU (the test suite runs it in the GPU image's twin, offline):
preflight, the compile step's bookkeeping (every variant resolved in the pool, none compiled), the
time boxes and the output limits. The kernels run in Triton's interpreter where it can run; where it
cannot (Triton 3.6 with numpy >= 2.4, the image's pair) through stubs that launch nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

KERNEL_SUITES = ["tests/op/test_kernels.py", "tests/op/test_kernels_grid.py", "tests/op/test_kernels_dropout.py",
                 "tests/op/test_compile.py", "tests/adapter/test_determinism.py", "tests/op/test_fuzz.py",
                 "tests/adapter/test_bad_input.py", "tests/adapter/test_cuda_graph.py"]
# Examples per backend of the fuzz test on the GPU: every new shape is a kernel variant to compile.
FUZZ_EXAMPLES = 40
# One fast test per run in the dry run: the plumbing, not the kernels, is what it proves.
DRY_KERNEL_SELECTION = "test_forward_matches_naive_oracle or test_dropout_mask_properties"
# The benchmark subset: one mid-sized expert shape at T=4 (both token counts, both layer shapes),
# the fused op first (test_op.py before the layer and model suites; providers in PROVIDERS order).
BENCH_FILES = ["benchmarks/test_op.py", "benchmarks/test_layer.py", "benchmarks/test_model.py"]
BENCH_EXPERTS = (2, 1, 8)  # (S, K, r)
BENCH_CASE = "T4-S{}K{}r{}-uniform".format(*BENCH_EXPERTS)
BENCH_SELECTION = ("(T4-S2K1r8-uniform and not drop and (fused or peft_lora or bare_linear)) "
                   "or generate-T4-fused or generate-T4-peft_mixed or generate-T4-bare_model "
                   "or train-T4-fused or train-T4-peft_lora")
# Beside them, one training row (op forward + backward) of each extra case of benchmarks/cases.py
# (largest M only): dropout p = 0.1, read against the same case at p = 0, and r = 32 (the largest
# rank tier). On the GPU the fused op's; in the rehearsal the torch backend's (no kernels needed).
EXTRA_CASES = (f"{BENCH_CASE}-drop0.1", "T4-S2K1r32-uniform")
EXTRA_ROWS = f"(test_op and {{provider}}-full and ({BENCH_CASE} or {EXTRA_CASES[1]}))"
# Without kernels (the stubbed rehearsal): the providers that need none, for the results plumbing.
STUB_BENCH_SELECTION = "T4-S2K1r8-uniform and not drop and (peft_lora or bare_linear)"
# What the steps import (module: what needs it); the first group is required.
REQUIRED = ["torch", "triton", "numpy", "transformers", "safetensors", "pytest", "hypothesis", "pytest_benchmark",
            "matplotlib", "scipy", "tqdm"]
OPTIONAL = {"xdist": "step b runs in one process", "peft": "the peft_* benchmark rows skip",
            "accelerate": "transformers.Trainer tests skip"}
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what comes back from the device machine's $OUT
# The steps' limits together: one command of at most 10 minutes on the device holds them with the
# driver's own seconds (imports, report, packaging: ~10 s).
TOTAL_LIMIT_S = 550


def kernel_suites() -> list[str]:
    return list(KERNEL_SUITES)


def bench_selection(dry: bool, stub: bool) -> str:
    """Step c's -k expression: the subset and the extra rows (fused on the GPU, torch in a dry run)."""
    base = STUB_BENCH_SELECTION if stub else BENCH_SELECTION
    return f"({base}) or " + EXTRA_ROWS.format(provider="torch" if dry else "fused")


@dataclass
class Step:
    key: str
    title: str
    planned_s: int  # expected on one H100/H200
    limit_s: int  # hard time limit (they sum to TOTAL_LIMIT_S at most)
    status: str = "not run"  # pass | fail | timeout | skip
    took_s: float = 0.0
    detail: str = ""
    numbers: dict = field(default_factory=dict)


def plan(dry: bool) -> list[Step]:
    # The compile step takes the JIT out of the others: ~440 variants at 1-2.2 s (sm_90) plus
    # ~0.5 s of launcher each, over 16 cores, ~70-90 s. Step c's extra rows (dropout, r = 32) add
    # ~5 s when the compile step warmed their variants. Step f is mostly inductor's cold compile of
    # the decode step (a 4-layer model) and CUDA graph recording. The dry run allows more per step
    # (a loaded 2-core CPU).
    steps = [
        Step("pre", "preflight: imports, gcc + Python.h, one Triton launch, free memory", 10, 30),
        Step("warm", "compile every kernel variant into Triton's cache, all cores", 90, 120),
        Step("a", "smoke: op vs reference, fwd + every grad, bf16/fp32", 10, 25),
        Step("b", "kernel test suites on the device (fuzz capped)", 100, 125),
        Step("c", "benchmark subset (fused first; dropout, r=32 rows), JSON + report + GB/s", 125, 130),
        Step("d", "CUDA C++ reference tests (nvcc)", 30, 35),
        Step("e", "CUDA graph: CGCModel decode step, replay == eager", 10, 15),
        Step("f", "decode tok/s, mixed tasks: compiled (reduce-overhead) vs eager", 45, 70),
    ]
    if dry:
        for s in steps:
            s.limit_s = 300
    return steps


def _run(step: Step, cmd: list[str], out: Path, env: dict) -> int | None:
    """Run `cmd` in its own process group under the step's limit, output to logs/<key>.log; returns
    the exit code (None: timed out, and the whole group, pytest's workers included, was killed)."""
    log = out / "logs" / f"{step.key}.log"
    print(f"== {step.key}: {step.title}  (limit {step.limit_s} s)\n   $ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=step.limit_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # the group: on timeout everything still running; otherwise stray children (workers)
            with_group = rc is None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if with_group:
                f.write(f"\n[gpu_check: limit {step.limit_s} s reached: killed the process group]\n")
    step.took_s = time.monotonic() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-6:]
    for line in tail:
        print("   | " + line[:200])
    step.status = "timeout" if rc is None else "pass" if rc == 0 else "fail"
    if tail and not step.detail:
        step.detail = tail[-1][:120]
    return rc


PREFLIGHT = r"""
import importlib, os, shutil, sys, sysconfig, time
required, optional, dry = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3] == "1"
bad = 0
def line(ok, what, msg):
    global bad
    bad += ok == "FAIL"
    print(f"{ok:<4} {what:<10} {msg}", flush=True)
for name in required + optional:
    try:
        m = importlib.import_module(name)
        line("ok", name, getattr(m, "__version__", "") + "  " + os.path.dirname(m.__file__ or ""))
    except Exception as e:
        line("FAIL" if name in required else "skip", name, f"{type(e).__name__}: {e}"[:150])
import cgc_kernels
line("ok", "checkout", os.path.dirname(os.path.dirname(cgc_kernels.__file__)) + " (PYTHONPATH, not installed)")
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
line("ok" if cc else "FAIL", "compiler", cc or "no gcc/cc/clang: Triton cannot build its launchers")
h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
have = os.path.exists(h)
line("ok" if have else "FAIL", "Python.h", h if have else f"missing ({h}): Triton's launchers need it")
import torch
interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if dry and not interp:
    line("ok", "triton", "launch not tried (dry run with the interpreter unusable: kernels stubbed)")
else:
    import triton, triton.language as tl
    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)
    t0 = time.monotonic()
    try:
        x = torch.zeros(10, device="cpu" if dry else "cuda")
        _add_one[(1,)](x, 10, BLOCK=16)
        ok = bool((x == 1).all())
        took = time.monotonic() - t0
        how = "in the interpreter" if interp else "compiled and ran"
        line("ok" if ok else "FAIL", "triton", f"a tiny kernel {how} in {took:.1f} s" + ("" if ok else ": wrong"))
    except Exception as e:
        line("FAIL", "triton", f"{type(e).__name__}: {e}"[:200])
if dry:
    line("ok", "memory", "no device (dry run)")
else:
    free, total = torch.cuda.mem_get_info()
    line("ok", "memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")
sys.exit(1 if bad else 0)
"""


def step_pre(step: Step, out: Path, env: dict, dry: bool, wheels: str | None = None) -> None:
    if wheels:  # the only install: wheels carried in the working tree, no index
        site = Path(tempfile.mkdtemp(prefix="cgc-wheels-"))
        found = sorted(str(p) for p in Path(wheels).glob("*.whl"))
        if found:
            res = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                                  *found], capture_output=True, text=True, timeout=120)
            print(f"   wheels: {len(found)} from {wheels} -> {site} ({'ok' if res.returncode == 0 else 'FAILED'})")
            env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + str(site)
    # A file, not `python -c`: @triton.jit reads its kernel's source.
    script = Path(tempfile.mkdtemp(prefix="cgc-preflight-")) / "preflight.py"
    script.write_text(PREFLIGHT)
    _run(step, [PY, str(script), ",".join(REQUIRED), ",".join(OPTIONAL), "1" if dry else "0"], out, env)
    lines = (out / "logs" / "pre.log").read_text(errors="replace").splitlines()
    step.numbers = {"failed": sum(ln.startswith("FAIL") for ln in lines),
                    "optional missing": [ln.split()[1] for ln in lines if ln.startswith("skip")]}
    step.detail = next((ln for ln in lines if ln.startswith("FAIL")), "every check ok")[:120]


def step_warm(step: Step, out: Path, env: dict, dry: bool, workers: int) -> None:
    cmd = [PY, "-m", "benchmarks.gpu_variants", "compile", "--workers", str(workers), "--json",
           str(out / "compile.json")] + (["--dry-run"] if dry else [])
    _run(step, cmd, out, env)
    if (out / "compile.json").exists():
        res = json.loads((out / "compile.json").read_text())
        step.numbers = {k: res[k] for k in ("variants", "kernels", "workers", "seconds", "errors")}
        step.detail = f"{res['variants']} variants in {res['seconds']} s over {res['workers']} processes"


def step_smoke(step: Step, out: Path, env: dict, dry: bool, stub: bool) -> None:
    cmd = [PY, "-m", "benchmarks.gpu_smoke", "--json", str(out / "smoke.json")] + (["--dry-run"] if dry else [])
    _run(step, cmd + (["--stub"] if stub else []), out, env)
    if (out / "smoke.json").exists():
        res = json.loads((out / "smoke.json").read_text())
        step.numbers = {f"{r['dtype']} max err/tol": (round(r["worst_ratio"], 3) if r["worst_ratio"] is not None
                                                       else "stub") for r in res["rows"]}
        step.detail = f"device {res['device']}, M={res['M']} d={res['d']}" + (", kernels stubbed" if stub else "")


def _pytest_summary(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if " in " in ln and (
        "passed" in ln or "failed" in ln or "skipped" in ln or "error" in ln)]
    return lines[-1].strip("= ") if lines else ""


def _xdist(env: dict) -> list[str]:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", "8"]  # parallel compiles: Triton builds one kernel variant per process at a time


def step_tests(step: Step, out: Path, env: dict, dry: bool) -> None:
    cmd = [PY, "-m", "pytest", *KERNEL_SUITES, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--junitxml", str(out / "logs" / "tests.xml")]
    cmd += ["-k", DRY_KERNEL_SELECTION] if dry else _xdist(env)
    _run(step, cmd, out, env)
    step.detail = _pytest_summary(out / "logs" / f"{step.key}.log") or step.detail


def step_bench(step: Step, out: Path, env: dict, dry: bool, stub: bool) -> None:
    size = "ci" if dry else "gpu"
    results = out / f"cgc-results-{size}.json"
    cmd = [PY, "-m", "pytest", *BENCH_FILES, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-k", bench_selection(dry, stub), f"--bench-size={size}",
           "--bench-rounds", "1" if dry else "10",
           "--bench-out", str(results), "--benchmark-json", str(out / "logs" / f"pytest-benchmark-{size}.json"),
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    _run(step, cmd, out, env)
    summary = _pytest_summary(out / "logs" / f"{step.key}.log")
    if not results.exists():
        step.status = "fail" if step.status == "pass" else step.status
        step.detail = "no results JSON (see logs/c.log)"
        return
    report = subprocess.run([PY, "-m", "benchmarks.report", str(results), "--md", str(out / f"{size}.md"),
                             "--png", str(out / f"{size}.png")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    if report.returncode != 0:
        step.status = "fail"
        step.detail = "report failed: " + report.stderr.strip().splitlines()[-1][:100]
        return
    step.numbers = key_ratios(json.loads(results.read_text()))
    step.detail = summary


def _extra(r: dict) -> str:
    """What sets an extra case's row apart from the subset's case ("" for the subset's own rows)."""
    what = [f"S{r['S']}K{r['K']}r{r['r']}"] if (r["S"], r["K"], r["r"]) != BENCH_EXPERTS else []
    return " ".join(what + ([f"p={r['dropout_p']:g}"] if r.get("dropout_p") else []))


def extra_ratios(rows: list[dict]) -> dict:
    """Each extra row's time over the same provider's on the subset's case at the same M and shape
    (p = 0, the subset's S, K, r): the cost of dropout, of the largest rank tier."""
    import dataclasses

    from benchmarks.cases import BenchCase

    fields = {f.name for f in dataclasses.fields(BenchCase)}
    by_key = {(q["level"], q["mode"], q["provider"], q["case"]): q for q in rows}
    nums = {}
    for row in rows:
        if row["level"] != "op" or not _extra(row):
            continue
        case = BenchCase(**{k: row[k] for k in fields if k in row})
        S, K, r = BENCH_EXPERTS
        base = by_key.get(("op", row["mode"], row["provider"], dataclasses.replace(
            case, S=S, K=K, r=r, dropout_p=0.0).name))
        if base:
            label = f"op {row['mode']} {row['case'].split('-T')[0]} {row['provider']} {_extra(row)} / base time"
            nums[label] = round(row["median_s"] / base["median_s"], 2)
    return nums


def key_ratios(data: dict) -> dict:
    """Fused op full pass: achieved GB/s and its share of the copy bandwidth; the extra rows' time
    over the subset case's (dropout, the largest rank tier); the fused op's time over fused_v1's
    (the first kernels); layer step and decode speed against PEFT (where both ran)."""
    env, rows = data["environment"], data["results"]
    nums: dict = {"copy GB/s": round(env["copy_bandwidth_bytes_per_s"] / 1e9, 1)}

    def med(level, mode, provider, case=None):
        for r in rows:
            if r["level"] == level and r["mode"] == mode and r["provider"] == provider and (
                    case is None or r["case"] == case):
                return r
        return None

    for r in rows:
        if r["level"] == "op" and r["provider"] == "fused" and r["mode"] == "full" and r.get("lora_bytes"):
            gbs = r["lora_bytes"] / r["median_s"] / 1e9
            share = 100 * gbs * 1e9 / env["copy_bandwidth_bytes_per_s"]
            label = " ".join(x for x in (r["case"].split("-T")[0], _extra(r)) if x)
            nums[f"op full {label} GB/s"] = f"{gbs:.0f} ({share:.0f}% copy)"
    nums.update(extra_ratios(rows))
    for case in sorted({r["case"] for r in rows if r["level"] == "op" and r["provider"] == "fused_v1"}):
        for mode in ("forward", "backward", "full"):  # the GPU-filling kernels against the first ones
            f, v1 = med("op", mode, "fused", case), med("op", mode, "fused_v1", case)
            if f and v1:
                nums[f"op {mode} {case.split('-T')[0]} fused/fused_v1 time"] = round(f["median_s"] / v1["median_s"], 2)
    for case in sorted({r["case"] for r in rows if r["level"] == "layer"}):
        f, p = med("layer", "full", "fused", case), med("layer", "full", "peft_lora", case)
        if f and p:
            nums[f"layer step {case.split('-T')[0]} fused/peft"] = round(f["median_s"] / p["median_s"], 2)
    f, p = med("model-generate", "generate", "fused"), med("model-generate", "generate", "peft_mixed")
    if f:
        nums["decode tok/s fused"] = round(f["tokens_per_s"])
    if f and p:
        nums["decode fused/peft_mixed speed"] = round(f["tokens_per_s"] / p["tokens_per_s"], 2)
    return nums


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = shutil.which("nvcc") or os.path.join(cuda_home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def step_csrc(step: Step, out: Path, env: dict, dry: bool) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        step.status, step.detail = "skip", "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): no CUDA toolkit"
        print(f"== d: {step.detail}")
        return
    # The dry run only collects them: building the extension takes minutes on a loaded CPU.
    _run(step, [PY, "-m", "pytest", "tests/op/test_csrc_ref.py", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
         + (["--collect-only"] if dry else []), out, env)
    step.detail = _pytest_summary(out / "logs" / f"{step.key}.log") or step.detail


def step_graph(step: Step, out: Path, env: dict, dry: bool) -> None:
    _run(step, [PY, "-m", "pytest", "tests/adapter/test_cuda_graph.py", "-q", "-p", "no:cacheprovider",
                "-o", "addopts=", "-rs"], out, env)
    step.detail = _pytest_summary(out / "logs" / f"{step.key}.log") or step.detail
    if step.status == "pass" and "skipped" in step.detail and "passed" not in step.detail:
        step.status = "skip"


def step_decode(step: Step, out: Path, env: dict, dry: bool) -> None:
    """The decode row: on the GPU inductor with CUDA graphs; the dry run dynamo's eager backend."""
    res = out / "logs" / "decode.json"  # in logs.tar.gz: no file beyond the 8 that come back
    _run(step, [PY, "-m", "benchmarks.decode_speed", "--json", str(res)]
         + (["--backend", "eager", "--repeats", "1"] if dry else []), out, env)
    if not res.exists():
        step.status = "fail" if step.status == "pass" else step.status
        return
    row = json.loads(res.read_text())
    m = row["model"]
    step.detail = (f"{m['num_hidden_layers']} layers d={m['hidden_size']} {row['dtype']}, {row['batch']} prompts of "
                   f"{row['prompt']} over {row['tasks']} tasks, {row['new_tokens']} new tokens; torch.compile "
                   f"{row['backend']}, mode {row['mode']}")
    step.numbers = {"eager tok/s": round(row["eager_tok_s"], 1), "compiled tok/s": round(row["compiled_tok_s"], 1),
                    "compiled/eager": round(row["speedup"], 2), "same tokens": row["same_tokens"]}


def summary_table(steps: list[Step], header: dict) -> str:
    lines = [f"GPU check ({header['mode']}): {header['device']}; torch {header['torch']}, "
             f"triton {header['triton']}, python {header['python']}; total {header['total_s']:.0f} s (planned "
             f"{sum(s.planned_s for s in steps)} s, limits {header['limit_total_s']} s)", "",
             "| step | what | planned s | limit s | took s | status | result |",
             "|---|---|---|---|---|---|---|"]
    for s in steps:
        nums = "; ".join(f"{k} {v}" for k, v in s.numbers.items())
        result = " / ".join(x for x in (s.detail, nums) if x).replace("|", "/")
        lines.append(f"| {s.key} | {s.title} | {s.planned_s} | {s.limit_s} | {s.took_s:.0f} | {s.status} | {result} |")
    return "\n".join(lines)


def _driver_version() -> str:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def interpreter_usable() -> bool:
    """Triton 3.6's interpreter fails with numpy >= 2.4 (the GPU image's pair): the root conftest's rule."""
    saved = dict(os.environ)
    try:
        import conftest  # the root one; importing it also sets TRITON_INTERPRET: undone below

        return conftest.interpreter_unusable_reason() is None
    finally:
        os.environ.clear()
        os.environ.update(saved)


def package_outputs(out: Path) -> dict:
    """Logs into logs.tar.gz; then check what comes back from the device: at most 8 files, 16 MiB each."""
    logs = out / "logs"
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    big = [p.name for p in files if p.stat().st_size > MAX_FILE_BYTES]
    return dict(files=[str(p.relative_to(out)) for p in files], count=len(files), over_16_mib=big,
                fits=len(files) <= MAX_FILES and not big)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu"),
                    help="folder for the results and the summary (default $OUT, else out/gpu)")
    ap.add_argument("--wheels", default=None, help="a folder of wheels to install (no index) if the image lacks one")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    ap.add_argument("--dry-run", action="store_true", help="rehearse the same steps on CPU, offline")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a rerun into the same folder: only this run's files come back
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    (out / "logs").mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Offline: nothing is fetched, by pip or by the hub.
    env.update(PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # One Triton cache for every step: the compile step fills it, the others read it.
    env.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "cgc-triton-cache"))
    env["CGC_FUZZ_EXAMPLES"] = str(FUZZ_EXAMPLES)
    # On the GPU the kernels run compiled; the rehearsal uses the interpreter where it can run, else stubs.
    stub = a.dry_run and not interpreter_usable()
    env["TRITON_INTERPRET"] = "1" if a.dry_run and not stub else "0"
    env["CGC_BENCH_SIZE"] = "ci" if a.dry_run else "gpu"

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    if torch.cuda.is_available():
        device += f", driver {_driver_version()}, CUDA {torch.version.cuda}"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    mode = "GPU run" if not a.dry_run else "DRY RUN on CPU" + (" (kernels stubbed)" if stub else " (interpreter)")
    print(f"gpu_check: {mode}; {device}; torch {torch.__version__}, triton {triton_version}, "
          f"python {sys.version.split()[0]}; output {out}", flush=True)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2

    steps = plan(a.dry_run)
    calls = {"pre": lambda s: step_pre(s, out, env, a.dry_run, a.wheels),
             "warm": lambda s: step_warm(s, out, env, a.dry_run, a.workers),
             "a": lambda s: step_smoke(s, out, env, a.dry_run, stub),
             "b": lambda s: step_tests(s, out, env, a.dry_run),
             "c": lambda s: step_bench(s, out, env, a.dry_run, stub),
             "d": lambda s: step_csrc(s, out, env, a.dry_run),
             "e": lambda s: step_graph(s, out, env, a.dry_run),
             "f": lambda s: step_decode(s, out, env, a.dry_run)}
    t0 = time.monotonic()
    for s in steps:
        try:
            calls[s.key](s)
        except Exception as e:  # a broken step must not stop the others
            s.status, s.detail = "fail", f"driver error: {type(e).__name__}: {e}"[:150]
    header = dict(mode="dry run" + (", kernels stubbed" if stub else "") if a.dry_run else "GPU", device=device,
                  torch=torch.__version__, triton=triton_version, python=sys.version.split()[0],
                  total_s=time.monotonic() - t0, limit_total_s=sum(s.limit_s for s in steps))
    table = summary_table(steps, header)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(dict(header, steps=[asdict(s) for s in steps]), indent=1))
    returned = package_outputs(out)
    summary = json.loads((out / "summary.json").read_text())
    summary["returned"] = returned
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nreturned: {returned['count']} files ({', '.join(returned['files'])})"
          + ("" if returned["fits"] else f"; OVER THE LIMIT of {MAX_FILES} files / 16 MiB each"))
    print("\n" + table, flush=True)
    return 1 if any(s.status in ("fail", "timeout") for s in steps) or not returned["fits"] else 0


if __name__ == "__main__":
    sys.exit(main())
