"""Fused optimizer kernels used by the worker and server transforms (no state, no comms).

Each kernel makes one pass over flat float32 buffers and writes its results into buffers the
caller owns (persistent, preallocated), so a steady-state step allocates nothing of the model's
size. All arithmetic is float32 with float32 constants, one IEEE operation at a time: numba
compiles without fastmath, so LLVM neither reassociates nor contracts to FMA, and a buffer
processed whole or in shards gives the same bits. :func:`adam_reference` and
:func:`momentum_reference` are the NumPy statements of the same arithmetic (the tests' oracle).

Contiguous float32 CUDA tensors run the same kernels written in CUDA (:mod:`hvd_qadam.quant.gpu_cupy`,
bit for bit these, on torch's current stream) when CuPy is installed; other CUDA tensors take the
torch expression of the same formulas.
"""
from __future__ import annotations

import math

import numpy as np
import torch

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a hard dependency of the CPU path
    njit = prange = None

_TASK = 1 << 15
_JIT = dict(cache=True, nogil=True, error_model="numpy")


def _f32(x) -> np.float32:
    return np.float32(x)


if njit is not None:
    @njit(parallel=True, **_JIT)
    def _adam_kernel(g, m, v, x, m_out, v_out, d_out, sign, l2, b1, omb1, b2, omb2, use_bc, bc1, bc2, lr, eps,
                     lr_wd, decoupled):
        n = g.size
        for t in prange((n + _TASK - 1) // _TASK):
            i0, i1 = t * _TASK, min(n, (t + 1) * _TASK)
            g_t, m_t, v_t, x_t = g[i0:i1], m[i0:i1], v[i0:i1], x[i0:i1]
            m_out_t, v_out_t, d_out_t = m_out[i0:i1], v_out[i0:i1], d_out[i0:i1]
            for i in range(i1 - i0):      # slices indexed from 0: no wrap-around checks, vectorized
                gi = g_t[i] * sign
                if l2:
                    gi = gi + x_t[i] * l2
                mi = m_t[i] * b1 + gi * omb1
                vi = v_t[i] * b2 + (gi * gi) * omb2
                m_out_t[i] = mi
                v_out_t[i] = vi
                if use_bc:
                    mi = mi / bc1
                    vi = vi / bc2
                d = (mi * lr) / (np.float32(math.sqrt(vi)) + eps)
                if decoupled:
                    d = d + x_t[i] * lr_wd
                d_out_t[i] = d

    @njit(parallel=True, **_JIT)
    def _momentum_kernel(g, buf, x, buf_out, d_out, sign, wd, momentum, damp, first, nesterov, lr):
        n = g.size
        for t in prange((n + _TASK - 1) // _TASK):
            i0, i1 = t * _TASK, min(n, (t + 1) * _TASK)
            buf_t, buf_out_t, d_out_t, g_t, x_t = buf[i0:i1], buf_out[i0:i1], d_out[i0:i1], g[i0:i1], x[i0:i1]
            for i in range(i1 - i0):      # slices indexed from 0: no wrap-around checks, vectorized
                gi = g_t[i] * sign
                if wd:
                    gi = gi + x_t[i] * wd
                if momentum:
                    b = gi if first else buf_t[i] * momentum + gi * damp
                    buf_out_t[i] = b
                    gi = gi + b * momentum if nesterov else b
                d_out_t[i] = gi * lr

    @njit(parallel=True, **_JIT)
    def _momentum_ema_kernel(g, m, x, out, sign, l2, b1, omb1):
        n = g.size
        for t in prange((n + _TASK - 1) // _TASK):
            i0, i1 = t * _TASK, min(n, (t + 1) * _TASK)
            g_t, m_t, out_t, x_t = g[i0:i1], m[i0:i1], out[i0:i1], x[i0:i1]
            for i in range(i1 - i0):      # slices indexed from 0: no wrap-around checks, vectorized
                gi = g_t[i] * sign
                if l2:
                    gi = gi + x_t[i] * l2
                out_t[i] = m_t[i] * b1 + gi * omb1

    @njit(parallel=True, **_JIT)
    def _frozen_adam_kernel(m, v, x, m_out, d_out, use_bc, bc2, lr, eps, lr_wd, decoupled):
        n = m.size
        for t in prange((n + _TASK - 1) // _TASK):
            i0, i1 = t * _TASK, min(n, (t + 1) * _TASK)
            d_out_t, m_t, m_out_t, v_t, x_t = d_out[i0:i1], m[i0:i1], m_out[i0:i1], v[i0:i1], x[i0:i1]
            for i in range(i1 - i0):      # slices indexed from 0: no wrap-around checks, vectorized
                vi = v_t[i]
                if vi == 0:
                    mi = np.float32(0.0)
                    d = np.float32(0.0)
                else:
                    mi = m_t[i]
                    if use_bc:
                        vi = vi / bc2
                    d = (mi * lr) / (np.float32(math.sqrt(vi)) + eps)
                if decoupled:
                    d = d + x_t[i] * lr_wd
                m_out_t[i] = mi
                d_out_t[i] = d

    @njit(**_JIT)
    def _sumsq_kernel(a):
        """Sum of squares in float64, one element after the other (no fastmath: no reassociation),
        so equal inputs give equal bits on every x86-64 CPU."""
        s = 0.0
        for i in range(a.size):
            ai = np.float64(a[i])
            s += ai * ai
        return s

    @njit(parallel=True, **_JIT)
    def _axpby_kernel(a, b, out, alpha, beta):
        """out = a * alpha + b * beta (alpha/beta of 1 or -1 are exact)."""
        n = a.size
        for t in prange((n + _TASK - 1) // _TASK):
            i0, i1 = t * _TASK, min(n, (t + 1) * _TASK)
            a_t, b_t, out_t = a[i0:i1], b[i0:i1], out[i0:i1]
            for i in range(i1 - i0):      # slices indexed from 0: no wrap-around checks, vectorized
                out_t[i] = a_t[i] * alpha + b_t[i] * beta


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _host(*tensors) -> bool:
    return njit is not None and all(t is None or t.device.type == "cpu" for t in tensors)


def _cuda_kernels(*tensors):
    """The CuPy backend when every tensor given is a contiguous float32 CUDA tensor and CuPy is
    installed, else None (the torch expressions run instead)."""
    given = [t for t in tensors if t is not None]
    if not all(t.is_cuda and t.dtype == torch.float32 and t.is_contiguous() for t in given):
        return None
    try:
        import cupy  # noqa: F401 - optional (GPU only) and slow to import
    except ImportError:
        return None
    from .quant import gpu_cupy  # imports CuPy: GPU only
    return gpu_cupy


def _run_cuda(kernel, tensors, *constants) -> None:
    """kernel(*tensors as CuPy views (None stays None), *constants) on torch's current stream."""
    import cupy  # optional: GPU only
    first = next(t for t in tensors if t is not None)
    with cupy.cuda.Device(first.device.index or 0), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(first.device).cuda_stream):
        kernel(*[None if t is None else cupy.from_dlpack(t.detach()) for t in tensors], *constants)


def adam_constants(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool, bias_correction: bool, maximize: bool) -> dict:
    """The float32 constants of one Adam step (computed in double, rounded once, as torch does
    for a Python scalar times a float32 tensor)."""
    wd = float(weight_decay or 0.0)
    return dict(sign=_f32(-1.0 if maximize else 1.0), l2=_f32(0.0 if decoupled else wd), b1=_f32(beta1),
                omb1=_f32(1.0 - beta1), b2=_f32(beta2), omb2=_f32(1.0 - beta2), use_bc=bool(bias_correction),
                bc1=_f32(1.0 - beta1 ** step), bc2=_f32(1.0 - beta2 ** step), lr=_f32(lr), eps=_f32(eps),
                lr_wd=_f32(lr * wd if decoupled else 0.0), decoupled=bool(decoupled and wd))


def adam_update(g, m, v, x, m_out, v_out, d_out, c: dict) -> None:
    """One Adam step from gradient g with constants c (:func:`adam_constants`):

        g <- sign * g (+ l2 * x for Adam's L2 weight decay)
        m' = b1 m + (1 - b1) g ;  v' = b2 v + (1 - b2) g^2
        d  = lr (m' / bc1) / (sqrt(v' / bc2) + eps)   (+ lr wd x, AdamW's decoupled decay)

    into m_out, v_out, d_out (the inputs are not modified). x may be None without weight decay."""
    if _host(g, m, v, x, m_out, v_out, d_out):
        xa = _np(x) if x is not None else _np(g)
        _adam_kernel(_np(g), _np(m), _np(v), xa, _np(m_out), _np(v_out), _np(d_out), **c)
        return
    gpu = _cuda_kernels(g, m, v, x, m_out, v_out, d_out)
    if gpu is not None:
        _run_cuda(gpu.adam_update, (g, m, v, x, m_out, v_out, d_out), c)
        return
    gi = g * c["sign"]
    if c["l2"]:
        gi = gi + x * c["l2"]
    torch.add(m * c["b1"], gi * c["omb1"], out=m_out)
    torch.add(v * c["b2"], (gi * gi) * c["omb2"], out=v_out)
    mh, vh = (m_out / c["bc1"], v_out / c["bc2"]) if c["use_bc"] else (m_out, v_out)
    torch.div(mh * c["lr"], torch.sqrt(vh) + c["eps"], out=d_out)
    if c["decoupled"]:
        d_out.add_(x * c["lr_wd"])


def adam_reference(g, m, v, x, c: dict):
    """NumPy statement of :func:`adam_update` (returns m', v', d)."""
    f = np.float32
    gi = g.astype(f) * c["sign"]
    if c["l2"]:
        gi = gi + x * c["l2"]
    mi = m * c["b1"] + gi * c["omb1"]
    vi = v * c["b2"] + (gi * gi) * c["omb2"]
    mh, vh = (mi / c["bc1"], vi / c["bc2"]) if c["use_bc"] else (mi, vi)
    d = (mh * c["lr"]) / (np.sqrt(vh) + c["eps"])
    if c["decoupled"]:
        d = d + x * c["lr_wd"]
    return mi, vi, d.astype(f)


def momentum_constants(lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                       maximize: bool, first: bool) -> dict:
    return dict(sign=_f32(-1.0 if maximize else 1.0), wd=_f32(weight_decay or 0.0), momentum=_f32(momentum or 0.0),
                damp=_f32(1.0 - (dampening or 0.0)), first=bool(first), nesterov=bool(nesterov), lr=_f32(lr))


def momentum_update(g, buf, x, buf_out, d_out, c: dict) -> None:
    """torch.optim.SGD's direction, scaled by lr, into d_out (the new buffer into buf_out):

        g <- sign * g + wd x
        b' = g (first step) or momentum b + (1 - dampening) g
        d  = lr (g + momentum b')  with nesterov, else lr b'   (d = lr g without momentum)
    """
    if _host(g, buf, x, buf_out, d_out):
        dummy = _np(g)
        _momentum_kernel(_np(g), dummy if buf is None else _np(buf), dummy if x is None else _np(x),
                         dummy if buf_out is None else _np(buf_out), _np(d_out), **c)
        return
    gpu = _cuda_kernels(g, buf, x, buf_out, d_out)
    if gpu is not None:
        _run_cuda(gpu.momentum_update, (g, buf, x, buf_out, d_out), c)
        return
    gi = g * c["sign"]
    if c["wd"]:
        gi = gi + x * c["wd"]
    if c["momentum"]:
        b = gi.clone() if c["first"] else buf * c["momentum"] + gi * c["damp"]
        buf_out.copy_(b)
        gi = gi + b * c["momentum"] if c["nesterov"] else b
    torch.mul(gi, c["lr"], out=d_out)


def momentum_reference(g, buf, x, c: dict):
    gi = g * c["sign"]
    if c["wd"]:
        gi = gi + x * c["wd"]
    b = None
    if c["momentum"]:
        b = gi.copy() if c["first"] else buf * c["momentum"] + gi * c["damp"]
        gi = gi + b * c["momentum"] if c["nesterov"] else b
    return b, gi * c["lr"]


def axpby(a, b, out, alpha: float, beta: float) -> None:
    """out = alpha a + beta b elementwise in float32 (e.g. the model delta x - anchor)."""
    if _host(a, b, out):
        _axpby_kernel(_np(a), _np(b), _np(out), _f32(alpha), _f32(beta))
        return
    gpu = _cuda_kernels(a, b, out)
    if gpu is not None:
        _run_cuda(gpu.axpby, (a, b, out), alpha, beta)
        return
    torch.add(a * alpha, b * beta, out=out)


def momentum_ema(g, m, x, out, c: dict) -> None:
    """The first-moment update of :func:`adam_update` alone, into out (1-bit Adam's worker transform):

        g <- sign * g (+ l2 * x for Adam's L2 weight decay);   out = b1 m + (1 - b1) g
    """
    if _host(g, m, x, out):
        _momentum_ema_kernel(_np(g), _np(m), _np(x) if x is not None else _np(g), _np(out), c["sign"], c["l2"],
                             c["b1"], c["omb1"])
        return
    gpu = _cuda_kernels(g, m, x, out)
    if gpu is not None:
        _run_cuda(gpu.momentum_ema, (g, m, x, out), c)
        return
    gi = g * c["sign"]
    if c["l2"]:
        gi = gi + x * c["l2"]
    torch.add(m * c["b1"], gi * c["omb1"], out=out)


def frozen_adam_apply(m, v, x, m_out, d_out, c: dict) -> None:
    """1-bit Adam's step after the freeze, from the averaged momentum m and the frozen v:

        d = lr m / (sqrt(v / bc2) + eps)   (bc2 of the freeze step, 1 without bias correction)
            (+ lr wd x, AdamW's decoupled decay);  m_out = m
        where v == 0 (a coordinate whose gradient was exactly 0 through the whole warm-up):
            d = 0 (+ decay), m_out = 0 -- a 1-bit code cannot say 0, and m / eps would explode.
    """
    if _host(m, v, x, m_out, d_out):
        _frozen_adam_kernel(_np(m), _np(v), _np(x) if x is not None else _np(m), _np(m_out), _np(d_out),
                            c["use_bc"], c["bc2"], c["lr"], c["eps"], c["lr_wd"], c["decoupled"])
        return
    gpu = _cuda_kernels(m, v, x, m_out, d_out)
    if gpu is not None:
        _run_cuda(gpu.frozen_adam_apply, (m, v, x, m_out, d_out), c)
        return
    live = v != 0
    vh = v / c["bc2"] if c["use_bc"] else v
    zero = torch.zeros_like(m)
    torch.where(live, m, zero, out=m_out)
    torch.where(live, (m_out * c["lr"]) / (torch.sqrt(vh) + c["eps"]), zero, out=d_out)
    if c["decoupled"]:
        d_out.add_(x * c["lr_wd"])


def frozen_adam_reference(m, v, x, c: dict):
    """NumPy statement of :func:`frozen_adam_apply` (returns m', d)."""
    f = np.float32
    live = v != 0
    mi = np.where(live, m, f(0)).astype(f)
    vh = v / c["bc2"] if c["use_bc"] else v
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(live, (mi * c["lr"]) / (np.sqrt(vh) + c["eps"]), f(0)).astype(f)
    if c["decoupled"]:
        d = d + x * c["lr_wd"]
    return mi, d.astype(f)


def all_finite(vec: torch.Tensor) -> bool:
    """Whether ``vec`` holds no NaN/Inf. A sum is ~5x cheaper than isfinite().all() and
    non-finite whenever an element is (or, rarely, when finite values overflow: then the exact
    check clears it)."""
    return np.isfinite(float(vec.sum())) or bool(torch.isfinite(vec).all())


def nonfinite_note(name: str, part: torch.Tensor) -> str | None:
    """``"name (n NaN, m Inf)"`` where ``part`` holds NaN/Inf, else None (what the error names)."""
    if all_finite(part):
        return None
    return f"{name} ({int(torch.isnan(part).sum())} NaN, {int(torch.isinf(part).sum())} Inf)"


def sumsq(t: torch.Tensor) -> float:
    """sum(t^2) in float64, reproducible bit for bit for equal inputs (sequential on the host)."""
    if njit is not None and t.device.type == "cpu":
        return float(_sumsq_kernel(_np(t)))
    return float(t.double().pow(2).sum())
