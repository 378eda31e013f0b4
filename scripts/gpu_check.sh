#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, then the in-process benchmark on the GPU (fp32, bf16, fp16).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]. Uses the python3 on PATH, which must have torch with CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cam.py 2>&1 | tee "$out/pytest_cuda.log"
python3 scripts/bench.py --device cuda:0 --no-server --batch-sizes 1,8,32 --repeats 30 --warmup 5 \
  --agreement-images 32 --out "$out" --stem bench_cuda 2>&1 | tee "$out/bench_cuda.log"
