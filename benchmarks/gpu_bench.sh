#!/usr/bin/env bash
# The GPU bench report of benchmarks/bench-20b-h100.md, run on the lent GPU machine from the repo root:
#   bash benchmarks/gpu_bench.sh            (results under $OUT, or ./bench-out)
# It synthesizes a full-size gpt-oss-20b in the published layout (random weights; no download), converts it
# to the variants below with ossq, then runs `ossq bench` on all of them side by side on the GPU.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" bench-out
W=${WORK:-/tmp/ossq-gpu}
# Variants need ~75 GB with the source; put the large ones in RAM (/dev/shm) when the disk is short.
SHM=/dev/shm/ossq-gpu
mkdir -p "$W" "$SHM"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; free -g | head -2; df -h "$W" "$SHM"; } \
  | tee "$OUT/machine.txt"
timed() {  # skips a step whose output (the argument after --out/--mlx-path) exists: a warm machine keeps /tmp
  local name=$1 t0 prev=""; shift; t0=$(date +%s.%N)
  for a in "$@"; do
    case $prev in --out|--mlx-path) [ -e "$a" ] && { echo "$name: $a exists, skipped"; return; } ;; esac
    prev=$a
  done
  "$@"
  awk -v a="$t0" -v b="$(date +%s.%N)" -v n="$name" 'BEGIN { printf "%s: %.1f s\n", n, b - a }' | tee -a "$OUT/times.txt"
}
# Quantizing on the GPU must give the same bytes as on the CPU: check on a tiny model first.
timed tiny ossq synth --preset tiny --out "$W/tiny"
timed tiny-cpu ossq convert --hf-path "$W/tiny" --mlx-path "$W/tiny-cpu" -q --q-bits 4 --experts quantize --device cpu
timed tiny-cuda ossq convert --hf-path "$W/tiny" --mlx-path "$W/tiny-cuda" -q --q-bits 4 --experts quantize --device cuda
cmp "$W/tiny-cpu/model.safetensors" "$W/tiny-cuda/model.safetensors" && echo "cuda conversion: identical bytes" \
  | tee -a "$OUT/times.txt"
timed synth ossq synth --preset 20b --out "$W/src" --device cuda
timed convert-mxfp4 ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --q-group-size 64 --device cuda
timed convert-q4 ossq convert --hf-path "$W/src" --mlx-path "$W/q4-g64" -q --q-bits 4 --q-group-size 64 --experts quantize --device cuda
timed convert-q6 ossq convert --hf-path "$W/src" --mlx-path "$SHM/q6-g32" -q --q-bits 6 --q-group-size 32 --experts quantize --device cuda
timed convert-q8 ossq convert --hf-path "$W/src" --mlx-path "$SHM/q8-g64" -q --q-bits 8 --q-group-size 64 --experts quantize --device cuda
cat "$OUT/times.txt"
timed bench ossq bench -m "$W/mxfp4-q4" -m "$W/q4-g64" -m "$SHM/q6-g32" -m "$SHM/q8-g64" --device cuda \
  --prompt-tokens 90 --gen-tokens ${GEN_TOKENS:-32} --repeats ${REPEATS:-2} --warmup 1 \
  --json "$OUT/bench.json" --markdown "$OUT/bench.md" --plot "$OUT/bench.png"
cat "$OUT/times.txt"
