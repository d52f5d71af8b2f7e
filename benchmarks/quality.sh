#!/usr/bin/env bash
# The quantization quality table of a small gpt-oss trained here, in one command (issue 12):
#   OUT=dir bash benchmarks/quality.sh            # GPU: ~3 min training, then ~21 variants converted and scored
#   OUT=dir bash benchmarks/quality.sh --tiny     # CPU smoke test of the whole pipeline (2 layers, 20 steps)
# Data: .data/*.txt in the repo root, or $DATA (copies of the shared public-domain texts). Extra arguments after
# --tiny go to train_small.py (e.g. --train-seconds 120 --layers 6); QUALITY_ARGS to quality.py
# (e.g. "--only q4g64 gptq-q4g64"; "--keep --drafts ngram q3g64" adds speculative acceptance). Writes to
# $OUT: quality.md, quality.json, ppl.json, train.json, train.log, quality.log (and acceptance.md). The
# model and the variants stay in $WORK (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the results directory}"
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
WORK=${WORK:-$(mktemp -d -t ossq-quality-XXXX)}
mkdir -p "$OUT"
TRAIN_ARGS=()
QARGS=(${QUALITY_ARGS:-})
if [[ "${1:-}" == "--tiny" ]]; then
  shift
  TRAIN_ARGS+=(--tiny)
  QARGS+=(--eval-tokens 2048 --calib-tokens 1024 --window 64)
fi
if [[ -z "${DEVICE:-}" ]]; then
  DEVICE=$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
$PY benchmarks/train_small.py --out "$WORK" --data "${DATA:-.data}" --device "$DEVICE" "${TRAIN_ARGS[@]}" "$@" 2>&1 | tee "$OUT/train.log"
cp "$WORK/train.json" "$OUT/train.json"
$PY benchmarks/quality.py --work "$WORK" --out "$OUT" --device "$DEVICE" "${QARGS[@]}" 2>&1 | tee "$OUT/quality.log"
