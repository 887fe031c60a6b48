#!/usr/bin/env bash
# Set everything up if needed (scripts/install.sh), then run the main job: 3 MPI ranks train an MLP on
# scikit-learn's digits, uncompressed and with 4-bit QSGD + error feedback, and compare.
#   bash scripts/demo.sh [train_digits.py options, e.g. --algorithm efficient_adam --bits 2]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/install.sh"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${HVD_QADAM_CACHE:-$HOME/.cache/hvd_qadam}/numba}"
NP="${NP:-3}"
# --oversubscribe: this may be a machine with fewer cores than ranks.
exec mpirun --allow-run-as-root --oversubscribe -np "$NP" -bind-to none -map-by slot \
     -x NUMBA_CACHE_DIR -x PYTHONUNBUFFERED=1 \
     python3 "$here/scripts/train_digits.py" "$@"
