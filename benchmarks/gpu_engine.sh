#!/usr/bin/env bash
# The engine benchmark of benchmarks/engine-h200.md on the lent GPU machine, from the repo root:
#   bash benchmarks/gpu_engine.sh          (results under $OUT, or ./engine-out)
# Synthesizes a full-size gpt-oss-20b (random weights, published layout), converts it as `-q --q-bits 4`
# does (MXFP4 experts kept, the rest 4-bit g64), then runs benchmarks/engine.py on it with the reference ops.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" engine-out
W=${WORK:-/tmp/ossq-gpu}
mkdir -p "$W"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/machine.txt"
[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda
python3 benchmarks/engine.py -m "$W/mxfp4-q4" --device cuda --concurrency "${CONCURRENCY:-1,4,16,64}" \
  --prompt-tokens 90 --gen-tokens "${GEN_TOKENS:-8}" --turns "${TURNS:-4}" --sequential-sample "${SAMPLE:-4}" \
  --markdown "$OUT/engine.md" --json "$OUT/engine.json"
