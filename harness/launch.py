"""Launching programs on real ranks of this host: ``mpirun`` (Open MPI), ``horovodrun --gloo`` and
``horovodrun`` elastic with a host-discovery script whose answer the caller changes mid-run.

Shared by the tests (tests/conftest.py, tests/test_elastic.py, tests/test_horovod_examples.py) and
bench/horovod_examples.py. Every job runs in a process group of its own, so a job that overruns its
time limit is ended whole (launcher and every rank), not only the launcher.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Open MPI on one host: as root, more ranks than cores, no binding, TCP over loopback only.
MPIRUN_LOCAL = ["--allow-run-as-root", "--oversubscribe", "-bind-to", "none", "-mca", "btl", "self,tcp",
                "-mca", "btl_tcp_if_include", "lo", "-mca", "oob_tcp_if_include", "lo"]
# horovodrun on one host: without --network-interface lo, elastic mode waits for a second host.
HOROVODRUN_LOCAL = ["--network-interface", "lo"]
# Elastic jobs: how long the driver waits for enough slots.
ELASTIC_LOCAL = ["--elastic-timeout", "60"]


class JobTimeout(AssertionError):
    """A launched job ran past its time limit (it was ended, every rank with it)."""


def job_env(extra: dict | None = None) -> dict:
    """The environment of a launched job: this checkout first on PYTHONPATH (its hvd_qadam is
    imported, not an installed one), unbuffered output, one thread per rank, Horovod's warnings only."""
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HOROVOD_LOG_LEVEL="warning",
               PYTHONPATH=os.pathsep.join(path))
    env.update(extra or {})
    return env


def mpirun_missing() -> str | None:
    """Why ``mpirun`` jobs cannot run here, or None."""
    return None if shutil.which("mpirun") else "mpirun not installed (run scripts/install.sh)"


def horovodrun_gloo_missing() -> str | None:
    """Why ``horovodrun --gloo`` / elastic jobs cannot run here, or None."""
    if shutil.which("horovodrun") is None:
        return "horovodrun not installed (run scripts/install.sh)"
    try:
        import horovod.torch as hvd
    except ImportError:
        return "horovod.torch not importable (run scripts/install.sh)"
    if not hvd.gloo_built():
        return "Horovod built without Gloo (scripts/install.sh builds it with HOROVOD_WITH_GLOO=1)"
    return None


def mpirun_command(np_: int, *command: str) -> list:
    return ["mpirun", *MPIRUN_LOCAL, "-np", str(np_), *command]


def horovodrun_gloo_command(np_: int, *command: str) -> list:
    return ["horovodrun", "-np", str(np_), "--gloo", *HOROVODRUN_LOCAL, *command]


class ElasticHosts:
    """A host-discovery script for ``horovodrun`` elastic that prints a file the caller rewrites
    (``set("localhost:3")`` grows the job by a slot on this host at Horovod's next discovery poll)."""

    def __init__(self, folder, name: str, hosts: str = "localhost:2"):
        self.slots = os.path.join(str(folder), f"{name}.slots")
        self.script = os.path.join(str(folder), f"{name}.discover.sh")
        self.set(hosts)
        with open(self.script, "w") as f:
            f.write(f"#!/bin/sh\ncat '{self.slots}'\n")
        os.chmod(self.script, 0o755)

    def set(self, hosts: str) -> None:
        """The hosts the discovery script prints from now on (``host:slots`` per line)."""
        tmp = self.slots + ".tmp"
        with open(tmp, "w") as f:
            f.write(hosts.strip() + "\n")
        os.replace(tmp, self.slots)       # the script never reads a half-written file

    def command(self, np_: int, min_np: int, max_np: int, *command: str, gloo_timeout: float = 10) -> list:
        """``gloo_timeout``: how long Gloo waits for a peer, at a rendezvous (a rank that joins
        must have started by then) and in a collective (a rank that died is noticed by then)."""
        return ["horovodrun", "-np", str(np_), "--min-np", str(min_np), "--max-np", str(max_np),
                "--host-discovery-script", self.script, *HOROVODRUN_LOCAL, *ELASTIC_LOCAL,
                "--gloo-timeout-seconds", str(int(gloo_timeout)), *command]


def _end_group(proc: subprocess.Popen) -> None:
    """Stop a job started in its own process group: the launcher and every rank it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(cmd: list, timeout: float, env: dict | None = None, cwd: str | None = None,
            on_line=None) -> subprocess.CompletedProcess:
    """Run a launcher command to its end; stdout and stderr are collected (stderr merged into
    stdout when ``on_line`` is given: ``on_line(line)`` then sees every line as it arrives, e.g. to
    resize an elastic job at a point of its progress). Raises JobTimeout, with the output so far,
    when the job outlives ``timeout`` seconds (it is ended whole first)."""
    merged = on_line is not None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                            text=True, env=env if env is not None else job_env(), cwd=cwd, start_new_session=True)
    if not merged:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            out, err = proc.communicate()
            raise JobTimeout(f"{' '.join(map(str, cmd[:4]))} ... ran past {timeout:.0f} s\n"
                             f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            on_line(line.rstrip("\n"))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        _end_group(proc)
        reader.join(10)
        raise JobTimeout(f"{' '.join(map(str, cmd[:4]))} ... ran past {timeout:.0f} s\n{''.join(lines)[-8000:]}")
    reader.join(30)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), "")


def python_command(script: str, *args: str) -> list:
    return [sys.executable, script, *args]
