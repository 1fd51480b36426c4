#!/usr/bin/env bash
# The one script a GPU session runs (planned ~6 minutes on one H200, 7 at most): installs the package
# into the machine's own torch/triton (never replacing them), then the smoke test, the kernel suites
# on CUDA, a benchmark subset with its report, the CUDA C++ reference and a CUDA-graph check, each
# time-boxed, with a summary table last. All of it lives in benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [--out DIR]      # default $OUT, else out/gpu
#   benchmarks/gpu_check.sh --dry-run        # the same steps on CPU in seconds (the test suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exec "$PY" benchmarks/gpu_check.py "$@"
