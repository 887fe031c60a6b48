#!/usr/bin/env bash
# Set everything up if needed (scripts/install.sh), then run the main job: 3 MPI ranks train an MLP on
# scikit-learn's digits, uncompressed and with the defaults (6-bit max-abs QSGD + error feedback),
# and compare.
#   bash scripts/demo.sh [train_digits.py options, e.g. --algorithm efficient_adam --bits 2]
#   bash scripts/demo.sh --epochs 2      # a short run (CI runs this)
# Only rank 0 writes: a progress bar when this script's stdout and stderr are a terminal, plain
# per-epoch lines otherwise (HVD_QADAM_PROGRESS=bar|lines|none overrides).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
bash "$here/scripts/install.sh"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${HVD_QADAM_CACHE:-$HOME/.cache/hvd_qadam}/numba}"
NP="${NP:-3}"
# Under mpirun a rank's stdout is a pseudo-terminal and its stderr a pipe, whatever this script's
# own are: decide here whether a terminal is watching.
if [ -z "${HVD_QADAM_PROGRESS:-}" ]; then
  if [ -t 1 ] && [ -t 2 ]; then HVD_QADAM_PROGRESS=bar; else HVD_QADAM_PROGRESS=lines; fi
fi
export HVD_QADAM_PROGRESS
# The bar's width: a rank's stderr is a pipe, so pass the terminal's on.
if [ -z "${COLUMNS:-}" ] && [ -t 2 ]; then
  COLUMNS="$(stty size <&2 2>/dev/null | cut -d' ' -f2 || true)"
fi
export COLUMNS="${COLUMNS:-0}"
# --oversubscribe: this may be a machine with fewer cores than ranks. The ranks read no input.
exec mpirun --allow-run-as-root --oversubscribe -np "$NP" -bind-to none -map-by slot \
     -x NUMBA_CACHE_DIR -x PYTHONUNBUFFERED=1 -x HVD_QADAM_PROGRESS -x COLUMNS \
     "$PY" "$here/examples/train_digits.py" "$@" </dev/null
