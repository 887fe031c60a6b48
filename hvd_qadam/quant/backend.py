"""Chooses the implementation that runs a quantizer: NumPy reference, numba CPU kernels or CuPy.

Every backend exposes the same two functions with the reference's exact semantics:
  encode(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset) -> (scales, packed)
  decode(scales, packed, levels, bits, bucket_size, n) -> float32[n]
and some have fused kernels on top, bit for bit the same results in fewer passes;
:func:`fused_kernels` is the one place that says which a backend has.
``HVD_QADAM_BACKEND`` = numpy | numba | auto (default: numba when importable, else numpy).
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FusedKernels:
    """The kernels a backend module has beyond ``encode`` and ``decode`` (the NumPy reference
    has none of them; callers without one run the unfused steps, with the same result)."""
    encode_ef: bool     # encode_ef(v, e, out, ...): error feedback and quantization in one pass
    decode_into: bool   # decode_into(out, ...) and decode_add(acc, ..., divisor): decode into a buffer, accumulate
    decode_mean: bool   # decode_mean(out, scales_list, packed_list, ...): a rank-order mean in one pass
    wire_checks: bool   # any_all_ones_code, first_flagged_byte: the payload validator's scans of the codes


def fused_kernels(backend) -> FusedKernels:
    """Which fused kernels ``backend`` (a module from :func:`cpu_backend` or
    :func:`gpu_backend`) has."""
    return FusedKernels(encode_ef=hasattr(backend, "encode_ef"),
                        decode_into=hasattr(backend, "decode_into") and hasattr(backend, "decode_add"),
                        decode_mean=hasattr(backend, "decode_mean"),
                        wire_checks=hasattr(backend, "any_all_ones_code") and hasattr(backend, "first_flagged_byte"))


def _usable_cores() -> int:
    """Cores this process may run on (its affinity: ``mpirun`` may bind a rank to one core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API on this platform
        return os.cpu_count() or 1


def start_numba_pool() -> None:
    """Start numba's thread pool now, keeping the calling thread's torch thread count.

    numba's OpenMP threading layer starts its pool with ``omp_set_num_threads(NUMBA_NUM_THREADS)``
    in the thread that launches it, and torch, linked against the same libgomp, reads its intra-op
    thread count from that thread's OpenMP setting. A rank that ran torch on one thread
    (``OMP_NUM_THREADS=1`` as ``horovodrun`` users set, or ``torch.set_num_threads``) went on with
    torch on every core after the first kernel call: ranks sharing a host then oversubscribe it
    during forward and backward. The pool is started here, at a known point, and torch's count
    is put back."""
    import numba.np.ufunc.parallel as numba_parallel  # optional backend: called only once numba is imported
    if numba_parallel._is_initialized:
        return
    torch_module = sys.modules.get("torch")
    torch_threads = torch_module.get_num_threads() if torch_module is not None else None
    numba_parallel._launch_threads()
    if torch_threads is not None and torch_module.get_num_threads() != torch_threads:
        torch_module.set_num_threads(torch_threads)


def share_cores(local_ranks: int) -> None:
    """Give each of ``local_ranks`` processes on this host its share of the cores for the parallel
    CPU kernels, and start numba's pool without touching torch's thread count
    (:func:`start_numba_pool`). numba's pool defaults to every core in every process, and
    oversubscribed pools spin against each other (seen here: 100x slower steps with 3 ranks on 2
    cores)."""
    share = None
    if local_ranks > 1 and not os.environ.get("NUMBA_NUM_THREADS"):
        share = max(1, _usable_cores() // local_ranks)
    if "numba" not in sys.modules:
        if share is not None:
            # Before numba starts its pool: size the pool itself (idle pool threads also spin).
            os.environ["NUMBA_NUM_THREADS"] = str(share)
        return
    import numba  # already imported (checked above): start its pool, then narrow it
    start_numba_pool()
    if share is not None:
        numba.set_num_threads(min(share, numba.config.NUMBA_NUM_THREADS))
