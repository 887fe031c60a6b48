#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (under 5 minutes on one GPU):
#   1. the CuPy kernel tests (bit-identity with the CPU path, CUDA source, device-resident decode),
#   2. kernel throughput on the GPU (scripts/bench_kernels.py --backend cupy),
#   3. the single-rank step on CUDA parameters against torch's own Adam step (scripts/bench_step.py).
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
echo "== 1. GPU kernel tests"
timeout 150 "$PY" -m pytest tests/test_kernels.py tests/test_fused.py -q -x -k "gpu or cupy or cuda or device" \
  || status=1
echo "== 2. kernel throughput (CuPy)"
timeout 90 "$PY" scripts/bench_kernels.py --backend cupy --quick --no-cold-compile --json results/gpu/kernels.json \
  || status=1
echo "== 3. single-rank step on CUDA parameters"
timeout 90 "$PY" scripts/bench_step.py --device cuda --steps 10 --json results/gpu/step.json || status=1
exit $status
