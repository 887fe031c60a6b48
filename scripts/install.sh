#!/usr/bin/env bash
# Idempotent setup for hvd_qadam on a fresh Debian machine (run as root, or with sudo for apt).
#   * Open MPI from Debian, torch 2.13.0 (CPU build), numpy/numba/mpi4py and friends from PyPI
#   * Horovod 0.28.1 built from its sdist with the C++17 / gcc-13 fixes; the wheel is cached
#     outside the checkout (HVD_QADAM_CACHE, default ~/.cache/hvd_qadam) so later runs reuse it
#   * hvd_qadam itself (editable install of this checkout)
# Set HVD_QADAM_WITH_CUPY=1 to add cupy (GPU machines only; never needed on CPU).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
CACHE="${HVD_QADAM_CACHE:-$HOME/.cache/hvd_qadam}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
log() { printf '[install] %s\n' "$*" >&2; }
# This script is meant to run as root (README); pip's warning about that is noise here.
export PIP_ROOT_USER_ACTION="${PIP_ROOT_USER_ACTION:-ignore}"

# --- system packages -------------------------------------------------------------------------
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
  log "installing Open MPI (Debian packages)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends libopenmpi-dev openmpi-bin cmake g++ make
fi

# --- python packages -------------------------------------------------------------------------
# Python checks run from a neutral directory: `python -c` puts the current directory first on
# sys.path, so from the checkout `import hvd_qadam` finds the source tree even when nothing is installed.
py_here() { ( cd / && "$PY" "$@" ); }
have() { py_here -c "import $1" >/dev/null 2>&1; }
if ! py_here -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" >/dev/null 2>&1; then
  log "installing torch==$TORCH_VERSION (CPU build)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
# torchvision for Horovod's own examples (bench/horovod_examples.py): the release made for this
# torch, without its dependencies so that torch's CPU build stays. PyPI's wheel is built against
# torch's CUDA build, so its C++ ops (detection only) do not load here; the examples use none of them.
TORCHVISION_VERSION=0.28.0
if ! py_here -c "import importlib.metadata as m, sys; sys.exit(m.version('torchvision') != '$TORCHVISION_VERSION')" >/dev/null 2>&1; then
  log "installing torchvision==$TORCHVISION_VERSION (no dependencies: keeps torch $TORCH_VERSION)"
  "$PY" -m pip install -q --no-deps "torchvision==$TORCHVISION_VERSION"
fi
need=()
for mod in numpy:numpy scipy:scipy numba:numba mpi4py:mpi4py sklearn:scikit-learn tqdm:tqdm \
           matplotlib:matplotlib pytest:pytest pytest_timeout:pytest-timeout psutil:psutil \
           cloudpickle:cloudpickle yaml:pyyaml packaging:packaging wheel:wheel PIL:pillow filelock:filelock \
           tensorboard:tensorboard; do
  have "${mod%%:*}" || need+=("${mod##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  "$PY" -m pip install -q "${need[@]}"
fi

# NVRTC, CuPy's run-time compiler: a test compiles the CUDA source with it as CuPy would (no GPU
# needed). 13.0.88 is the CUDA 13.0 of the image's nvcc; NVRTC emits PTX, so no ptxas is involved.
if ! py_here -c "import glob, nvidia, sys; sys.exit(not any(glob.glob(p + '/*/lib/libnvrtc.so.*') for p in nvidia.__path__))" >/dev/null 2>&1; then
  log "installing nvidia-cuda-nvrtc"
  "$PY" -m pip install -q "nvidia-cuda-nvrtc==13.0.88"
fi

# --- Horovod 0.28.1 with PyTorch, MPI and Gloo (horovodrun --gloo, elastic) ------------------------------------------------------------
horovod_ok() {
  py_here - <<'PYEOF' >/dev/null 2>&1
import horovod, horovod.torch as hvd
assert horovod.__version__ == "0.28.1" and hvd.mpi_built() and hvd.gloo_built()
PYEOF
}
if ! horovod_ok; then
  mkdir -p "$CACHE/wheels/gloo"
  # Gloo builds live in wheels/gloo, so a cached MPI-only wheel from an older install is not reused.
  whl=$(ls "$CACHE"/wheels/gloo/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    log "building Horovod $HOROVOD_VERSION with MPI and Gloo (one-off, a few minutes; cached in $CACHE/wheels/gloo)"
    build="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
    tar -xzf "$build"/horovod-$HOROVOD_VERSION.tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers need C++17; Horovod 0.28.1 asks for C++14.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    # gcc >= 13 no longer pulls these headers in transitively.
    grep -q '#include <stdexcept>' "$src/horovod/common/common.h" || sed -i '0,/#include <string>/s//#include <stdexcept>\n#include <string>/' "$src/horovod/common/common.h"
    grep -q '#include <string>' "$src/horovod/common/group_table.h" || sed -i '0,/#include <vector>/s//#include <string>\n#include <vector>/' "$src/horovod/common/group_table.h"
    ( cd "$src" && \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_NVTX=1 MAKEFLAGS="-j$(nproc)" \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$CACHE/wheels/gloo" . )
    rm -rf "$build"
    whl=$(ls "$CACHE"/wheels/gloo/horovod-$HOROVOD_VERSION-*.whl | head -n1)
  fi
  log "installing $(basename "$whl")"
  "$PY" -m pip install -q --force-reinstall --no-deps "$whl"
  horovod_ok || { log "Horovod import check failed"; exit 1; }
fi

# --- optional GPU support ----------------------------------------------------------------------
if [ "${HVD_QADAM_WITH_CUPY:-0}" = "1" ] && ! have cupy; then
  log "installing cupy"
  "$PY" -m pip install -q cupy-cuda12x
fi

# --- hvd_qadam itself ----------------------------------------------------------------------------
# Installed means: pip knows the distribution and, imported from outside the checkout (as
# `mpirun ... python examples/train_digits.py` does), the package is this checkout's source tree.
installed_here() {
  py_here -E - "$here" <<'PYEOF'
import importlib.metadata as md
import importlib.util
import os
import sys

here = os.path.realpath(sys.argv[1])
try:
    md.distribution("hvd_qadam")
except md.PackageNotFoundError:
    sys.exit("hvd_qadam is not installed")
spec = importlib.util.find_spec("hvd_qadam")
origin = os.path.realpath(spec.origin) if spec is not None and spec.origin else None
if origin != os.path.join(here, "hvd_qadam", "__init__.py"):
    sys.exit(f"the installed hvd_qadam is {origin}, not this checkout's")
PYEOF
}
if ! why=$(installed_here 2>&1); then
  log "${why##*$'\n'}: installing hvd_qadam (editable) from this checkout"
  py_here -m pip install -q --no-build-isolation --no-deps -e "$here"
  why=$(installed_here 2>&1) || { log "hvd_qadam install check failed: $why"; exit 1; }
fi
# --- compile the CPU kernels once (numba caches them on disk) ----------------------------------
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$CACHE/numba}"
py_here -c "from hvd_qadam.warmup import compile_kernels; print(f'[install] CPU kernels ready ({compile_kernels():.1f} s)')" >&2
log "ready"
