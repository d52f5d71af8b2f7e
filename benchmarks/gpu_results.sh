#!/usr/bin/env bash
# benchmarks/RESULTS.md's ossq table on the lent GPU machine, from the repo root:   bash benchmarks/gpu_results.sh
# (results under $OUT, or ./results-out). The CUDA tests run while a synthetic gpt-oss-20b (published layout,
# random weights) is converted to six variants (/dev/shm holds the large ones: the disk is 64 GiB); then
# `ossq bench` measures all six side by side on the default fast path (Triton ops, CUDA graphs) at 90, 2k
# and 4k tokens of context; gpt-oss-120b with the tiered recipe built in GPU memory (benchmarks/synthetic_bench.py);
# and the batch curve 1 … 256 of the MXFP4-experts variant.
# The baselines (transformers, the torch path) and the profile are benchmarks/gpu_baselines.sh.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" results-out
W=${WORK:-/tmp/ossq-gpu}
S=/dev/shm/ossq-gpu
mkdir -p "$W" "$S"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } | tee "$OUT/machine.txt"
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -p no:hypothesispytest -n 12 -o addopts="" -rfE \
  --durations=5 tests/test_triton_ops.py tests/test_engine.py \
  >"$OUT/tests.txt" 2>&1 &
tests=$!
[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda 2>&1 | tail -1
convert() {  # name, directory, flags...
  local name=$1 dir=$2; shift 2
  local t0=$(date +%s)
  ossq convert --hf-path "$W/src" --mlx-path "$dir/$name" --device cuda "$@" >"$OUT/convert-$name.txt" 2>&1
  echo "$name: $(( $(date +%s) - t0 )) s, $(tail -2 "$OUT/convert-$name.txt" | tr '\n' ' ')" | tee -a "$OUT/convert.txt"
}
pids=()
convert mxfp4-q4 "$W" -q --q-bits 4 --q-group-size 64 & pids+=($!)
convert q4-g64 "$W" -q --q-bits 4 --q-group-size 64 --experts quantize & pids+=($!)
convert q4-g32 "$S" -q --q-bits 4 --q-group-size 32 --experts quantize & pids+=($!)
convert q6-g32 "$S" -q --q-bits 6 --q-group-size 32 --experts quantize & pids+=($!)
convert q8-g64 "$S" -q --q-bits 8 --q-group-size 64 --experts quantize & pids+=($!)
convert tiered "$W" -q --quant-predicate tiered --experts quantize & pids+=($!)
wait "${pids[@]}" "$tests"
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.txt" | tail -20
for m in "$W/mxfp4-q4" "$W/q4-g64" "$S/q4-g32" "$S/q6-g32" "$S/q8-g64" "$W/tiered"; do  # one call each: a slow one
  timeout 50 python3 -m ossq.cli bench -m "$m" --device cuda --prompt-tokens 90 --gen-tokens 128 --repeats 3 \
    --warmup 1 --context 2k,4k --json "$OUT/bench-$(basename "$m").json" 2>&1 | grep -A1 -E "generation|prompt|TTFT|peak|copy"
done
rm -rf "$S"  # the 120b takes the memory
timeout 100 python3 benchmarks/synthetic_bench.py --preset 120b --recipe tiered --gen-tokens 128 --repeats 3 \
  --context 2k --json "$OUT/synthetic-120b-tiered.json" 2>&1 | tail -30
timeout 120 python3 -m ossq.cli bench -m "$W/mxfp4-q4" --device cuda --prompt-tokens 90 --gen-tokens 128 --repeats 2 \
  --warmup 1 --batch 1,2,4,8,16,32,64,128,256 --json "$OUT/bench-batch.json" --markdown "$OUT/bench-batch.md" 2>&1 | tail -40
