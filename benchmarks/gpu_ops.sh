#!/usr/bin/env bash
# The ops side by side on the lent GPU machine, from the repo root:
#   bash benchmarks/gpu_ops.sh            (results under $OUT, or ./ops-out)
# Runs the CUDA tests (kernels vs TorchOps in bf16, the sync-free decode step, the CUDA-graph sampler),
# then `ossq bench` of one synthetic gpt-oss-20b (MXFP4 experts + 4-bit g64, random weights) with the
# torch reference ops and with the Triton kernels, eager (no CUDA graphs yet).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" ops-out
W=${WORK:-/tmp/ossq-gpu}
mkdir -p "$W"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/machine.txt"
python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_triton_ops.py tests/test_engine.py tests/test_sampling.py \
  2>&1 | tail -4 | tee "$OUT/tests.txt"
[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda
for ops in torch triton; do
  ossq bench -m "$W/mxfp4-q4" --device cuda --ops "$ops" --prompt-tokens 90 --gen-tokens "${GEN_TOKENS:-32}" \
    --repeats 2 --warmup 1 --batch "${BATCH:-8}" --json "$OUT/bench-$ops.json" --markdown "$OUT/bench-$ops.md"
done
