#!/usr/bin/env bash
# One command from a fresh machine to a running model: install ossq into .venv (CPU torch unless a torch
# is already there), synthesize a tiny gpt-oss, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OSSQ_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[plot]'
exec "$VENV/bin/ossq" quickstart "$@"
