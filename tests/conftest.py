"""Shared by the tests: the repository's root on sys.path (``from harness import digits``, ``lm``,
``launch``), the scripts of bench/ and studies/ loaded by path (``load_script``), launches of
test programs on real MPI ranks, digits training of N simulated ranks, and ``cupy``: CuPy on a
CUDA device, or else the CuPy stand-in of tests/cupy_standin that runs the CUDA kernels on the CPU.

Tests take the helpers as fixtures: ``def test_x(sim_train, assert_same_params): ...``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:    # appended: hvd_qadam is found where it was before
    sys.path.append(ROOT)

from harness import digits, launch  # noqa: E402

import hvd_qadam  # noqa: E402
from hvd_qadam import exchange as _exchange  # noqa: E402

# The library's default path, exchange="auto", is decided from wall-clock step times, so a run
# under it is not reproducible bit for bit. The suite's runs (simulated ranks, and ranks launched
# by a test, which inherit this) take the compressed path unless a test asks for another: the
# bit-for-bit MPI-vs-simulator, oracle and fault tests check the compressed exchange as they
# always did. The auto policy and the default itself have their own tests (test_exchange.py).
os.environ[_exchange.ENV] = _exchange.COMPRESSED



def load_script(path: str):
    """The script at ``path`` (from the repository's root, e.g. ``"studies/toy_convex.py"``) as a
    module: bench/, studies/ and examples/ are folders of scripts, not packages."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # before it runs: dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- real MPI ranks

def mpirun_available() -> bool:
    return launch.mpirun_missing() is None


def run_mpi(np_: int, script: str, *args: str, timeout: float = 180, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python tests/mpi/<script> args`` on ``np_`` ranks (Open MPI, oversubscribed, as root
    if need be; harness/launch.py); with ``check`` a failing rank fails the launch."""
    why = launch.mpirun_missing()
    if why:
        pytest.skip(why)
    cmd = launch.mpirun_command(np_, sys.executable, os.path.join(HERE, "mpi", script), *args)
    proc = launch.run_job(cmd, timeout, env=launch.job_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"mpirun -np {np_} {script} failed with code {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


# ----------------------------------------------------------------------------- simulated ranks

def sim_train(world_size: int, steps: int, base: str = "adam", dtype=torch.float32, local_size: int = 1,
              **kwargs) -> list:
    """Final {name: tensor} of every simulated rank after ``steps`` steps of digits training (model
    and inputs in ``dtype``) with ``hvd_qadam.DistributedOptimizer(digits.base_optimizer(model, base), **kwargs)``,
    ``local_size`` simulated ranks per host."""
    def worker(rank, comm):
        def make(m):
            return hvd_qadam.DistributedOptimizer(digits.base_optimizer(m, base), m.named_parameters(), comm=comm,
                                                  **kwargs)
        model, _ = digits.train(rank, comm.size, make, epochs=1000, max_steps=steps, dtype=dtype)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    return hvd_qadam.simulate(world_size, worker, local_size=local_size)


def sim_resume(world_size: int, tmp_path, steps: int, split: int | None, **kwargs) -> list:
    """Digits training of ``steps`` steps on simulated ranks with
    ``hvd_qadam.DistributedOptimizer(Adam, **kwargs)``, each rank on its own 10 samples per step.
    With ``split``, every rank saves model and optimizer state after ``split`` steps, rebuilds both
    from other weights, loads its checkpoint and goes on. Returns (params, optimizer) per rank."""
    def worker(rank, comm):
        x, y, _, _ = digits.load_digits_split()

        def build(seed):
            model = digits.make_model(seed=seed)
            return model, hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(),
                                                         comm=comm, **kwargs)

        def run(model, opt, start, stop):
            for s in range(start, stop):
                i = torch.arange(s * 30 + rank * 10, s * 30 + rank * 10 + 10) % len(x)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
        model, opt = build(0)
        if split is None:
            run(model, opt, 0, steps)
        else:
            run(model, opt, 0, split)
            path = tmp_path / f"ck{rank}.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
            model, opt = build(123)                   # other weights: the checkpoint must overwrite them
            ck = torch.load(path)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            run(model, opt, split, steps)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, opt
    return hvd_qadam.simulate(world_size, worker)


def assert_same_params(a: dict, b: dict, what: str = "") -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n} differs (max |diff| {float((a[n] - b[n]).abs().max())})"


def _fixture(helper):
    """A fixture named like ``helper`` that hands the test the helper itself."""
    def fixture():
        return helper
    return pytest.fixture(name=helper.__name__)(fixture)


run_mpi_fixture = _fixture(run_mpi)
sim_train_fixture = _fixture(sim_train)
sim_resume_fixture = _fixture(sim_resume)
assert_same_params_fixture = _fixture(assert_same_params)


# ----------------------------------------------------------------------------- CuPy, or its stand-in

CUPY_STANDIN = os.path.join(HERE, "cupy_standin")
# HVD_QADAM_TEST_CUPY: auto (a CUDA device when CuPy has one, else the stand-in), device (fail
# without a device: the GPU check), standin (the stand-in even where a device exists).
CUPY_MODES = ("auto", "device", "standin")


def _cupy_with_device():
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # CuPy without a driver or a device
        return None


def _load_cupy_standin() -> dict:
    """The stand-in's modules ({"cupy": ..., "cupy.cuda": ..., ...}), imported from tests/cupy_standin
    and then taken out of sys.modules again: only the ``cupy`` fixture puts them in."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "cupy" or k.startswith("cupy.")}
    sys.path.insert(0, CUPY_STANDIN)
    try:
        importlib.import_module("cupy")
        return {k: sys.modules[k] for k in list(sys.modules) if k == "cupy" or k.startswith("cupy.")}
    finally:
        sys.path.remove(CUPY_STANDIN)
        for k in [k for k in sys.modules if k == "cupy" or k.startswith("cupy.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="session")
def cupy_session():
    """("device", cupy) or ("standin", its modules), the kernels of gpu_cupy compiled once for the
    session (the stand-in's library is also cached on disk by the hash of what goes into it)."""
    from hvd_qadam.quant import gpu_cupy
    mode = os.environ.get("HVD_QADAM_TEST_CUPY", "auto")
    if mode not in CUPY_MODES:
        raise ValueError(f"HVD_QADAM_TEST_CUPY must be one of {CUPY_MODES}, got {mode!r}")
    if mode != "standin":
        real = _cupy_with_device()
        if real is not None:
            return "device", real
        if mode == "device":
            pytest.fail("HVD_QADAM_TEST_CUPY=device, but CuPy is not installed or sees no CUDA device")
    modules = _load_cupy_standin()
    if modules["cupy"]._host.compiler() is None:
        pytest.skip("no host C++ compiler for the CuPy stand-in")
    modules["cupy"].RawModule(code=gpu_cupy.KERNEL_SOURCE, options=gpu_cupy._OPTIONS)   # compile once
    return "standin", modules


@pytest.fixture
def cupy(cupy_session, monkeypatch):
    """CuPy on a CUDA device, or the CuPy stand-in installed as ``cupy`` for this test only (in
    sys.modules and as gpu_cupy's ``cp``)."""
    kind, value = cupy_session
    if kind == "device":
        yield value
        return
    from hvd_qadam.quant import gpu_cupy
    for name, module in value.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(gpu_cupy, "cp", value["cupy"])
    gpu_cupy._module.cache_clear()
    gpu_cupy._device_tables.cache_clear()
    try:
        yield value["cupy"]
    finally:
        gpu_cupy._module.cache_clear()      # nothing of the stand-in outlives the test
        gpu_cupy._device_tables.cache_clear()


def same_bits(a, b) -> bool:
    """Arrays equal bit for bit (floats compared as their integer bit patterns: -0.0 != 0.0,
    NaN payloads count)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return np.array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))
    return np.array_equal(a, b)


def random_codebook(rng, num_levels, low, high):
    """A sorted float32 codebook of num_levels distinct levels in [low, high], ends included."""
    while True:
        inner = rng.uniform(low, high, num_levels - 2).astype(np.float32)
        levels = np.unique(np.concatenate([[low, high], inner]).astype(np.float32))
        if levels.size == num_levels:
            return levels
