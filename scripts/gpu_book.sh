#!/usr/bin/env bash
# The book's GPU pass on a host with two GPUs (one works too, in sequence: GPU1=0), as the committed
# results and notebook outputs were produced. No internet is needed: wheels come from .whl/ (a copy
# of shared/device-wheels, plus plotly for the figures of chapters 1-7 and the serving stack), corpora
# from $MINIGPT_DATA_DIR.
#
#   scripts/gpu_book.sh measure [NB..]   GPU0: scripts/gpu_kernels.sh (CUDA tests, launch overhead, kernels.json);
#                                        GPU1: `bench serve`; then each GPU executes half of the named
#                                        notebooks (first half GPU0, second half GPU1), after its measurement
#   scripts/gpu_book.sh train            GPU0: `train --recipe gutenberg-small` (the published run, one command)
#   scripts/gpu_book.sh notebooks NB..   execute the named notebooks, half on each GPU
#
# Results of `measure` and `train` land in $RES (kept on the machine between calls) and are copied into
# results/ before any notebook runs, so the chapters read this run's numbers; $OUT gets a few archives.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_book}
RES=/tmp/gpu_book_results
GPU0=${GPU0:-0}
GPU1=${GPU1:-1}
NB_TIMEOUT=${NB_TIMEOUT:-150}  # seconds per cell
mkdir -p "$OUT/nb" "$RES/train"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MINIGPT_DATA_DIR=${MINIGPT_DATA_DIR:-$PWD/.carry/data}
MODE=${1:-measure}
shift || true
nbs=("$@")
half=$(( (${#nbs[@]} + 1) / 2 ))

use_results() {  # this machine's measurements, where it made them, replace the committed ones
  [ -d "$RES/serve" ] && cp -r "$RES"/serve results/
  [ -f "$RES/kernels.json" ] && cp "$RES"/kernels.json "$RES"/kernels_*.png "$RES"/launch_overhead.json results/ 2>/dev/null
  return 0
}
notebooks() {  # notebooks() GPU LOG NB..: execute on one GPU, sequentially
  local gpu=$1 log=$2
  shift 2
  [ $# -eq 0 ] && return 0
  if grep -l "import plotly" "$@" >/dev/null 2>&1 && ! python3 -c "import plotly" 2>/dev/null; then
    echo "$(grep -l 'import plotly' "$@" | xargs -n1 basename | tr '\n' ' ')need plotly: copy plotly-*.whl into .whl/" >> "$log"
    return 1
  fi
  use_results
  CUDA_VISIBLE_DEVICES=$gpu timeout 560 python3 scripts/run_notebooks.py "$@" --timeout "$NB_TIMEOUT" --out "$OUT/nb" >> "$log" 2>&1
}
pack() {
  tar czf "$OUT/results.tgz" -C "$RES" .
  if ls "$OUT"/nb/*.ipynb >/dev/null 2>&1; then tar czf "$OUT/notebooks.tgz" -C "$OUT/nb" .; fi
  rm -rf "$OUT/nb"
  grep -h "ipynb" "$OUT"/*.log 2>/dev/null
}

case "$MODE" in
  measure)
    (
      export CUDA_VISIBLE_DEVICES=$GPU0
      OUT=$RES WHEELS=/nonexistent timeout 520 bash scripts/gpu_kernels.sh full
      notebooks "$GPU0" "$OUT/gpu0.log" "${nbs[@]:0:$half}"
    ) > "$OUT/gpu0.log" 2>&1 &
    (
      CUDA_VISIBLE_DEVICES=$GPU1 timeout 240 python3 -m minigpt bench serve --out "$RES/serve"
      notebooks "$GPU1" "$OUT/gpu1.log" "${nbs[@]:$half}"
    ) > "$OUT/gpu1.log" 2>&1 &
    wait
    pack
    tail -n 30 "$OUT/gpu1.log" | grep -v -i warn
    tail -n 25 "$OUT/gpu0.log" | grep -v -i warn
    ;;
  train)
    rm -rf /tmp/gs
    CUDA_VISIBLE_DEVICES=$GPU0 timeout 330 python3 -m minigpt train --recipe gutenberg-small \
      --tokenizer results/train/gutenberg_tokenizer.json --out-dir /tmp/gs --no-progress > "$OUT/train.log" 2>&1
    cp /tmp/gs/metrics.jsonl "$RES/train/gutenberg_small_recipe.jsonl"
    cp "$OUT/train.log" "$RES/train/log_gutenberg_small_recipe.txt"
    pack
    tail -n 25 "$OUT/train.log"
    ;;
  notebooks)
    notebooks "$GPU0" "$OUT/nb0.log" "${nbs[@]:0:$half}" &
    notebooks "$GPU1" "$OUT/nb1.log" "${nbs[@]:$half}" &
    wait
    pack
    cat "$OUT"/nb*.log | grep -v -i warn | tail -n 40
    ;;
  *)
    echo "usage: $0 measure [NOTEBOOK..] | train | notebooks NOTEBOOK.." >&2
    exit 2
    ;;
esac
