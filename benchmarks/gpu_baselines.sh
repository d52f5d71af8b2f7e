#!/usr/bin/env bash
# Baselines and the profile on the lent GPU machine, from the repo root:   bash benchmarks/gpu_baselines.sh
# (results under $OUT, or ./baselines-out). A synthetic gpt-oss-20b (published layout) and its MXFP4
# experts + 4-bit g64 conversion; where a decode step's time goes (benchmarks/profile_decode.py) with and
# without programmatic dependent launch (OSSQ_PDL); the torch reference ops; transformers'
# GptOssForCausalLM in bf16 on the same prompts; gpt-oss-120b with the tiered recipe, built in GPU memory
# (benchmarks/synthetic_bench.py). The graph and end-to-end CUDA tests run while the checkpoint is built.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" baselines-out
W=${WORK:-/tmp/ossq-gpu}
mkdir -p "$W"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} | tee "$OUT/machine.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:hypothesispytest -n 8 -o addopts="" -rfE \
  tests/test_triton_ops.py -k "graph or fast_path or engine or moe" >"$OUT/tests.txt" 2>&1 &
tests=$!
[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda 2>&1 | tail -1
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda 2>&1 | tail -2
wait $tests
grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.txt" | tail -20
for pdl in 1 0; do
  OSSQ_PDL=$pdl timeout 100 python3 benchmarks/profile_decode.py -m "$W/mxfp4-q4" --json "$OUT/profile-90-pdl$pdl.json" \
    2>&1 | tail -40
  OSSQ_PDL=$pdl timeout 100 python3 -m ossq.cli bench -m "$W/mxfp4-q4" --device cuda --prompt-tokens 90 --warmup 1 \
    --gen-tokens 256 --repeats 3 --context 2k --json "$OUT/bench-pdl$pdl.json" 2>&1 | grep -A1 -E "generation|prompt|TTFT|copy"
done
timeout 90 python3 -m ossq.cli bench -m "$W/mxfp4-q4" --device cuda --prompt-tokens 90 --warmup 1 --ops torch \
  --gen-tokens 8 --repeats 1 --json "$OUT/bench-torch.json" 2>&1 | grep -A1 -E "generation|prompt|TTFT"
timeout 200 python3 benchmarks/transformers_baseline.py --hf-path "$W/src" --gen-tokens 32 --repeats 2 --context 2k \
  --json "$OUT/transformers-20b.json" 2>&1 | tail -22
timeout 150 python3 benchmarks/synthetic_bench.py --preset 120b --recipe tiered --gen-tokens 128 --repeats 2 \
  --context 2k --json "$OUT/synthetic-120b-tiered.json" 2>&1 | tail -30
