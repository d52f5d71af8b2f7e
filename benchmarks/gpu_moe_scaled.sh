#!/usr/bin/env bash
# MXFP4 experts through tl.dot_scaled against the decode in registers, on the lent GPU machine, from the
# repo root:   bash benchmarks/gpu_moe_scaled.sh      (results under $OUT, or ./moe-scaled-out)
# The benchmark (moe_scaled.json and the tables in moe_scaled.txt), then the dot_scaled tests on CUDA
# (TESTS=0 skips them).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" moe-scaled-out
python3 benchmarks/moe_scaled.py --out "$OUT" 2>&1 | tee "$OUT/moe_scaled.txt"
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_moe.py -k "scaled or environment" 2>&1 | tail -5 |
    tee "$OUT/tests.txt"
fi
