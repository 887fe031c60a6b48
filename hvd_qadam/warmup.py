"""Compile every kernel ahead of time, with the argument types the library calls it with.

numba compiles a kernel on its first call for each combination of argument types and keeps the
result in its on-disk cache (``NUMBA_CACHE_DIR``). ``scripts/install.sh`` runs
:func:`compile_kernels` once, so that N ranks starting together load compiled kernels instead of
each compiling them for tens of seconds. The calls below go through the entry points a training
step uses -- the codec on NumPy arrays and torch tensors, payloads parsed from received bytes, the
codec's fused decodes (``decode_into``, ``decode_add`` with and without a divisor,
``decode_mean``), error feedback fused with quantization (``encode_ef``), and every kernel of the
optimizer math in :mod:`hvd_qadam.functional` on float32 tensors -- so they produce the types a
run produces (tests/test_kernels.py checks that a training workload compiles nothing more).

Where CuPy and a CUDA device are present, the CUDA kernels are compiled too (CuPy keeps them in
its own on-disk cache).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from . import functional as F
from .codec import decode_flat, quantize, quantize_ef
from .quant.backend import cpu_backend, fused_kernels, gpu_backend
from .quant.codebooks import KINDS, default_adaptive_codebook
from .wire import Payload

_N = 1000          # small: compiling is what takes the time
_BUCKET = 64


def _quantizers(backend) -> None:
    x = np.linspace(-1, 1, _N, dtype=np.float32)
    acc = np.empty(_N, np.float32)
    fused = fused_kernels(backend)
    for name, k in KINDS.items():
        if k.passthrough:
            continue
        # the default width and 4 bits (6-bit payloads take a wire check of their own)
        widths = (3,) if k.adaptive else (None,) if k.fixed_bits or k.default_bits == 4 else (None, 4)
        for bits, rounding in ((b, r) for b in widths for r in ("stochastic", "nearest")):
            codebook = default_adaptive_codebook(bits) if k.adaptive else None
            sent = quantize(x, name, bits, _BUCKET, rounding=rounding, codebook=codebook)
            received = Payload.from_bytes(sent.to_bytes())      # read-only arrays over the bytes
            decode_flat(sent)
            decode_flat(received)
            if fused.decode_into:
                for p in (sent, received):
                    args = (p.scales, p.codes, p.levels, p.bits, p.bucket_size, p.numel)
                    backend.decode_into(acc, *args)
                    backend.decode_add(acc, *args)
                    backend.decode_add(acc, *args, divisor=2)
            if fused.decode_mean:
                backend.decode_mean(acc, [sent.scales, received.scales], [sent.codes, received.codes], sent.levels,
                                    sent.bits, sent.bucket_size, sent.numel)
            v = torch.from_numpy(x)
            resid, resid_out = torch.zeros(_N), torch.empty(_N)
            quantize_ef(v, resid, resid_out, name, sent.bits, _BUCKET, rounding, key=1, codebook=codebook)


def _optimizer_math() -> None:
    g, m, v, x = (torch.linspace(-1, 1, _N) * (i + 1) for i in range(4))
    m_out, v_out, d_out, buf_out = (torch.empty(_N) for _ in range(4))
    for step, weight_decay, decoupled in ((1, 0.0, False), (2, 0.01, False), (3, 0.01, True)):
        c = F.adam_constants(step, 1e-3, 0.9, 0.999, 1e-8, weight_decay, decoupled, True, False)
        F.adam_update(g, m, v, x if weight_decay else None, m_out, v_out, d_out, c)
    F.momentum_update(g, None, None, buf_out, d_out, F.momentum_constants(0.1, 0.9, 0.0, False, 0.0, False, True))
    F.momentum_update(g, m, x, buf_out, d_out, F.momentum_constants(0.1, 0.9, 0.1, True, 1e-4, False, False))
    F.momentum_update(g, None, None, None, d_out, F.momentum_constants(0.1, 0.0, 0.0, False, 0.0, False, True))
    F.axpby(x, d_out, m_out, 1.0, -1.0)
    for weight_decay, decoupled in ((0.0, False), (0.01, False), (0.01, True)):   # onebit_adam
        c = F.adam_constants(4, 1e-3, 0.9, 0.999, 1e-8, weight_decay, decoupled, True, False)
        F.momentum_ema(g, m, x if c["l2"] else None, m_out, c)
        F.frozen_adam_apply(m, v, x if weight_decay else None, m_out, d_out, c)
    F.sumsq(v)


def _gpu_kernels() -> None:
    try:
        import cupy  # optional: GPU only
    except ImportError:
        return
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:     # no driver
        return
    if devices:
        gpu_backend().warmup()


def compile_kernels() -> float:
    """Compile (or load from the on-disk caches) every kernel the library calls: the CPU ones,
    and the CUDA ones where CuPy finds a device. Returns the seconds it took."""
    t0 = time.perf_counter()
    _quantizers(cpu_backend())
    _optimizer_math()
    _gpu_kernels()
    return time.perf_counter() - t0
