#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (under 5 minutes on one GPU):
#   0. mpirun -np 2 on the one GPU (two ranks sharing the device): the digits MLP on CUDA for a few
#      steps, float32 with the defaults and bf16 with quantizer="none"; every rank must end with
#      the same weights (tests/mpi/train_ranks.py --device cuda). First, because it is the whole
#      step on the device (CUDA groups, fused kernels, decode of received payloads, DLPack);
#   1. the GPU tests on the device itself (HVD_QADAM_TEST_CUPY=device: CuPy must see the GPU;
#      without one the same tests run through the CuPy stand-in, on the CPU): bit-identity of
#      every CUDA kernel, fused ones included, with the numba path; the CUDA source under nvcc
#      and NVRTC; DLPack hand-offs of CUDA tensors;
#   2. the CUDA kernels' throughput against the device's own copy bandwidth on 10M elements
#      (bench/bench_gpu_fused.py: encode, fused error-feedback encode, decode, one-pass mean);
#   3. kernel throughput for every quantizer (bench/bench_kernels.py --backend cupy);
#   4. the single-rank step on CUDA parameters against torch's own Adam step (bench/bench_step.py).
# Without a GPU it says so and exits 0. Results go to results/gpu/.
#   bash scripts/gpu_check.sh             # the check
#   bash scripts/gpu_check.sh --dry-run   # print each step's command, run nothing
#   bash scripts/gpu_check.sh --rehearse  # step 0 on the CPU (no GPU needed): the launch and the checks
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mode="${1:-check}"
case "$mode" in check|--dry-run|--rehearse) ;; *) echo "usage: $0 [--dry-run|--rehearse]" >&2; exit 2 ;; esac
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
MPIRUN=(mpirun -np 2 --oversubscribe -x PYTHONPATH)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)

run() {   # run (or, dry, print) one command
  if [ "$mode" = --dry-run ]; then printf '  %q' "$@"; echo; return 0; fi
  "$@"
}

# Step 0: two ranks on one device; the check reads the digests every rank saved.
two_ranks() {   # device label
  local device="$1" status=0 name dtype kwargs out
  for spec in "float32:{}" 'bfloat16:{"quantizer": "none"}'; do
    dtype="${spec%%:*}"; kwargs="${spec#*:}"; out="results/gpu/np2_${device}_${dtype}.pt"
    echo "-- $dtype, kwargs $kwargs"
    run timeout 180 "${MPIRUN[@]}" "$PY" tests/mpi/train_ranks.py --device "$device" --dtype "$dtype" \
      --steps 8 --kwargs "$kwargs" --out "$out" || { status=1; continue; }
    run "$PY" - "$out" "$dtype" <<'PY' || status=1
import sys, torch
res = torch.load(sys.argv[1])
dtypes = {str(p.dtype) for p in res["params"].values()}
ok = res["size"] == 2 and len(set(res["digests"])) == 1 and dtypes == {"torch." + sys.argv[2]}
print(f"   ranks {res['size']}, identical weights: {len(set(res['digests'])) == 1}, dtypes {sorted(dtypes)}, "
      f"last-epoch loss {res['loss']:.4f}, bytes sent per rank and step {[s['sent_bytes'] for s in res['stats']]}")
sys.exit(0 if ok else 1)
PY
  done
  return $status
}

[ "$mode" = --dry-run ] || mkdir -p results/gpu
if [ "$mode" = --rehearse ]; then
  echo "== 0 (rehearsal on the CPU). mpirun -np 2, replicas identical"
  two_ranks cpu; exit $?
fi
if [ "$mode" != --dry-run ] && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu_check: no NVIDIA GPU on this machine; nothing to check"
  exit 0
fi
if [ "$mode" != --dry-run ]; then
  nvidia-smi -L
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: a GPU is present but this torch build has no CUDA; install a CUDA torch first"
    exit 1
  fi
  "$PY" -c "import cupy" 2>/dev/null || "$PY" -m pip install -q cupy-cuda12x
fi
status=0
echo "== 0. mpirun -np 2 on one GPU (two ranks share the device), replicas identical"
if [ "$mode" = --dry-run ] || { command -v mpirun >/dev/null 2>&1 && "$PY" -c "import horovod.torch, mpi4py" 2>/dev/null; }; then
  two_ranks cuda || status=1
else
  echo "gpu_check: step 0 needs mpirun, Horovod and mpi4py (scripts/install.sh); skipped"; status=1
fi
echo "== 1. GPU tests on the device"
run env HVD_QADAM_TEST_CUPY=device timeout 240 "$PY" -m pytest tests -q -x -rs \
  -k "gpu or cupy or cuda or nvcc or host or device" 2>&1 | tee results/gpu/tests.txt
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== 2. CUDA kernels against the device copy bandwidth (10M elements)"
run timeout 90 "$PY" bench/bench_gpu_fused.py --numel 10000000 --json results/gpu/fused.json || status=1
echo "== 3. kernel throughput (CuPy)"
run timeout 90 "$PY" bench/bench_kernels.py --backend cupy --quick --no-cold-compile \
  --json results/gpu/kernels.json || status=1
echo "== 4. single-rank step on CUDA parameters"
run timeout 90 "$PY" bench/bench_step.py --device cuda --steps 10 --json results/gpu/step.json || status=1
exit $status
