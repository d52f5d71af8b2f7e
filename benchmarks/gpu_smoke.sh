#!/usr/bin/env bash
# `ossq ppl` and `ossq bench --sweep-context` on a GPU, on tiny synthetic models (results under $OUT):
#   bash benchmarks/gpu_smoke.sh
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" smoke-out
W=/tmp/ossq-smoke
ossq synth --preset tiny --out "$W/tiny"
ossq convert --hf-path "$W/tiny" --mlx-path "$W/tiny-q4" -q --q-bits 4 --experts quantize --device cuda
python3 - "$W/text.txt" <<'PY'
import argparse, json, sys, textwrap
open(sys.argv[1], "w").write("\n\n".join(m.__doc__ for m in (argparse, json, textwrap)))
PY
ossq generate -m "$W/tiny-q4" -p "Hello" --max-tokens 16 --device cuda
ossq ppl -m "$W/tiny" -m "$W/tiny-q4" --data "$W/text.txt" --window 128 --max-tokens 4096 --device cuda \
  --reference "$W/tiny" --kl-reference "$W/tiny" --markdown "$OUT/ppl-cuda.md" --json "$OUT/ppl-cuda.json"
ossq bench -m "$W/tiny" -m "$W/tiny-q4" --device cuda --prompt-tokens 64 --gen-tokens 32 --repeats 3 \
  --sweep-context 256,1k,4k --markdown "$OUT/bench-cuda.md" --json "$OUT/bench-cuda.json" --plot "$OUT/bench-cuda.png"
python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py tests/test_cache.py 2>&1 | tail -3
