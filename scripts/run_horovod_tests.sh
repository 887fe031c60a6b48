#!/usr/bin/env bash
# Horovod's own DistributedOptimizer tests against hvd_qadam.
#
# Takes test/parallel/test_torch.py (and the test/utils/common.py it imports) of Horovod 0.28.1,
# and runs each of its 16 DistributedOptimizer tests on 2 MPI ranks (one mpirun per test, so a hang
# or a one-sided failure cannot leak into the next test), twice:
#   horovod    Horovod's hvd.DistributedOptimizer, as released;
#   hvd_qadam  hvd.DistributedOptimizer replaced, before the test module is imported, by
#              hvd_qadam.DistributedOptimizer(..., quantizer="none") with Horovod's arguments passed
#              on unchanged (pytest plugin tests/horovod_compat/hvd_qadam_swap.py; Horovod's file is
#              not modified). HVD_QADAM_SWAP_KWARGS='{"quantizer": "qsgd", "bits": 8}' tries others.
# and prints a table (pass / fail / skip / timeout per test and implementation) with the reason of
# every failure.
#
# Both runs load tests/horovod_compat/torch_compat.py: the optimizer tests enumerate
# torch.optim.Optimizer.__subclasses__(), and torch >= 2.9's Muon (2-D parameters only) makes three of
# them fail for Horovod itself; the shim leaves Muon out (HVD_COMPAT_TORCH_SHIM=0: keep it).
#
#   bash scripts/run_horovod_tests.sh [both|horovod|hvd_qadam] [test_name ...]
#
# Where the test files come from: Horovod's sdist on PyPI does not ship test/ (horovod-0.28.1.tar.gz
# holds horovod/, cmake/, third_party/, setup.py only), so they are taken, in this order, from
#   1. $HOROVOD_SRC: a Horovod git clone (tag v0.28.1 is read with git show) or an unpacked v0.28.1
#      source tree, for offline machines;
#   2. the cache ${HVD_QADAM_CACHE:-~/.cache/hvd_qadam}/horovod-0.28.1-tests/;
#   3. GitHub (raw.githubusercontent.com/horovod/horovod/v0.28.1/...).
# Whatever the source, both files must match the SHA-256 of the v0.28.1 tag pinned below.
#
# Environment: HVD_COMPAT_NP (ranks, 2), HVD_COMPAT_TIMEOUT (seconds per test, 120),
# HVD_COMPAT_WORKDIR (keep logs and junit XML there; default a temporary directory).
# Needs mpirun, Horovod 0.28.1 with PyTorch + MPI, pytest and pytest-timeout (scripts/install.sh).
# Exit status 0 when every test that passes with Horovod also passes with hvd_qadam.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="${1:-both}"
[ $# -gt 0 ] && shift
case "$mode" in both|horovod|hvd_qadam) ;; *) echo "usage: $0 [both|horovod|hvd_qadam] [test ...]" >&2; exit 2;; esac

HVD_TAG=v0.28.1
declare -A SHA256=(
  [test/parallel/test_torch.py]=8af114f63fb7a87271322ad2da2c7050c3a9028570e45e8c44e9b1b4cac8db3a
  [test/utils/common.py]=9844d1041c1e26b34657273608a51a19a94c18e0c22f9aa7971ae78189119290
)
# Every test of TorchTests that builds a DistributedOptimizer (test_broadcast_state_gpu reruns
# test_broadcast_state; it, test_model_parallelism and test_delta_optimizer need GPUs and skip here).
ALL_TESTS=(test_broadcast_state test_broadcast_state_gpu test_broadcast_state_options
  test_broadcast_state_no_grad test_force_allreduce test_model_parallelism test_delta_optimizer
  test_duplicate_names test_dynamic_requires_grad test_gradient_clipping
  test_synchronize_step_warning test_no_named_parameters test_missing_named_parameters
  test_optimizer_no_named_parameters test_sparse_embeddings test_optimizer_process_sets)
if [ $# -gt 0 ]; then TESTS=("$@"); else TESTS=("${ALL_TESTS[@]}"); fi

NP="${HVD_COMPAT_NP:-2}"
TIMEOUT="${HVD_COMPAT_TIMEOUT:-120}"
cache="${HVD_QADAM_CACHE:-$HOME/.cache/hvd_qadam}/horovod-0.28.1-tests"
if [ -n "${HVD_COMPAT_WORKDIR:-}" ]; then
  work="$HVD_COMPAT_WORKDIR"; mkdir -p "$work"
else
  work="$(mktemp -d -t hvd_compat.XXXXXX)"
fi
log() { echo "[horovod-tests] $*"; }

for tool in mpirun python3; do
  command -v "$tool" >/dev/null || { echo "$tool not found: run scripts/install.sh" >&2; exit 1; }
done
python3 - <<'PY' || { echo "needs horovod.torch 0.28.1, pytest and pytest-timeout (scripts/install.sh)" >&2; exit 1; }
import horovod, horovod.torch, pytest, pytest_timeout  # noqa: F401
assert horovod.__version__ == "0.28.1", horovod.__version__
PY
if command -v horovodrun >/dev/null; then
  log "horovodrun --check-build: $(horovodrun --check-build | sed -n '/Controllers/,/^$/p' | tr -s ' \n' ' ')"
fi

# ------------------------------------------------------------------ the test files, verified
verify() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
src="$work/horovod-$HVD_TAG"
mkdir -p "$src/test/parallel" "$src/test/utils"
for f in "${!SHA256[@]}"; do
  dst="$src/$f"; sum="${SHA256[$f]}"
  verify "$dst" "$sum" && continue
  got=""
  if [ -n "${HOROVOD_SRC:-}" ]; then
    if git --git-dir="$HOROVOD_SRC" rev-parse -q --verify "$HVD_TAG^{commit}" >/dev/null 2>&1; then
      git --git-dir="$HOROVOD_SRC" show "$HVD_TAG:$f" > "$dst"
    elif git -C "$HOROVOD_SRC" rev-parse -q --verify "$HVD_TAG^{commit}" >/dev/null 2>&1; then
      git -C "$HOROVOD_SRC" show "$HVD_TAG:$f" > "$dst"
    elif [ -f "$HOROVOD_SRC/$f" ]; then
      cp "$HOROVOD_SRC/$f" "$dst"
    fi
    verify "$dst" "$sum" && got="HOROVOD_SRC"
  fi
  if [ -z "$got" ] && verify "$cache/$f" "$sum"; then
    cp "$cache/$f" "$dst"; got="cache"
  fi
  if [ -z "$got" ]; then
    url="https://raw.githubusercontent.com/horovod/horovod/$HVD_TAG/$f"
    if curl -fsSL --retry 3 --max-time 120 -o "$dst.part" "$url" && mv "$dst.part" "$dst" && verify "$dst" "$sum"; then
      got="$url"
    fi
  fi
  if [ -z "$got" ]; then
    echo "could not get Horovod $HVD_TAG's $f with SHA-256 $sum" >&2
    echo "(no network to GitHub? set HOROVOD_SRC to a clone: git clone https://github.com/horovod/horovod)" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$cache/$f")" && cp "$dst" "$cache/$f" 2>/dev/null || true
  log "$f ($HVD_TAG) from $got"
done
# common.py imports the `mock` backport; the standard library's unittest.mock is the same API.
if ! python3 -c "import mock" 2>/dev/null; then
  printf 'from unittest.mock import *  # noqa: F401,F403  (stand-in for the mock backport)\n' \
    > "$src/test/utils/mock.py"
fi
# The list above must cover every test that mentions DistributedOptimizer.
python3 - "$src/test/parallel/test_torch.py" "${ALL_TESTS[@]}" <<'PY'
import ast, sys
path, listed = sys.argv[1], set(sys.argv[2:])
source = open(path).read()
cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TorchTests")
names = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
using = {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
         and "DistributedOptimizer" in ast.get_source_segment(source, f)}
assert listed <= names, f"not in test_torch.py: {sorted(listed - names)}"
assert using <= listed, f"DistributedOptimizer tests not listed: {sorted(using - listed)}"
PY

# ------------------------------------------------------------------ run
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1 HOROVOD_LOG_LEVEL="${HOROVOD_LOG_LEVEL:-warning}"
results="$work/results"
run_one() {  # impl test
  local impl="$1" t="$2" dir="$results/$1/$2" plugin=()
  local pypath="$here/tests/horovod_compat:$here${PYTHONPATH:+:$PYTHONPATH}"
  rm -rf "$dir"; mkdir -p "$dir"
  [ "${HVD_COMPAT_TORCH_SHIM:-1}" = 1 ] && plugin+=(-p torch_compat)
  [ "$impl" = hvd_qadam ] && plugin+=(-p hvd_qadam_swap)
  local rc=0 t0=$SECONDS
  PYTHONPATH="$pypath" timeout -k 15 $((TIMEOUT + 90)) \
    mpirun --allow-run-as-root --oversubscribe -np "$NP" -bind-to none \
      -mca btl self,tcp -mca btl_tcp_if_include lo -mca oob_tcp_if_include lo \
      bash -c 'r="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}"; cd "$1" && shift && d="$1" && shift &&
               exec python3 -m pytest "$@" --junitxml="$d/rank$r.xml" > "$d/rank$r.log" 2>&1' \
      _ "$src/test/parallel" "$dir" -q -rA -p no:cacheprovider "${plugin[@]}" \
      --rootdir="$src/test/parallel" --timeout="$TIMEOUT" --timeout-method=thread \
      "test_torch.py::TorchTests::$t" \
    > "$dir/mpirun.log" 2>&1 || rc=$?
  echo "$rc" > "$dir/rc"
  log "$(printf '%-10s %-36s rc=%-3s %4ss' "$impl" "$t" "$rc" $((SECONDS - t0)))"
}
impls=(horovod hvd_qadam)
[ "$mode" != both ] && impls=("$mode")
log "Horovod $HVD_TAG test_torch.py, ${#TESTS[@]} tests x ${impls[*]}, $NP ranks, ${TIMEOUT}s per test; logs in $work"
for impl in "${impls[@]}"; do
  for t in "${TESTS[@]}"; do run_one "$impl" "$t"; done
done
echo
python3 "$here/tests/horovod_compat/summarize.py" "$results" --json "$work/summary.json"
log "logs, junit XML and summary.json in $work"
if [ "$mode" = both ]; then
  python3 - "$work/summary.json" <<'PY'
import json, sys
table = json.load(open(sys.argv[1]))
bad = [t for t, row in table.items()
       if row["horovod"]["outcome"] == "pass" and row["hvd_qadam"]["outcome"] != "pass"]
print(f"{len(bad)} test(s) pass with Horovod but not with hvd_qadam" + (": " + ", ".join(bad) if bad else ""))
sys.exit(1 if bad else 0)
PY
fi
