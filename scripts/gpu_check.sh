#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, TorchServe on the GPU (when Java is there), and the GPU benchmark
# (fp32, bf16, fp16; the service end to end when Java is there). Usage: bash scripts/gpu_check.sh [OUT_DIR]
# Uses the python3 on PATH, which must have torch with CUDA and this project's requirements.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The project as a package (camserve, camtools) without installing it into that python.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cam.py 2>&1 | tee "$out/pytest_cuda.log"
server=(--no-server)
if command -v java >/dev/null 2>&1; then
  python3 -m pytest -q -p no:cacheprovider tests/test_integration.py \
    -k "raw_body or multipart or json_body or concurrent_distinct or one_bad_request or every_method" 2>&1 |
    tee "$out/pytest_gpu_torchserve.log"
  server=(--concurrency 1,8,32,64 --requests 192 --soak 300 --server-batch-size 32 --batch-delays 2,10)
fi
python3 scripts/bench.py --device cuda:0 --batch-sizes 1,8,32 --repeats 20 --warmup 3 --agreement-images 32 \
  "${server[@]}" --out "$out" --stem bench_cuda 2>&1 | tee "$out/bench_cuda.log"
