#!/usr/bin/env bash
# The book's GPU pass on a host with two GPUs (one works too, in sequence: GPU1=0), as the committed
# results and notebook outputs were produced. No internet is needed: wheels come from .whl/ (a copy
# of shared/device-wheels plus the serving stack), corpora from $MINIGPT_DATA_DIR.
#
#   scripts/gpu_book.sh measure          GPU0: scripts/gpu_kernels.sh, then `bench serve`;
#                                        GPU1: `train --recipe gutenberg-small` (the published run, one command)
#   scripts/gpu_book.sh notebooks A B..  execute the named notebooks, half on each GPU, after copying the
#                                        results of `measure` (if this machine ran it) into results/
#
# Everything lands in $OUT (default /tmp/gpu_book) as at most a few archives and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_book}
RES=/tmp/gpu_book_results  # kept on the machine between calls: `notebooks` reads what `measure` wrote
GPU0=${GPU0:-0}
GPU1=${GPU1:-1}
mkdir -p "$OUT" "$RES/train"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MINIGPT_DATA_DIR=${MINIGPT_DATA_DIR:-$PWD/.carry/data}
MODE=${1:-measure}
shift || true

case "$MODE" in
  measure)
    (
      export CUDA_VISIBLE_DEVICES=$GPU0
      OUT=$RES WHEELS=/nonexistent timeout 400 bash scripts/gpu_kernels.sh full
      timeout 170 python3 -m minigpt bench serve --out "$RES/serve"
    ) > "$OUT/gpu0.log" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=$GPU1
      rm -rf /tmp/gs
      timeout 330 python3 -m minigpt train --recipe gutenberg-small --tokenizer results/train/gutenberg_tokenizer.json \
        --out-dir /tmp/gs --no-progress
      cp /tmp/gs/metrics.jsonl "$RES/train/gutenberg_small_recipe.jsonl"
    ) > "$OUT/gpu1.log" 2>&1 &
    wait
    cp "$OUT/gpu1.log" "$RES/train/log_gutenberg_small_recipe.txt"
    tar czf "$OUT/results.tgz" -C "$RES" .
    tail -n 25 "$OUT/gpu1.log"
    tail -n 60 "$OUT/gpu0.log"
    ;;
  notebooks)
    [ -d "$RES/serve" ] && cp -r "$RES"/serve results/
    [ -f "$RES/kernels.json" ] && cp "$RES"/kernels.json "$RES"/kernels_*.png "$RES"/launch_overhead.json results/ 2>/dev/null
    mkdir -p "$OUT/nb"
    nbs=("$@")
    half=$(( (${#nbs[@]} + 1) / 2 ))
    CUDA_VISIBLE_DEVICES=$GPU0 timeout 560 python3 scripts/run_notebooks.py "${nbs[@]:0:$half}" --out "$OUT/nb" > "$OUT/nb0.log" 2>&1 &
    if [ "${#nbs[@]}" -gt "$half" ]; then
      CUDA_VISIBLE_DEVICES=$GPU1 timeout 560 python3 scripts/run_notebooks.py "${nbs[@]:$half}" --out "$OUT/nb" > "$OUT/nb1.log" 2>&1 &
    fi
    wait
    tar czf "$OUT/notebooks.tgz" -C "$OUT/nb" .
    rm -rf "$OUT/nb"
    cat "$OUT"/nb*.log | grep -v -i warn | tail -n 40
    ;;
  *)
    echo "usage: $0 measure | notebooks NOTEBOOK..." >&2
    exit 2
    ;;
esac
