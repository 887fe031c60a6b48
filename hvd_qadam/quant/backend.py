"""Chooses the implementation that runs a quantizer: NumPy reference, numba CPU kernels or CuPy.

Every backend exposes the same two functions with the reference's exact semantics:
  encode(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset) -> (scales, packed)
  decode(scales, packed, levels, bits, bucket_size, n) -> float32[n]
``HVD_QADAM_BACKEND`` = numpy | numba | auto (default: numba when importable, else numpy).
"""
from __future__ import annotations

import importlib
import os
import sys

from . import reference


def _plain_numba_messages() -> None:
    """Keep numba from writing terminal escape codes.

    numba highlights its error messages with colorama, and it builds one such message while
    loading its CPU target (``numba/cpython/listobj.py`` makes a ``TypingError`` at import), i.e.
    on the first kernel call of every process. Highlighting calls ``colorama.init()``, which
    registers an atexit hook that writes ``ESC[0m`` to stdout whenever stdout looks like a
    terminal -- and under ``mpirun`` every rank's stdout is a pseudo-terminal, so each rank ended
    the job's output with a stray ``ESC[0m`` glued to the next rank's line. numba's own switch
    (read when ``numba.core.errors`` is imported) turns highlighting off; if numba was imported
    before us, its shared colour scheme instance is made to return messages unchanged."""
    os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")
    errors = sys.modules.get("numba.core.errors")
    if errors is None or not hasattr(errors, "ColorShell"):
        return
    try:
        scheme = errors.termcolor()
        if hasattr(scheme, "_markup"):
            scheme._markup = lambda msg, *args, **kwargs: msg
    except Exception:  # a numba without this internal: its messages keep their colours
        pass


_plain_numba_messages()

_CPU_CHOICES = ("numpy", "numba", "auto")


def _load(name: str):
    if name == "numpy":
        return reference
    if name == "numba":
        return importlib.import_module("hvd_qadam.quant.cpu_numba")
    if name == "cupy":
        return importlib.import_module("hvd_qadam.quant.gpu_cupy")
    raise ValueError(f"unknown quantizer backend {name!r}")


_cache: dict[str, object] = {}


def cpu_backend(name: str | None = None):
    """The CPU backend module; ``name`` overrides the environment."""
    name = name or os.environ.get("HVD_QADAM_BACKEND", "auto")
    if name not in _CPU_CHOICES:
        raise ValueError(f"HVD_QADAM_BACKEND must be one of {_CPU_CHOICES}, got {name!r}")
    if name not in _cache:
        if name == "auto":
            try:
                _cache[name] = _load("numba")
            except ImportError:
                _cache[name] = reference
        else:
            _cache[name] = _load(name)
    return _cache[name]


def gpu_backend():
    if "cupy" not in _cache:
        _cache["cupy"] = _load("cupy")
    return _cache["cupy"]


def share_cores(local_ranks: int) -> None:
    """Give each of ``local_ranks`` processes on this host its share of the cores for the parallel
    CPU kernels. numba's thread pool defaults to every core in every process, and oversubscribed
    pools spin against each other (seen here: 100x slower steps with 3 ranks on 2 cores)."""
    if local_ranks <= 1 or os.environ.get("NUMBA_NUM_THREADS"):
        return
    share = max(1, (os.cpu_count() or 1) // local_ranks)
    if "numba" not in sys.modules:
        # Before numba starts its pool: size the pool itself (idle pool threads also spin).
        os.environ["NUMBA_NUM_THREADS"] = str(share)
        return
    import numba  # already imported (checked above): the pool is running, resize it
    numba.set_num_threads(min(share, numba.config.NUMBA_NUM_THREADS))
