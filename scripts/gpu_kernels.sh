#!/usr/bin/env bash
# Kernel tests and benchmark on a GPU machine; results go to $OUT (default: results/).
#   scripts/gpu_kernels.sh shakedown   GPU tests at real sizes, then `bench kernels --quick`
#   scripts/gpu_kernels.sh full        GPU tests, then the full benchmark: kernels.json + kernels_<op>.png
# Liger-Kernel is used as a peer when its wheel is in .whl/ (installed to /tmp/site, no internet).
# Everything printed also goes to $OUT/gpu_kernels.log.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-results}
mkdir -p "$OUT"
LOG="$OUT/gpu_kernels.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$LOG"
run_tests() {
  timeout 120 python3 -m pytest tests/test_kernels_ops.py tests/test_kernels_bench.py -q 2>&1 | tail -n 30 | tee -a "$LOG"
}
case "$MODE" in
  shakedown)
    run_tests
    python3 -m minigpt bench kernels --quick --out /tmp/quick/kernels_quick.json 2>&1 | tee -a "$LOG"
    cp /tmp/quick/kernels_quick.json "$OUT/"
    ;;
  full)
    run_tests
    python3 -m minigpt bench kernels --out "$OUT/kernels.json" 2>&1 | tee -a "$LOG"
    ;;
  *)
    echo "usage: $0 shakedown|full" >&2
    exit 2
    ;;
esac
