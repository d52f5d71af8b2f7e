#!/usr/bin/env bash
# The serving load test on the lent GPU machine, from the repo root:   bash benchmarks/gpu_serve.sh
# (results under $OUT, or ./serve-out). Synthesizes a full-size gpt-oss-20b (random weights, published
# layout), converts it as `-q --q-bits 4` (MXFP4 experts kept, 4-bit g64 rest), then drives `ossq serve
# --device cuda` (Triton ops, CUDA graphs) with 64 concurrent streaming clients and with one client at a
# time (benchmarks/serve_load.py).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" serve-out
W=${WORK:-/tmp/ossq-gpu}
mkdir -p "$W"
[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda 2>&1 | tail -1
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda 2>&1 | tail -1
timeout "${SERVE_S:-240}" python3 benchmarks/serve_load.py -m "$W/mxfp4-q4" --requests "${REQUESTS:-512}" \
  --concurrency 64 --sequential-requests 16 --max-tokens 128 --deadline "${DEADLINE_S:-220}" \
  --markdown "$OUT/serve-h200.md" --json "$OUT/serve-h200.json" -- --device cuda 2>&1 | tail -25
