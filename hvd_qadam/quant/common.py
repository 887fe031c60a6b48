"""What every quantizer backend shares: sizes, argument checks, the level tables the kernels
search, the constants of NumPy's summation orders, and telling CuPy arrays from NumPy ones.

The NumPy reference (:mod:`.reference`) defines the results; the numba (:mod:`.cpu_numba`) and
CUDA (:mod:`.gpu_cupy`) kernels reproduce them bit for bit, which for the bucket scales means
summing in the order NumPy sums inside the reference. The reductions all backends share:

  * ``l2``: sqrt of the float64 sum of squares in np.einsum's order: two lanes, each chaining
    four products per step of 8 elements (elements 6, 4, 2, 0 into lane 0; 7, 5, 3, 1 into
    lane 1), the tail alternating between the lanes, the lanes added at the end. The single row
    of a one-bucket vector is summed in :data:`EINSUM_BUFFER`-element pieces (NumPy's iterator
    buffer), the pieces' sums added in order.
  * ``meanabs``: NumPy's pairwise summation of float64 |x| over the zero-padded bucket: halves
    cut at a multiple of 8, recursively, down to leaves of at most :data:`PAIRWISE_LEAF`
    elements, each leaf summed with 8 accumulators combined as ((0+1)+(2+3))+((4+5)+(6+7)); the
    sum divided by the bucket's true length.
  * ``maxabs``: order-free; the kernels take the maximum of the bit patterns with the sign
    cleared (:data:`F32_ABS_MASK`; a pattern above :data:`F32_INF_BITS` is a NaN).
Every sum is rounded once to float32.

This module imports only from :mod:`hvd_qadam.quant`; nothing in the package below the API
reaches above it.
"""
from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import numpy as np

from .codebooks import SCALE_L2, SCALE_MAXABS, SCALE_MEANABS, QuantizerError, validate_codebook
from .rng import MASK64

MAX_BITS = 8
TABLE_WIDTH = 1 << MAX_BITS       # entries of each level table: a codebook has at most 2^8 levels
MAX_BUCKET_SIZE = 2 ** 31         # the widest bucket a payload may declare
EINSUM_BUFFER = 8192              # NumPy's iterator buffer (see l2 above); also the GPU's piece size
PAIRWISE_LEAF = 128               # NumPy's pairwise-summation leaf (see meanabs above)
F32_ABS_MASK = 0x7FFFFFFF         # float32 bit pattern without its sign
F32_INF_BITS = 0x7F800000         # the pattern of +inf; anything above it is a NaN


# ----------------------------------------------------------------------------- sizes

def num_buckets(n: int, bucket_size: int) -> int:
    return -(-n // bucket_size)


def packed_nbytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def check_decode_sizes(n_scales: int, n_packed: int, n: int, bits: int, bucket_size: int) -> None:
    """The scales and packed codes handed to a decode kernel must cover ``n`` elements."""
    if n_scales != num_buckets(n, bucket_size):
        raise ValueError(f"decode: {n_scales} scales for {n} elements in buckets of {bucket_size}")
    if n_packed < packed_nbytes(n, bits):
        raise ValueError(f"decode: {n_packed} code bytes; {n} elements at {bits} bits need "
                         f"{packed_nbytes(n, bits)}")


# ----------------------------------------------------------------------------- argument checks

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_bits(bits) -> int:
    """A kernel's bit width: an integer in 1..8 (which quantizer allows which is codebooks')."""
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def check_bucket_size(bucket_size) -> int:
    """A bucket size: a positive integer no larger than the wire format carries (2^31)."""
    if not _is_int(bucket_size) or bucket_size < 1:
        raise QuantizerError(f"bucket_size must be a positive integer, got {bucket_size!r}")
    if bucket_size > MAX_BUCKET_SIZE:
        raise QuantizerError(f"bucket_size {bucket_size} is larger than the wire format allows (2^31)")
    return int(bucket_size)


def check_scale_kind(scale_kind) -> int:
    if scale_kind not in (SCALE_L2, SCALE_MAXABS, SCALE_MEANABS):
        raise ValueError(f"unknown scale kind {scale_kind}")
    return int(scale_kind)


def check_offset(offset) -> int:
    if int(offset) < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return int(offset)


def check_kernel_args(levels, bits, bucket_size) -> tuple[np.ndarray, int, int]:
    """(levels as a contiguous float32 host array, bits, bucket_size), validated the same way for
    every backend: bits in 1..8, a valid bucket size, a codebook that validate_codebook accepts
    (finite, strictly increasing, inside [-1, 1], 2..2^bits levels)."""
    bits = check_bits(bits)
    bucket_size = check_bucket_size(bucket_size)
    lv = np.ascontiguousarray(validate_codebook(to_host(levels), bits), dtype=np.float32)
    return lv, bits, bucket_size


def stream_key_u64(key) -> np.uint64:
    """A stream key as the kernels take it (wrapped to 64 bits)."""
    return np.uint64(int(key) & MASK64)


# ----------------------------------------------------------------------------- level tables

class LevelTables(NamedTuple):
    """The per-codebook tables the kernels search and decode with (float32[TABLE_WIDTH] each,
    read-only)."""
    levels: np.ndarray      # l_0 .. l_{K-1}, zero padded
    widths: np.ndarray      # l_{j+1} - l_j in float32 (as the reference subtracts), zero padded
    search: np.ndarray      # l_0 .. l_{K-2} padded with +inf: the last entry <= r is j
    decode: np.ndarray      # l_0 .. l_{K-1} padded with NaN: a code past the codebook decodes to NaN
    params: np.ndarray      # [0] = m of a uniform grid (see uniform_grid_m), else 0; zero padded
    search_steps: int       # binary search steps over j = 0 .. K-2


@functools.lru_cache(maxsize=64)
def _level_tables(level_bytes: bytes) -> LevelTables:
    lv = np.frombuffer(level_bytes, dtype=np.float32)
    k = lv.size
    levels = np.zeros(TABLE_WIDTH, np.float32)
    levels[:k] = lv
    widths = np.zeros(TABLE_WIDTH, np.float32)
    widths[:k - 1] = lv[1:] - lv[:-1]
    search = np.full(TABLE_WIDTH, np.inf, np.float32)
    search[:k - 1] = lv[:-1]
    decode = np.full(TABLE_WIDTH, np.nan, np.float32)
    decode[:k] = lv
    params = np.zeros(TABLE_WIDTH, np.float32)
    params[0] = uniform_grid_m(lv)
    for table in (levels, widths, search, decode, params):
        table.flags.writeable = False
    return LevelTables(levels, widths, search, decode, params, max(0, int(k - 2).bit_length()))


def uniform_grid_m(levels) -> int:
    """m when the codebook is the uniform grid l_i = float32(i - m) / float32(m), i = 0..2m
    (qsgd, qsgdinf, terngrad; checked level by level), else 0. Such codebooks are quantized
    with the grid formula of :func:`hvd_qadam.quant.reference.quantize_codes` (no search and no
    division past r = x / s), by every backend alike."""
    lv = np.asarray(levels, dtype=np.float32).reshape(-1)
    k = lv.size
    if k < 3 or k % 2 == 0:
        return 0
    m = (k - 1) // 2
    grid = (np.arange(k, dtype=np.float32) - np.float32(m)) / np.float32(m)
    return m if np.array_equal(grid, lv) else 0


def level_tables(levels) -> LevelTables:
    """The :class:`LevelTables` of a sorted float32 codebook (cached: adaptive codebooks change
    rarely)."""
    return _level_tables(np.ascontiguousarray(levels, dtype=np.float32).tobytes())


# ----------------------------------------------------------------------------- NumPy or CuPy

def is_cupy(a) -> bool:
    """Whether ``a`` is a CuPy array (without importing CuPy)."""
    return type(a).__module__.startswith("cupy")


def to_host(a):
    """A CuPy array copied to a NumPy one; anything else unchanged."""
    return a.get() if is_cupy(a) else a


def array_module(a):
    """cupy for CuPy arrays, numpy for everything else."""
    return importlib.import_module("cupy") if is_cupy(a) else np


# ----------------------------------------------------------------------------- bfloat16 values
# NumPy has no bfloat16, so bf16 values are carried as their uint16 bit patterns: the upper half
# of the float32 pattern. BF16_EXP_MASK's bits all set is inf or NaN.
BF16_EXP_MASK = 0x7F80
BF16_QUIET_NAN = 0x7FC0


def bf16_bits(x):
    """The bfloat16 bit patterns (uint16) of a contiguous float32 NumPy or CuPy array, rounded to
    nearest, ties to even, as torch converts: pattern = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    with u the float32 pattern (no wrap-around: a finite u is at most 0xFF7FFFFF). A finite value
    beyond bf16's largest (3.3895e38 plus half a step) rounds to inf, as in torch; NaN stays a
    quiet NaN of its sign."""
    xp = array_module(x)
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    r = (u + ((u >> xp.uint32(16)) & xp.uint32(1)) + xp.uint32(0x7FFF)) >> xp.uint32(16)
    nan = (u & xp.uint32(F32_ABS_MASK)) > xp.uint32(F32_INF_BITS)
    if bool(nan.any()):
        r = xp.where(nan, (u >> xp.uint32(16)) | xp.uint32(BF16_QUIET_NAN), r)
    return r.astype(xp.uint16)


def bf16_values(bits):
    """Float32 values of bfloat16 bit patterns (exact: every bf16 value is a float32 value)."""
    xp = array_module(bits)
    return (xp.ascontiguousarray(bits, dtype=xp.uint16).astype(xp.uint32) << xp.uint32(16)).view(xp.float32)


def bf16_finite(bits):
    """Elementwise: whether bfloat16 bit patterns are finite."""
    xp = array_module(bits)
    return (bits & xp.uint16(BF16_EXP_MASK)) != xp.uint16(BF16_EXP_MASK)
