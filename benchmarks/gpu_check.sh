#!/usr/bin/env bash
# The one script a GPU session runs (about 8 minutes on one H200):
#   1. the kernel tests on the GPU (bf16 included), the CUDA C++ reference against the reference op
#   2. every benchmark suite at the gpu size (d=4096, 7B q/v/down shapes, bf16), results as JSON
#   3. the markdown table and the speedup plot rendered from that JSON
# Uses the machine's own torch/triton (never reinstalls torch): installs this package with
# --no-deps and only the pure-python dependencies that are missing (skipped when offline).
# Output: $OUT (default out/gpu): results JSON, pytest-benchmark JSON, report .md and .png, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export TRITON_INTERPRET=0   # the root conftest defaults it to 1 (CPU CI); here kernels run on the GPU
export CGC_BENCH_SIZE=gpu
status=0

"$PY" - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
"$PY" -m pip install -q -e . --no-deps || echo "pip install -e . failed; using the checkout on PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PY'
import importlib.util
mods = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "peft": "peft", "transformers": "transformers",
        "safetensors": "safetensors", "matplotlib": "matplotlib", "hypothesis": "hypothesis", "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
    echo "installing missing pure-python packages: $missing"
    # peft/transformers without deps: their torch requirement must not pull another torch.
    "$PY" -m pip install -q --no-deps $missing || echo "could not install: $missing (offline?)"
fi

echo "== 1. kernel tests on the GPU"
timeout 150 "$PY" -m pytest tests/ -k "kernel or triton or csrc" -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. benchmarks (gpu size)"
timeout 330 "$PY" -m pytest benchmarks/ -q -p no:cacheprovider --bench-size=gpu --bench-rounds "${ROUNDS:-20}" \
    --bench-out "$OUT/cgc-results-gpu.json" --benchmark-json "$OUT/pytest-benchmark-gpu.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name > "$OUT/bench.log" 2>&1
rc=$?
tail -5 "$OUT/bench.log"
[ "$rc" -eq 0 ] || status=1

echo "== 3. report"
if [ -f "$OUT/cgc-results-gpu.json" ]; then
    "$PY" -m benchmarks.report "$OUT/cgc-results-gpu.json" --md "$OUT/gpu.md" --png "$OUT/gpu.png" | head -80
else
    echo "no results JSON (the benchmark run stopped early; see $OUT/bench.log)"
    status=1
fi
exit $status
