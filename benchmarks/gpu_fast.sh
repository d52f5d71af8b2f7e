#!/usr/bin/env bash
# The fast path on the lent GPU machine, from the repo root:   bash benchmarks/gpu_fast.sh
# (results under $OUT, or ./fast-out). The CUDA tests of the kernels, the graphs and the engine; then a
# synthetic gpt-oss-20b (MXFP4 experts + 4-bit g64 rest, random weights): where a decode step's time goes
# (benchmarks/profile_decode.py), and `ossq bench` with the default fast path (Triton ops, CUDA graphs)
# and the same ops launched eagerly, in one run.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" fast-out
W=${WORK:-/tmp/ossq-gpu}
mkdir -p "$W"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/machine.txt"
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider -p no:hypothesispytest -n 16 -o addopts="" -rfE \
  tests/test_triton_ops.py tests/test_triton_prefill.py tests/test_triton_moe.py tests/test_engine.py \
  >"$OUT/tests.txt" 2>&1
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.txt" | tail -30
[ -e "$W/src" ] || (time ossq synth --preset 20b --out "$W/src" --device cuda) 2>&1 | tail -3 | tee "$OUT/synth.txt"
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda 2>&1 | tail -3
timeout 120 python3 benchmarks/profile_decode.py -m "$W/mxfp4-q4" --json "$OUT/profile-90.json" 2>&1 | tail -45
common=(--device cuda --prompt-tokens 90 --warmup 1)
timeout 150 python3 -m ossq.cli bench -m "$W/mxfp4-q4" "${common[@]}" --gen-tokens 256 --repeats 3 --context 2k,4k \
  --batch 8,64 --json "$OUT/bench-graphs.json" --markdown "$OUT/bench-graphs.md" 2>&1 | tail -30
timeout 60 python3 -m ossq.cli bench -m "$W/mxfp4-q4" "${common[@]}" --no-cuda-graphs --gen-tokens 32 --repeats 2 \
  --json "$OUT/bench-eager.json" --markdown "$OUT/bench-eager.md" 2>&1 | tail -12
