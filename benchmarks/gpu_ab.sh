#!/usr/bin/env bash
# A/B of this tree against a base tree on the lent GPU machine, in one call, from this tree's root:
#   BASE=../.snapold bash benchmarks/gpu_ab.sh     (BASE: e.g. `git archive main`; results under $OUT, or ./ab-out)
# The CUDA tests of this tree run while a synthetic gpt-oss-20b is converted (MXFP4 experts + 4-bit g64 rest,
# and all-affine 4-bit g64); then `ossq bench` runs each checkpoint in the base tree and in this tree,
# alternating (and once more with NEW_FLAG, if set); then this tree's decode profile and its kernel sweep
# (KERNELS_ARGS, default the GEMV and MoE kernels at their default tiles). Everything lands in $OUT/ab.tgz
# (re-packed after each phase) and the log.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" ab-out
NEW=$PWD BASE=$(cd "${BASE:-../.snapold}" && pwd) W=${WORK:-/tmp/ossq-gpu} R=/tmp/ossq-ab
rm -rf "$R" && mkdir -p "$W" "$R"
pack() { tar -czf "$OUT/ab.tgz" -C "$(dirname "$R")" "$(basename "$R")"; }  # after each phase: a cut-off call still returns
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; date -u; git -C "$NEW" log -1 --oneline 2>/dev/null; } | tee "$R/machine.txt"
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -p no:hypothesispytest -n 12 -o addopts="" -rfE \
  tests/test_triton_ops.py tests/test_triton_moe.py tests/test_triton_prefill.py tests/test_engine.py >"$R/tests.txt" 2>&1 &
[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda >"$R/synth.txt" 2>&1
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda >"$R/convert-mxfp4-q4.txt" 2>&1 &
[ -e "$W/q4-g64" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/q4-g64" -q --q-bits 4 --experts quantize --device cuda >"$R/convert-q4-g64.txt" 2>&1 &
wait
grep -E "passed|failed|^FAILED|^ERROR" "$R/tests.txt" | tail -20
pack
bench() {  # tree name, tree, model, extra flags...
  local name=$1 tree=$2 model=$3; shift 3
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 60 python3 -m ossq.cli bench -m "$W/$model" --device cuda \
    --prompt-tokens 90 --gen-tokens 128 --repeats 3 --warmup 1 "$@" --json "$R/bench-$name-$model.json") >"$R/bench-$name-$model.txt" 2>&1
  echo "== $name $model rc=$?"; grep -A1 -E "generation|prompt|TTFT|peak" "$R/bench-$name-$model.txt" | head -12
  pack
}
bench base "$BASE" mxfp4-q4 --context 2k
bench new "$NEW" mxfp4-q4 --context 2k
bench base "$BASE" q4-g64
bench new "$NEW" q4-g64
bench base2 "$BASE" mxfp4-q4
bench new2 "$NEW" mxfp4-q4
[ -n "${NEW_FLAG:-}" ] && bench new-flag "$NEW" mxfp4-q4 $NEW_FLAG  # e.g. NEW_FLAG=--no-overlap: a switch's share
timeout 60 python3 benchmarks/profile_decode.py -m "$W/mxfp4-q4" --json "$R/profile-new.json" >"$R/profile-new.txt" 2>&1
head -40 "$R/profile-new.txt"
pack
timeout "${KERNELS_S:-100}" python3 benchmarks/kernels.py --out "$R/k" ${KERNELS_ARGS:---quick --only gemv moe} >"$R/kernels-new.txt" 2>&1
grep -E "^\|" "$R/kernels-new.txt" | head -90
pack
