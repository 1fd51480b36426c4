"""The GPU check: one run on a machine where only torch and triton are preinstalled.

    python3 benchmarks/gpu_check.py [--out DIR] [--dry-run]     (benchmarks/gpu_check.sh calls this)

Steps, in order, each in a subprocess with its own time limit and log file in DIR; a failed or
timed-out step is recorded and the run goes on:

    install  the package and its test/benchmark dependencies, WITH their dependencies, under a
             constraints file pinning the preinstalled torch, triton and numpy (never replaced)
    a smoke  the op on CUDA against the reference: forward and every gradient, bf16 and fp32
    b tests  every kernel suite on CUDA (kernels, dropout, compile, determinism, fuzz, bad input,
             CUDA graphs); interpreter-only cases run only under TRITON_INTERPRET=1
    c bench  a benchmark subset, fused op first: op fwd/bwd/full, the layer training step, model
             decode tokens/s; results JSON, markdown report, achieved GB/s vs measured copy GB/s
    d csrc   the CUDA C++ reference's tests, when nvcc is present (else one line why)
    e graph  a CGCModel decode-shaped step captured in a CUDA graph: replay equals eager, and a
             captured dropout draws a new mask on each replay

The summary table (per step: planned and measured seconds, status, key numbers) is printed last
and written to DIR/summary.md and DIR/summary.json.

--dry-run runs the very same steps on CPU: Triton's interpreter, the "ci" benchmark size, a
one-test selection of the kernel suites, the C++ tests collected only, and `pip install --dry-run`
(resolves, installs nothing); a test in the suite runs it, so every commit proves the plumbing
(order, limits, outputs, summary).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

KERNEL_SUITES = ["tests/test_kernels.py", "tests/test_kernels_dropout.py", "tests/test_compile.py",
                 "tests/test_determinism.py", "tests/test_fuzz.py", "tests/test_bad_input.py",
                 "tests/test_cuda_graph.py"]
# One fast test per run in the dry run: the plumbing, not the kernels, is what it proves.
DRY_KERNEL_SELECTION = "test_forward_matches_naive_oracle or test_dropout_mask_properties"
# The benchmark subset: one mid-sized expert shape at T=4 (both token counts, both layer shapes),
# the fused op first (test_op.py before the layer and model suites; providers in PROVIDERS order).
BENCH_FILES = ["benchmarks/test_op.py", "benchmarks/test_layer.py", "benchmarks/test_model.py"]
BENCH_SELECTION = ("(T4-S2K1r8-uniform and (fused or peft_lora or bare_linear)) "
                   "or generate-T4-fused or generate-T4-peft_mixed or generate-T4-bare_model "
                   "or train-T4-fused or train-T4-peft_lora")
TEST_DEPS = ["pytest>=8", "hypothesis>=6", "pytest-xdist>=3", "ninja>=1.11"]
PINNED = ["torch", "triton", "numpy"]  # preinstalled: the constraints file keeps them as they are


@dataclass
class Step:
    key: str
    title: str
    planned_s: int  # expected on one H200 (the plan; total <= 7 minutes)
    limit_s: int  # hard time limit
    status: str = "not run"  # pass | fail | timeout | skip
    took_s: float = 0.0
    detail: str = ""
    numbers: dict = field(default_factory=dict)


def plan(dry: bool) -> list[Step]:
    # Planned seconds on the GPU machine; limits sum to 7 minutes. The dry run allows more per
    # step (a loaded 2-core CPU, the interpreter).
    steps = [
        Step("install", "install (constrained to the preinstalled torch/triton)", 45, 60),
        Step("a", "smoke: op vs reference, fwd + every grad, bf16/fp32", 15, 30),
        Step("b", "kernel test suites on the device", 100, 120),
        Step("c", "benchmark subset (fused first), JSON + report + GB/s", 150, 160),
        Step("d", "CUDA C++ reference tests (nvcc)", 30, 35),
        Step("e", "CUDA graph: CGCModel decode step, replay == eager", 10, 15),
    ]
    if dry:
        for s in steps:
            s.limit_s = 300
    return steps


def _run(step: Step, cmd: list[str], out: Path, env: dict) -> int | None:
    """Run `cmd` under the step's limit, output to out/<key>.log; returns the exit code (None: timeout)."""
    log = out / f"{step.key}.log"
    print(f"== {step.key}: {step.title}  (limit {step.limit_s} s)\n   $ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=step.limit_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    step.took_s = time.monotonic() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-6:]
    for line in tail:
        print("   | " + line[:200])
    step.status = "timeout" if rc is None else "pass" if rc == 0 else "fail"
    if tail and not step.detail:
        step.detail = tail[-1][:120]
    return rc


def write_constraints(out: Path) -> Path:
    """Pins of the preinstalled torch, triton, numpy (and torch's nvidia-* wheels) as installed."""
    lines = []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in PINNED or name.startswith("nvidia-"):
            lines.append(f"{name}=={dist.version}")
    path = out / "constraints.txt"
    path.write_text("\n".join(sorted(set(lines))) + "\n")
    return path


def step_install(step: Step, out: Path, env: dict, dry: bool) -> None:
    cons = write_constraints(out)
    cmd = [PY, "-m", "pip", "install", "-q", "-c", str(cons), "-e", ".[bench]", *TEST_DEPS]
    if dry:
        # Resolve against the same constraints, install nothing; the project itself is installed
        # already (and building its metadata would need the index).
        cmd = [PY, "-m", "pip", "install", "--dry-run", "--no-index", "-q", "-c", str(cons),
               "pytest", "hypothesis", "transformers", "peft", "pytest-benchmark", "matplotlib", "safetensors"]
    _run(step, cmd, out, env)
    step.numbers["pinned"] = cons.read_text().split()[:3]


def step_smoke(step: Step, out: Path, env: dict, dry: bool) -> None:
    cmd = [PY, "-m", "benchmarks.gpu_smoke", "--json", str(out / "smoke.json")] + (["--dry-run"] if dry else [])
    _run(step, cmd, out, env)
    if (out / "smoke.json").exists():
        res = json.loads((out / "smoke.json").read_text())
        step.numbers = {f"{r['dtype']} max err/tol": round(r["worst_ratio"], 3) for r in res["rows"]}
        step.detail = f"device {res['device']}, M={res['M']} d={res['d']}"


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
           "--junitxml", str(out / "tests.xml")]
    cmd += ["-k", DRY_KERNEL_SELECTION] if dry else _xdist(env)
    _run(step, cmd, out, env)
    step.detail = _pytest_summary(out / f"{step.key}.log") or step.detail


def step_bench(step: Step, out: Path, env: dict, dry: bool) -> None:
    size = "ci" if dry else "gpu"
    results = out / f"cgc-results-{size}.json"
    cmd = [PY, "-m", "pytest", *BENCH_FILES, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-k", BENCH_SELECTION, f"--bench-size={size}", "--bench-rounds", "1" if dry else "10",
           "--bench-out", str(results), "--benchmark-json", str(out / f"pytest-benchmark-{size}.json"),
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    _run(step, cmd, out, env)
    summary = _pytest_summary(out / f"{step.key}.log")
    if not results.exists():
        step.status = "fail" if step.status == "pass" else step.status
        step.detail = "no results JSON (see c.log)"
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


def key_ratios(data: dict) -> dict:
    """Fused op full pass: achieved GB/s and its share of the copy bandwidth; the fused op's time
    over fused_v1's (the first kernels); layer step and decode speed against PEFT (where both ran)."""
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
            nums[f"op full {r['case'].split('-T')[0]} GB/s"] = f"{gbs:.0f} ({share:.0f}% copy)"
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
    _run(step, [PY, "-m", "pytest", "tests/test_csrc_ref.py", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
         + (["--collect-only"] if dry else []), out, env)
    step.detail = _pytest_summary(out / f"{step.key}.log") or step.detail


def step_graph(step: Step, out: Path, env: dict, dry: bool) -> None:
    _run(step, [PY, "-m", "pytest", "tests/test_cuda_graph.py", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                "-rs"], out, env)
    step.detail = _pytest_summary(out / f"{step.key}.log") or step.detail
    if step.status == "pass" and "skipped" in step.detail and "passed" not in step.detail:
        step.status = "skip"


STEPS = {"install": step_install, "a": step_smoke, "b": step_tests, "c": step_bench, "d": step_csrc,
         "e": step_graph}


def summary_table(steps: list[Step], header: dict) -> str:
    lines = [f"GPU check ({header['mode']}): {header['device']}; torch {header['torch']}, "
             f"triton {header['triton']}; total {header['total_s']:.0f} s (planned "
             f"{sum(s.planned_s for s in steps)} s)", "",
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu"),
                    help="folder for logs, results and the summary (default $OUT, else out/gpu)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU, in seconds")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # The root conftest defaults TRITON_INTERPRET to 1 (CPU CI); on the GPU the kernels run compiled.
    env["TRITON_INTERPRET"] = "1" if a.dry_run else "0"
    env["CGC_BENCH_SIZE"] = "ci" if a.dry_run else "gpu"

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    if torch.cuda.is_available():
        device += f", driver {_driver_version()}, CUDA {torch.version.cuda}"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    print(f"gpu_check: {'DRY RUN on CPU' if a.dry_run else 'GPU run'}; {device}; torch {torch.__version__}, "
          f"triton {triton_version}, python {sys.version.split()[0]}; output {out}", flush=True)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2

    steps = plan(a.dry_run)
    t0 = time.monotonic()
    for s in steps:
        try:
            STEPS[s.key](s, out, env, a.dry_run)
        except Exception as e:  # a broken step must not stop the others
            s.status, s.detail = "fail", f"driver error: {type(e).__name__}: {e}"[:150]
    header = dict(mode="dry run" if a.dry_run else "GPU", device=device, torch=torch.__version__,
                  triton=triton_version, total_s=time.monotonic() - t0)
    table = summary_table(steps, header)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(dict(header, steps=[asdict(s) for s in steps]), indent=1))
    print("\n" + table, flush=True)
    return 1 if any(s.status in ("fail", "timeout") for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
