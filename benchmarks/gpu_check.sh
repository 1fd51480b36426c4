#!/usr/bin/env bash
# The one script a GPU session runs, offline on the GPU machines' image (nothing installed; the
# checkout on PYTHONPATH): preflight, every kernel variant compiled in parallel, the smoke test, the
# kernel suites on CUDA, a benchmark subset with its report, the CUDA C++ reference, a CUDA-graph
# check and compiled against eager decode tokens/s, each in its own time box (9 min 10 s in all),
# the summary table last. What comes back: at most 8 files in DIR. All of it lives in
# benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [--out DIR] [--wheels DIR]   # default $OUT, else out/gpu
#   benchmarks/gpu_check.sh --dry-run                    # the rehearsal on CPU (the test suite runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exec "$PY" benchmarks/gpu_check.py "$@"
