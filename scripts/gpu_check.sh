#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (under 5 minutes on one GPU):
#   1. the GPU tests on the device itself (HVD_QADAM_TEST_CUPY=device: CuPy must see the GPU;
#      without one the same tests run through the CuPy stand-in, on the CPU): bit-identity of
#      every CUDA kernel, fused ones included, with the numba path; the CUDA source under nvcc
#      and NVRTC; DLPack hand-offs of CUDA tensors;
#   2. the CUDA kernels' throughput against the device's own copy bandwidth on 10M elements
#      (scripts/bench_gpu_fused.py: encode, fused error-feedback encode, decode, one-pass mean);
#   3. kernel throughput for every quantizer (scripts/bench_kernels.py --backend cupy);
#   4. the single-rank step on CUDA parameters against torch's own Adam step (scripts/bench_step.py).
# Without a GPU it says so and exits 0. Results go to results/gpu/.
#   bash scripts/gpu_check.sh
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$here"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine; nothing to check"
  exit 0
fi
nvidia-smi -L
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: a GPU is present but this torch build has no CUDA; install a CUDA torch first"
  exit 1
fi
"$PY" -c "import cupy" 2>/dev/null || "$PY" -m pip install -q cupy-cuda12x
"$PY" -c "import hvd_qadam" 2>/dev/null || "$PY" -m pip install -q --no-build-isolation --no-deps -e "$here"
mkdir -p results/gpu
status=0
echo "== 1. GPU tests on the device"
HVD_QADAM_TEST_CUPY=device timeout 240 "$PY" -m pytest tests -q -x -rs \
  -k "gpu or cupy or cuda or nvcc or host or device" 2>&1 | tee results/gpu/tests.txt
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== 2. CUDA kernels against the device copy bandwidth (10M elements)"
timeout 90 "$PY" scripts/bench_gpu_fused.py --numel 10000000 --json results/gpu/fused.json || status=1
echo "== 3. kernel throughput (CuPy)"
timeout 90 "$PY" scripts/bench_kernels.py --backend cupy --quick --no-cold-compile --json results/gpu/kernels.json \
  || status=1
echo "== 4. single-rank step on CUDA parameters"
timeout 90 "$PY" scripts/bench_step.py --device cuda --steps 10 --json results/gpu/step.json || status=1
exit $status
