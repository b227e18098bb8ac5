#!/usr/bin/env bash
# Kernel tests, launch overhead and the kernel + training benchmark on ONE GPU (issue 12), <= 8.5 min on an H200.
#   scripts/gpu_kernels.sh          full: CUDA tests, launch_overhead.json, kernels.json (+ --train) and plots
#   scripts/gpu_kernels.sh quick    CUDA tests, then `bench kernels --quick --train` (one size per op, small only)
# Results go to $OUT (default: results/); everything printed also goes to $OUT/gpu_kernels.log.
# Liger-Kernel is used as a peer when its wheel is in $WHEELS (default .whl/; installed to /tmp/site, no internet).
# The last thing printed is the targets table, recomputed from kernels.json (also when a stage timed out).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-results}
mkdir -p "$OUT"
LOG="$OUT/gpu_kernels.log"
: > "$LOG"
WHEELS=${WHEELS:-.whl}  # e.g. a copy of shared/device-wheels (Liger-Kernel 0.8.5 among them)
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
export MINIGPT_DATA_DIR=${MINIGPT_DATA_DIR:-$PWD/../shared/data}
start=$(date +%s)
stage() { echo "[gpu_kernels] $1 at +$(( $(date +%s) - start )) s" | tee -a "$LOG"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import liger_kernel; print('liger-kernel', getattr(liger_kernel, '__version__', 'installed'))" 2>/dev/null \
    || echo "liger-kernel not installed: Liger rows and targets are skipped"
} 2>&1 | tee -a "$LOG"

stage "tests (CUDA)"
timeout 170 python3 -m pytest -x -q -p no:cacheprovider tests/test_kernels_ops.py tests/test_flash_attention.py \
  tests/test_model_triton.py tests/test_kernels_bench.py 2>&1 | tail -n 15 | tee -a "$LOG"

case "$MODE" in
  quick)
    stage "bench kernels --quick --train"
    timeout 200 python3 -m minigpt bench kernels --quick --train --out "$OUT/kernels_quick.json" 2>&1 | tee -a "$LOG"
    JSON="$OUT/kernels_quick.json"
    ;;
  full)
    stage "launch overhead"
    timeout 40 python3 scripts/gpu_launch_overhead.py --out "$OUT" 2>&1 | tee -a "$LOG"
    stage "bench kernels --train"
    timeout 280 python3 -m minigpt bench kernels --train --train-budget-s 130 --out "$OUT/kernels.json" 2>&1 | tee -a "$LOG"
    JSON="$OUT/kernels.json"
    ;;
  *)
    echo "usage: $0 [full|quick]" >&2
    exit 2
    ;;
esac
stage "done; targets (graph timings)"
python3 -c "from minigpt import bench; print(bench.report('$JSON').split(chr(10) + chr(10))[-1])" 2>&1 | tee -a "$LOG"
