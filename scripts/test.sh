#!/usr/bin/env bash
# The test command (README, and what .ci/run calls): a local venv with the CPU build of torch pinned,
# ossq with its test extras (transformers, mlx[cpu], mlx-lm: oracles only; triton for its CPU
# interpreter; ruff), then the linter and formatter checks, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OSSQ_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0            # the CPU build; a bare "torch" pulls several GB of CUDA
"$VENV/bin/pip" install -q -e '.[test]'
"$VENV/bin/ruff" check ossq tests benchmarks
"$VENV/bin/ruff" format --check ossq tests benchmarks
exec "$VENV/bin/python" -m pytest "$@"
