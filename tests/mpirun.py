"""Launch a test program on real MPI ranks (Open MPI, oversubscribed, as root if need be)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def mpirun_available() -> bool:
    return shutil.which("mpirun") is not None


def run_mpi(np_: int, script: str, *args: str, timeout: float = 180, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python tests/mpi/<script> args`` on ``np_`` ranks; a failing rank fails the launch."""
    if not mpirun_available():
        pytest.skip("mpirun not installed (run scripts/install.sh)")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_), "-bind-to", "none",
           "-mca", "btl", "self,tcp", "-mca", "btl_tcp_if_include", "lo",
           "-mca", "oob_tcp_if_include", "lo",
           sys.executable, os.path.join(HERE, "mpi", script), *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HOROVOD_LOG_LEVEL="warning")
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpirun -np {np_} {script} failed with code {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc
