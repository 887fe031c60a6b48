"""NumPy reference implementation of the quantizer family: the oracle every fast kernel matches.

Semantics (all element arithmetic in float32, scales reduced in float64 and rounded once):
  scale s_k per bucket: l2 = sqrt(sum x^2), maxabs = max |x|, meanabs = sum |x| / len(bucket)
  r = clip(x / s_k, l_0, l_{K-1})       (r = 0 where s_k == 0: zero buckets decode to zeros)
  j = largest index with l_j <= r, clipped to 0..K-2
  p = (r - l_j) / (l_{j+1} - l_j)
  uniform grids l_i = (i - m) / m (qsgd, qsgdinf, terngrad): the same in exact arithmetic,
      computed as t = r * m + m (float32, two roundings), j = min(floor(t), K-2), p = t - j
      (exact), so no search and no division is needed
  stochastic: code = j + (u < p), u = uniforms(key, offset + i);   nearest: code = j + (p >= 0.5)
  decode: l_code * s_k
Codes are packed LSB-first into a dense bit stream: code i occupies bits [i*b, (i+1)*b).
This module is the oracle and nothing else: sizes, argument checks and the tables the fast
kernels share live in :mod:`.common`.
"""
from __future__ import annotations

import numpy as np

from .codebooks import SCALE_L2, SCALE_MAXABS, SCALE_MEANABS
from .common import num_buckets, packed_nbytes, uniform_grid_m
from .rng import uniforms


def _per_element(scales: np.ndarray, bucket_size: int, n: int) -> np.ndarray:
    """Each element's bucket scale. A bucket wider than the vector is repeated n times, not
    bucket_size times (a valid payload may declare buckets up to 2^31 wide)."""
    return np.repeat(scales, min(bucket_size, n))[:n]


def bucket_scales(x: np.ndarray, bucket_size: int, scale_kind: int) -> np.ndarray:
    n = x.size
    nb = num_buckets(n, bucket_size)
    pad = nb * bucket_size - n
    xd = np.abs(x.astype(np.float64))
    if pad:
        xd = np.concatenate([xd, np.zeros(pad)])
    xd = xd.reshape(nb, bucket_size)
    if scale_kind == SCALE_L2:
        s = np.sqrt(np.einsum("ij,ij->i", xd, xd))
    elif scale_kind == SCALE_MAXABS:
        s = xd.max(axis=1)
    elif scale_kind == SCALE_MEANABS:
        counts = np.full(nb, bucket_size, dtype=np.float64)
        if pad:
            counts[-1] = bucket_size - pad
        s = xd.sum(axis=1) / counts
    else:
        raise ValueError(f"unknown scale kind {scale_kind}")
    return s.astype(np.float32)


def quantize_codes(x: np.ndarray, scales: np.ndarray, levels: np.ndarray, bucket_size: int,
                   stochastic: bool, key: int, offset: int = 0) -> np.ndarray:
    """One uint8 code per element (unpacked)."""
    n = x.size
    s = _per_element(scales, bucket_size, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s > 0, x / s, np.float32(0)).astype(np.float32)
    r = np.clip(r, levels[0], levels[-1])
    K = levels.size
    m = uniform_grid_m(levels)
    if m:
        nan = np.isnan(r)
        fm = np.float32(m)
        t = (np.where(nan, levels[0], r) * fm + fm).astype(np.float32)   # in [0, 2m]
        j = np.minimum(t.astype(np.int64), K - 2)
        p = t - j.astype(np.float32)
        j = np.where(nan, K - 2, j)              # as np.searchsorted places NaN, and p = NaN
        p = np.where(nan, np.float32(np.nan), p).astype(np.float32)
    else:
        j = np.clip(np.searchsorted(levels, r, side="right") - 1, 0, K - 2)
        lo = levels[j]
        hi = levels[j + 1]
        p = (r - lo) / (hi - lo)
    if stochastic:
        up = uniforms(key, offset, n) < p
    else:
        up = p >= np.float32(0.5)
    return (j + up).astype(np.uint8)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, levels: np.ndarray, bucket_size: int) -> np.ndarray:
    n = codes.size
    s = _per_element(scales, bucket_size, n)
    return (levels[codes] * s).astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    n = codes.size
    if bits == 8:
        return codes.astype(np.uint8, copy=True)
    shifts = np.arange(bits, dtype=np.uint8)
    bitplane = ((codes[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    out = np.packbits(bitplane, bitorder="little")
    assert out.size == packed_nbytes(n, bits)
    return out


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return packed[:n].astype(np.uint8, copy=True)
    bitplane = np.unpackbits(packed, count=n * bits, bitorder="little").reshape(n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (bitplane.astype(np.uint16) @ weights).astype(np.uint8)


def encode(x: np.ndarray, levels: np.ndarray, bits: int, bucket_size: int, scale_kind: int,
           stochastic: bool, key: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fp32 vector -> (scales float32[num_buckets], packed uint8[ceil(n*bits/8)])."""
    scales = bucket_scales(x, bucket_size, scale_kind)
    codes = quantize_codes(x, scales, levels, bucket_size, stochastic, key, offset)
    return scales, pack_codes(codes, bits)


def decode(scales: np.ndarray, packed: np.ndarray, levels: np.ndarray, bits: int, bucket_size: int,
           n: int) -> np.ndarray:
    return dequantize_codes(unpack_codes(packed, bits, n), scales, levels, bucket_size)
