#!/usr/bin/env bash
# numcast's GPU checks in one run, for a machine with a CUDA device and its own PyTorch (python3):
#   1. tests/formats/test_cuda.py: every format, every backend on the GPU bit-identical to the CPU;
#   2. benchmarks/formats.py --device cuda: the formats bench at 16384x16384 (1 GiB of float32), each cast
#      checked against the CPU's bits, timed by CUDA events, as a multiple of a copy and in GB/s.
# Run from the repository root:  bash scripts/device_check.sh [OUT_DIR]   (default: $OUT, else out/device)
# Python packages the machine lacks can lie as wheels in .whl/ (pydantic and its needs); they are installed
# into /tmp/site first. Each step has its own time limit, so a slow one cannot take the others' results with it.
set -uo pipefail
out=${1:-${OUT:-out/device}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
python3 -c "from numcast.formats.fused import exact_on_cuda; print('inductor eager_numerics switches:', exact_on_cuda())" | tee -a "$out/gpu.txt"
status=0
workers=$(python3 -c "import xdist" 2> /dev/null && echo "-n 16")
timeout 240 python3 -m pytest -q $workers -p no:cacheprovider -p no:logging tests/formats/test_cuda.py 2>&1 \
    | tee "$out/test_cuda.log" | tail -25 || { echo "step failed: rc ${PIPESTATUS[*]}"; status=1; }
timeout 240 python3 benchmarks/formats.py --device cuda --size 16384 --rounds 2 --repeat 3 --json "$out/formats_cuda.json" 2>&1 \
    | tee "$out/formats_cuda.log" || { echo "step failed: rc ${PIPESTATUS[*]}"; status=1; }
exit $status
