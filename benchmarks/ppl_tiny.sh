#!/usr/bin/env bash
# The CPU perplexity/KL table of benchmarks/ppl-tiny-cpu.md: a tiny synthetic gpt-oss and five quantizations
# of it, scored on a public-domain text (the Jargon File; pass any text file as $1).
#   bash benchmarks/ppl_tiny.sh path/to/jargon.txt [workdir]
set -euo pipefail
DATA=${1:?usage: ppl_tiny.sh TEXT_FILE [WORKDIR]}
W=${2:-/tmp/ossq-ppl-tiny}
ossq() { python -m ossq.cli "$@"; }
mkdir -p "$W"
[ -e "$W/tiny" ] || ossq synth --preset tiny --out "$W/tiny" --seed 0
conv() { [ -e "$W/$1" ] || ossq convert --hf-path "$W/tiny" --mlx-path "$W/$1" -q "${@:2}"; }
conv q8-g64 --q-bits 8 --experts quantize
conv q6-g32 --q-bits 6 --q-group-size 32 --experts quantize
conv q4-g64 --q-bits 4 --experts quantize
conv mixed_3_6 --quant-predicate mixed_3_6 --q-group-size 64 --experts quantize
conv q3-g32 --q-bits 3 --q-group-size 32 --experts quantize
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ossq ppl -m "$W/tiny" -m "$W/q8-g64" -m "$W/q6-g32" -m "$W/q4-g64" \
  -m "$W/mixed_3_6" -m "$W/q3-g32" --data "$DATA" --window 512 --max-tokens 8192 --device cpu \
  --reference "$W/tiny" --kl-reference "$W/tiny" \
  --json "$W/ppl.json" --markdown "$W/ppl.md" --plot "$W/ppl.png"
