#!/usr/bin/env bash
# Set everything up if needed (scripts/install.sh), then run the whole test suite.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/install.sh"
cd "$here"
# Cache numba's compiled kernels next to the checkout's user cache, not inside it.
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${HVD_QADAM_CACHE:-$HOME/.cache/hvd_qadam}/numba}"
exec python3 -m pytest tests -q -ra --timeout=900 "$@"
