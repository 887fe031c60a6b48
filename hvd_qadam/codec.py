"""The codec: every conversion between values and payloads goes through this module.

Encoding: :func:`quantize` (NumPy arrays and torch tensors, any quantizer of the family),
:func:`quantize_ef` (error feedback and quantization in one pass), and :func:`encode` /
:func:`encode_ef`, the same for a :class:`~hvd_qadam.config.LinkSpec` (what the engine sends).
Decoding: :func:`dequantize` and :func:`decode_flat` (a payload's values), :func:`decode_into` (a
payload into a buffer, e.g. a shard's slice of a group buffer) and :func:`mean_into` (the
rank-order mean of N payloads, in one pass where the backend can).

Why one door: a payload's values must be the same wherever they are decoded -- on the sending
rank for its error-feedback residual, on the server for the mean, on every rank for the
downlink -- or replicas drift apart. Here alone a payload meets a backend: which backend runs
(numba or the NumPy reference on the host, CuPy for CUDA tensors), which of its fused kernels
apply (:func:`hvd_qadam.quant.backend.fused_kernels`), and where the decoded values are made
(received codes go up to the device, never full-size tensors). The engine and the topologies
say what to encode and where to put the result, never how.

Arrays go in flat as float32 (fp16/bf16/fp64 are converted; float64 through ``none`` stays
float64, so the uncompressed pass-through is exact for every dtype); the payload remembers the shape
and dtype so dequantize() hands back the same kind of array: torch in, torch out (same device);
NumPy in, NumPy out; fp16/bf16 results saturate at the dtype's largest finite value instead of
overflowing to inf. CUDA tensors run on the CuPy backend when it is installed.
"""
from __future__ import annotations

import numpy as np

from .errors import ConsistencyError
from .quant import codebooks as cb
from .quant import rng
from .quant.backend import cpu_backend, fused_kernels, gpu_backend
from .quant.common import (array_module, bf16_bits, bf16_finite, bf16_values, check_bucket_size,  # noqa: F401
                           is_cupy, to_host)  # check_bucket_size is re-exported
from .wire import MAX_NDIM, Payload

try:  # torch is optional for the pure-NumPy API
    import torch
except ImportError:  # pragma: no cover
    torch = None

ROUNDINGS = ("stochastic", "nearest")


def stochastic_rounding(k: cb.QuantizerKind, rounding: str | None) -> bool:
    """Whether ``rounding`` (None: the quantizer's default) is stochastic; anything but the
    :data:`ROUNDINGS` is refused (a typo must not silently mean nearest)."""
    if rounding is None:
        return k.stochastic
    if rounding not in ROUNDINGS:
        raise cb.QuantizerError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding == "stochastic"


def _is_torch(x) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _flat_fp32(x, keep_float64: bool = False):
    """(flat float32 array on its device, array_kind, dtype name, shape); float64 input stays
    float64 with ``keep_float64``."""
    if _is_torch(x):
        dtype = str(x.dtype).replace("torch.", "")
        if not x.dtype.is_floating_point:
            raise cb.QuantizerError(f"quantize needs a floating-point tensor, got {x.dtype}")
        wide = keep_float64 and x.dtype == torch.float64
        flat = x.detach().reshape(-1).to(torch.float64 if wide else torch.float32).contiguous()
        if flat.is_cuda:
            import cupy  # optional: GPU only
            arr = cupy.from_dlpack(flat)
        else:
            arr = flat.numpy()
        return arr, ("torch", x.device, x.dtype), dtype, tuple(x.shape)
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise cb.QuantizerError(f"quantize needs a floating-point array, got {a.dtype}")
    wide = keep_float64 and a.dtype == np.float64
    return (np.ascontiguousarray(a, dtype=np.float64 if wide else np.float32).reshape(-1), ("numpy",), str(a.dtype),
            a.shape)


def _backend_for(arr, backend):
    if is_cupy(arr):
        return gpu_backend()
    return cpu_backend(backend)


FP16_MAX = 65504.0
BF16_MAX = 3.3895313892515355e38


def quantize(x, quantizer: str = "qsgd", bits: int | None = None, bucket_size: int | None = None, seed: int = 0,
             rounding: str | None = None, codebook=None, *, key: int | None = None, offset: int = 0,
             backend: str | None = None, check_finite: bool = True) -> Payload:
    """Quantize ``x`` into a :class:`Payload`.

    ``bits=None`` is the quantizer's default: 6 for qsgd and qsgdinf, the fixed width of sign (1),
    terngrad (2), fp16 and bf16 (16) and none (32), 4 for the others; ``bucket_size=None`` is 128 (512
    for the 1-bit sign): the defaults of ``DistributedOptimizer`` (``quant.codebooks.DEFAULT_BITS``). ``seed`` (or an explicit stream ``key`` from :func:`hvd_qadam.quant.rng.stream_key`) fixes the
    stochastic rounding; ``offset`` is the index of x[0] in its stream, so that chunks of one vector
    quantized separately draw exactly what the whole vector would. ``codebook`` is required for
    the adaptive quantizers (alq, amq, ...), whose levels travel with the payload.
    """
    k = cb.kind(quantizer)
    bits = k.check_bits(bits)
    stochastic = stochastic_rounding(k, rounding)
    arr, array_kind, dtype, shape = _flat_fp32(x, keep_float64=k.name == "none")
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise cb.QuantizerError(f"unsupported dtype {dtype}")
    if len(shape) > MAX_NDIM:
        raise cb.QuantizerError(f"quantize: {len(shape)} dimensions; the wire format carries at most {MAX_NDIM}")
    if check_finite and arr.size and not bool(_isfinite_all(arr)):
        raise ValueError(f"quantize: input has {int(arr.size - _count_finite(arr))} NaN/Inf value(s); "
                         "refusing to quantize non-finite data")
    if k.passthrough:
        codes = _passthrough_values(arr, k.name)
        return Payload(k.name, bits, 0, int(arr.size), shape, None, codes, None, False, dtype, array_kind)
    bucket_size = check_bucket_size(k.default_bucket_size if bucket_size is None else bucket_size)
    if k.adaptive:
        if codebook is None:
            raise cb.QuantizerError(f"quantizer {k.name!r} needs a codebook (its levels are learned)")
        levels = cb.validate_codebook(codebook, bits)
    else:
        if codebook is not None:
            raise cb.QuantizerError(f"quantizer {k.name!r} has a fixed codebook; do not pass one")
        levels = cb.codebook(k.name, bits)
    if key is None:
        key = rng.stream_key(seed)
    be = _backend_for(arr, backend)
    scales, packed = be.encode(arr, levels, bits, bucket_size, k.scale, stochastic, key, offset)
    if scales.size and not bool(_isfinite_all(scales)):
        raise ValueError(f"quantize: a bucket's {cb.SCALE_NAMES[k.scale]} scale overflows float32 (values up to "
                         f"{float(abs(arr).max()):.4g}); scale the tensor down or use a max-abs quantizer")
    return Payload(k.name, bits, bucket_size, int(arr.size), shape, scales, packed,
                   np.array(levels, dtype=np.float32) if k.adaptive else None, stochastic, dtype, array_kind)


def _passthrough_values(arr, name: str) -> np.ndarray:
    """A pass-through payload's values on the host: fp16 values, bf16 bit patterns (rounded to
    nearest even on arr's device, so a CUDA vector crosses PCIe at 2 bytes per element), or for
    none float32 (float64 for float64 input). Finite values beyond fp16's or bf16's range are
    refused: the receiver rejects a payload holding inf."""
    if name == "bf16":
        codes = bf16_bits(arr)
        finite = bf16_finite(codes)
        if codes.size and not bool(finite.all()) and bool(_isfinite_all(arr)):
            raise ValueError(f"quantize: values up to {float(abs(arr).max()):.4g} overflow bf16 (max "
                             f"{BF16_MAX:.5g}); use a scaled quantizer or 'none'")
        return to_host(codes)
    if name == "fp16" and arr.size and float(abs(arr).max()) > FP16_MAX:
        raise ValueError(f"quantize: values up to {float(abs(arr).max()):.4g} overflow fp16 (max {FP16_MAX}); "
                         "use a scaled quantizer or 'none'")
    return to_host(arr.astype(np.float16 if name == "fp16" else arr.dtype, copy=True))


# The smallest magnitude that rounds to inf in bfloat16: its largest value plus half a step.
BF16_OVERFLOW = float(np.uint32(0x7F7F8000).view(np.float32))


def fits_passthrough(t, quantizer: str) -> bool:
    """Whether a finite torch tensor's values fit the 2-byte pass-through ``quantizer`` (fp16,
    bf16), i.e. whether :func:`quantize` takes it: the engine checks this on the sending rank, so
    that a value beyond the range fails the step on every rank instead of raising on one."""
    if t.numel() == 0:
        return True
    top = float(t.detach().abs().max())
    return top <= FP16_MAX if quantizer == "fp16" else top < BF16_OVERFLOW


def _isfinite_all(arr):
    return array_module(arr).isfinite(arr).all()


def _count_finite(arr):
    return int(array_module(arr).isfinite(arr).sum())


def decode_flat(payload: Payload, backend: str | None = None) -> np.ndarray:
    """The payload's values as a flat float32 NumPy array (or CuPy for GPU payloads); float64
    for a float64 ``none`` payload, which carries its values exactly."""
    k = payload.kind
    if k.name == "bf16":
        return bf16_values(payload.codes)
    if k.passthrough:
        return payload.codes.astype(np.float64 if payload.codes.dtype == np.float64 else np.float32)
    be = _backend_for(payload.codes, backend)
    return be.decode(payload.scales, payload.codes, payload.levels, payload.bits, payload.bucket_size,
                     payload.numel)


# Saturation: decoding works in float32, and a value decoded from finite fp16/bf16 input can
# exceed that dtype's largest finite value. The quantizer rounds |x| up to the next level (60000
# at 4-bit QSGD with an l2 scale of 1.36e6 becomes 1.36e6 / 7 = 194,000), or a pass-through
# carries more than the target holds. Casting that down would give inf; dequantize saturates at
# +-max instead (the nearest finite value, and never above what the input dtype can hold). This
# applies whenever the result is cast to float16 / bfloat16, the payload's dtype or ``like``'s.
def dequantize(payload: Payload, like=None, backend: str | None = None):
    """Decode a payload into the same kind of array it was made from (or the kind of ``like``)."""
    flat = decode_flat(payload, backend)
    kind = payload.array_kind
    if like is not None:
        kind = ("torch", like.device, like.dtype) if _is_torch(like) else ("numpy",)
    if kind is not None and kind[0] == "torch":
        _, device, dtype = kind
        if is_cupy(flat):
            t = torch.from_dlpack(flat)
        else:
            t = torch.from_numpy(np.ascontiguousarray(flat))
        if dtype in (torch.float16, torch.bfloat16):
            hi = torch.finfo(dtype).max
            t = t.clamp(-hi, hi)          # saturate, never round to inf (see above)
        return t.to(device=device, dtype=dtype).reshape(payload.shape)
    if payload.orig_dtype == "bfloat16":
        return flat.reshape(payload.shape)  # NumPy has no bfloat16: stay in float32
    if payload.orig_dtype == "float16":
        hi = np.float32(FP16_MAX)
        mod = np if type(flat).__module__.startswith("numpy") else __import__("cupy")
        flat = mod.clip(flat, -hi, hi)
    return flat.astype(payload.orig_dtype, copy=False).reshape(payload.shape)


def quantize_ef(v, resid, resid_out, quantizer: str, bits: int | None, bucket_size: int,
                rounding: str | None = None, *, key: int, offset: int = 0, codebook=None):
    """Error-feedback quantization of a flat float32 torch vector in one pass:
    ``p = v + resid``, payload = quantize(p), ``resid_out = p - dequantize(payload)``.

    Returns (payload, nonfinite); when ``nonfinite`` (p held inf/NaN) the payload must not be
    sent. Bit for bit the three steps done separately: fused on the numba backend and, for
    contiguous float32 CUDA tensors, by the CuPy backend's fused kernels (no full-size
    temporaries); elsewhere (NumPy backend, pass-through) it runs them separately."""
    k = cb.kind(quantizer)
    bits = k.check_bits(bits)
    stochastic = stochastic_rounding(k, rounding)
    if k.adaptive:
        if codebook is None:
            raise cb.QuantizerError(f"quantizer {k.name!r} needs a codebook (its levels are learned)")
        levels = cb.validate_codebook(codebook, bits)
    else:
        levels = cb.codebook(k.name, bits)
    be = gpu_backend() if v.is_cuda else cpu_backend()
    cuda_fused = v.is_cuda and all(t.is_cuda and t.dtype == torch.float32 and t.is_contiguous()
                                   for t in (v, resid, resid_out))
    if k.passthrough or (v.device.type != "cpu" and not cuda_fused) or not fused_kernels(be).encode_ef:
        torch.add(v, resid, out=resid_out)
        if not bool(torch.isfinite(resid_out).all()):
            return None, True
        p = quantize(resid_out, quantizer, bits, bucket_size, rounding=rounding, codebook=codebook, key=key,
                     offset=offset, check_finite=False)
        decoded = decode_flat(p)
        resid_out.sub_(torch.from_numpy(decoded) if isinstance(decoded, np.ndarray) else torch.from_dlpack(decoded))
        return p, False
    bucket_size = check_bucket_size(bucket_size)
    if cuda_fused:
        import cupy  # optional: GPU only
        # on torch's current stream, so the kernels are ordered with the ops that made v and resid
        with cupy.cuda.Device(v.device.index or 0), \
                cupy.cuda.ExternalStream(torch.cuda.current_stream(v.device).cuda_stream):
            scales, packed, nonfinite = be.encode_ef(cupy.from_dlpack(v.detach()), cupy.from_dlpack(resid.detach()),
                                                     cupy.from_dlpack(resid_out.detach()), levels, bits, bucket_size,
                                                     k.scale, stochastic, key, offset)
    else:
        scales, packed, nonfinite = be.encode_ef(v.numpy(), resid.numpy(), resid_out.numpy(), levels, bits,
                                                 bucket_size, k.scale, stochastic, key, offset)
    if nonfinite:
        return None, True
    if scales.size and not bool(_isfinite_all(scales)):
        raise ValueError(f"quantize: a bucket's {cb.SCALE_NAMES[k.scale]} scale overflows float32; scale the "
                         f"tensor down or use a max-abs quantizer")
    return Payload(k.name, bits, bucket_size, int(v.numel()), (int(v.numel()),), scales, packed,
                   np.array(levels, dtype=np.float32) if k.adaptive else None, stochastic, "float32",
                   ("torch", v.device, torch.float32)), False


def mean_on_device(payloads, out) -> bool:
    """out = (1/N) sum of the decoded payloads, summed in rank order, on out's CUDA device in one
    pass (the CuPy backend's decode_mean: the payloads' codes and scales go up in one copy, out is
    written once, bit for bit the CPU's decode_mean). Returns False, touching nothing, where that
    does not apply: out not a contiguous float32 CUDA tensor, pass-through payloads, payloads of
    different quantizers, widths, buckets or codebooks, or no CuPy."""
    if not payloads or not (out.is_cuda and out.dtype == torch.float32 and out.is_contiguous()):
        return False
    if any(p.kind.passthrough for p in payloads) or not _one_encoding(payloads):
        return False
    return _on_device(out, lambda arr: mean_payloads_into(arr, payloads))


def _on_device(out, write) -> bool:
    """``write(arr)`` with ``arr`` the CuPy view of the CUDA tensor ``out``, on out's device and
    torch's current stream; False (nothing done) without CuPy."""
    try:
        import cupy  # optional: GPU only
    except ImportError:
        return False
    with cupy.cuda.Device(out.device.index or 0), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(out.device).cuda_stream):
        write(cupy.from_dlpack(out.detach()))
    return True


def mean_payloads_into(out, payloads) -> None:
    """The CuPy side of :func:`mean_on_device`: ``out`` (a contiguous CuPy float32 array) = the
    rank-order mean of payloads of one quantizer, width, bucket size and codebook, whose scales
    and codes are host arrays (received bytes) or device ones."""
    first = payloads[0]
    gpu_backend().decode_mean(out, [p.scales for p in payloads], [p.codes for p in payloads], first.levels,
                              first.bits, first.bucket_size, first.numel)


def decode_on_device(payload, out) -> bool:
    """out[:] = the payload's values, decoded on out's CUDA device in place: a received quantized
    payload's codes and scales go up (b/8 + 4/B bytes per element, one copy each) and the decode
    kernel writes out, with no full-size temporary, on torch's current stream. Returns False,
    touching nothing, where that does not apply: out not a contiguous float32 CUDA tensor, a
    pass-through payload, or no CuPy."""
    if payload.kind.passthrough or not (out.is_cuda and out.dtype == torch.float32 and out.is_contiguous()):
        return False
    return _on_device(out, lambda arr: decode_payload_into(arr, payload))


def decode_payload_into(out, payload) -> None:
    """The CuPy side of :func:`decode_on_device`: ``out`` (a contiguous CuPy float32 array of the
    payload's size, e.g. a shard's slice of a group buffer) = the decoded quantized payload."""
    gpu_backend().decode_into(out, payload.scales, payload.codes, payload.levels, payload.bits, payload.bucket_size,
                              payload.numel)


# ---------------------------------------------------------------------------------------------
# The engine's side: what a link sends, and decoding into the buffers where the values are used.
def encode(vec, link, key: int, offset: int, codebook=None) -> Payload:
    """:func:`quantize` the flat tensor ``vec`` as the :class:`~hvd_qadam.config.LinkSpec`
    ``link`` says (the caller has checked that vec is finite)."""
    return quantize(vec, link.quantizer, link.bits, link.bucket_size, rounding=link.rounding, key=key,
                    offset=offset, codebook=codebook, check_finite=False)


def encode_ef(vec, resid, resid_out, link, key: int, offset: int, codebook=None):
    """(payload, nonfinite): :func:`quantize_ef` of vec + resid as ``link`` says, the new
    residual into resid_out, in one pass."""
    return quantize_ef(vec, resid, resid_out, link.quantizer, link.bits, link.bucket_size,
                       rounding=link.rounding, key=key, offset=offset, codebook=codebook)


def decode_into(payload: Payload, out) -> None:
    """out[:] = the payload's values, decoded where ``out`` is (a flat tensor of the payload's
    size, e.g. a shard's slice of a group buffer): in place by the CPU backend's ``decode_into``
    on the host, by the CuPy kernels on out's CUDA device (:func:`decode_on_device`), else
    decoded on out's device and copied in (pass-through payloads, the NumPy reference)."""
    if payload.numel != out.numel():
        raise ConsistencyError(f"a payload has {payload.numel} elements where {out.numel()} were expected")
    be = cpu_backend()
    if payload.kind.passthrough or not fused_kernels(be).decode_into or out.device.type != "cpu":
        if out.is_cuda and decode_on_device(payload, out):     # in place on the GPU, no temporary
            return
        out.copy_(_decode_on(payload, out.device, out.dtype))
        return
    be.decode_into(out.numpy(), payload.scales, payload.codes, payload.levels, payload.bits,
                   payload.bucket_size, payload.numel)


def mean_into(payloads: list, out):
    """out = (1/N) sum of the decoded payloads, summed in rank order (the same on every topology
    and every backend, bit for bit), and returns out. One pass where the backend has
    ``decode_mean`` and the payloads share one encoding; else decode, add and divide."""
    n = out.numel()
    for src, p in enumerate(payloads):
        if p.numel != n:
            raise ConsistencyError(f"rank {src} sent {p.numel} elements where {n} were expected")
    be = cpu_backend()
    fused = fused_kernels(be)
    if not (out.device.type == "cpu" and fused.decode_into and not any(p.kind.passthrough for p in payloads)):
        if out.is_cuda and mean_on_device(payloads, out):   # one pass on the GPU, out written once
            return out
        # pass-through payloads, or a CUDA buffer (decoded on the device by the CuPy backend)
        for i, p in enumerate(payloads):
            v = _decode_on(p, out.device, out.dtype)
            if i == 0:
                out.copy_(v)
            else:
                out.add_(v)
        out.div_(float(len(payloads)))
        return out
    acc = out.numpy()
    first = payloads[0]
    if fused.decode_mean and _one_encoding(payloads):
        # one pass: every payload decoded and added per cache block, out written once
        be.decode_mean(acc, [p.scales for p in payloads], [p.codes for p in payloads], first.levels, first.bits,
                       first.bucket_size, n)
        return out
    last = len(payloads) - 1
    for i, p in enumerate(payloads):
        if i == 0:
            be.decode_into(acc, p.scales, p.codes, p.levels, p.bits, p.bucket_size, n)
        else:
            be.decode_add(acc, p.scales, p.codes, p.levels, p.bits, p.bucket_size, n,
                          divisor=len(payloads) if i == last else None)
    return out


def _one_encoding(payloads) -> bool:
    """Whether the payloads share quantizer, width, bucket size and codebook, so that one
    ``decode_mean`` pass averages them."""
    first = payloads[0]
    return all(p.quantizer == first.quantizer and p.bits == first.bits and p.bucket_size == first.bucket_size
               and np.array_equal(to_host(p.levels), to_host(first.levels)) for p in payloads)


def _decode_on(payload: Payload, device, dtype=None):
    """Decode where the result is needed: payloads received from the wire are host bytes; for a
    CUDA buffer their codes and scales go up (1/8 of fp32 at 4 bits) and the CuPy kernels decode
    on the device, so full-size tensors never cross PCIe. ``dtype``: float32 unless given."""
    dtype = torch.float32 if dtype is None else dtype
    if payload.kind.passthrough and isinstance(payload.codes, np.ndarray) and payload.codes.dtype.itemsize == 2:
        # fp16 / bf16 values go to the device at their wire width and are widened there (exactly)
        raw = torch.from_numpy(np.ascontiguousarray(payload.codes).view(np.int16)).to(device)
        return raw.view(torch.bfloat16 if payload.quantizer == "bf16" else torch.float16).to(dtype)
    if device.type == "cuda" and not payload.kind.passthrough and isinstance(payload.codes, np.ndarray):
        import cupy  # optional: GPU only
        with cupy.cuda.Device(device.index or 0):
            levels = cupy.asarray(payload.levels)
            arr = gpu_backend().decode(cupy.asarray(payload.scales), cupy.asarray(payload.codes), levels,
                                       payload.bits, payload.bucket_size, payload.numel)
        return _as_tensor(arr, device, dtype)
    return _as_tensor(decode_flat(payload), device, dtype)


def _as_tensor(arr, device, dtype):
    """A decoded NumPy or CuPy array as a ``dtype`` torch tensor on ``device`` (DLPack: no copy
    for CuPy on the same device). A float64 pass-through decodes to float64, so an exact float64
    group's values are never narrowed on the way."""
    t = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else torch.from_dlpack(arr)
    return t.to(device=device, dtype=dtype)
