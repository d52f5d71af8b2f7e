#!/usr/bin/env bash
# Speculative decoding at batch 1 on the lent GPU machine, from the repo root:
#   OUT=dir bash benchmarks/gpu_speculative.sh        (WITH_120B=0 skips the 120b; GEN_TOKENS, K override;
#   FIXED_K=1 drafts K tokens every step, which measures what a drafting step costs)
# Synthesizes a full-size gpt-oss-20b (random weights, published layout), converts it to the targets
# (MXFP4 experts + 8-bit, 4-bit) and drafts (3-bit, 2-bit), then times each target with and without each
# drafter (n-gram, its 3-bit and 2-bit conversions; the 120b tiered, built in memory, with the 20b): see
# benchmarks/speculative_bench.py. Writes $OUT/speculative.md and $OUT/speculative.json.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" speculative-out
# The conversions (~40 GB) on disk, the 13.8 GB source in RAM (/dev/shm): together they overfill a 64 GiB disk.
W=${WORK:-/tmp/ossq-spec}
SRC=${SOURCE:-/dev/shm/ossq-spec-src}
mkdir -p "$W"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; df -h "$W" /dev/shm; } | tee "$OUT/machine.txt"
big=(); [ "${WITH_120B:-1}" = 1 ] && big=(--with-120b)
[ "${FIXED_K:-0}" = 1 ] && big+=(--fixed-k)
python3 benchmarks/speculative_bench.py --work "$W" --source "$SRC" --out "$OUT" --device cuda \
  --gen-tokens "${GEN_TOKENS:-64}" --num-draft-tokens "${K:-2,4}" "${big[@]}"
