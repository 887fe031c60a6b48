"""numba CPU kernels for the quantizer family, bit-identical to :mod:`hvd_qadam.quant.reference`.

Same functions as the reference (``encode``, ``decode``) plus ``decode_add`` (acc += decode(...)
in place, used when averaging several workers' payloads; with ``divisor`` the last payload of a
mean), ``decode_into`` (decode into a caller's buffer) and ``encode_ef`` (error feedback and
quantization in one pass). :func:`hvd_qadam.warmup.compile_kernels` compiles (or loads from the
on-disk cache) every kernel the way the library calls them.

How the output stays identical to the NumPy reference:
  * Element arithmetic is float32 in the reference's order: r = x / s, clip, p = (r - l_j) / w_j
    with w_j = l_{j+1} - l_j, code = j + (u < p) or j + (p >= 0.5); decode = l_code * s. Kernels
    are compiled without fastmath, so LLVM neither reassociates nor contracts to FMA, and
    divisions stay divisions.
  * Uniform grids l_i = float32(i - m) / m (qsgd, qsgdinf, terngrad: common.uniform_grid_m) use
    the reference's grid formula t = r * m + m, j = min(floor(t), K-2), p = t - j: one
    division per element (r = x / s) instead of a search and two more.
  * Other codebooks: j (the largest level <= r, clipped to 0..K-2) always equals
    np.searchsorted's. It comes from comparisons with the float32 levels themselves: counting
    the levels <= r (K <= 16, levels held in registers), stepping up from a start read from a
    table indexed by r's float bits (large codebooks), or a binary search.
  * Inputs with inf or NaN (which the API refuses by default) get the reference's codes too; only
    a NaN scale's payload bits may differ.
  * Bucket scales accumulate in float64 and round once to float32. The summation order mirrors
    the one NumPy uses inside the reference, so even the float64 sums agree (the orders are
    spelled out in :mod:`.common`, shared with the CUDA kernels): the L2 sum follows np.einsum's
    2-lane, 4x-unrolled loop (a single-bucket vector in 8192-element buffers, as NumPy's
    iterator does), and the mean |x| follows NumPy's pairwise summation over the zero-padded
    bucket. maxabs is order-free. Should another NumPy build sum in another order, only the last
    float64 bits can differ, which changes the float32 scale only when the sum lies within those
    bits of a float32 rounding boundary.
  * Uniforms come from the counter-based 32-bit hash of :mod:`.rng` (uint32 arithmetic, eight
    lanes per AVX2 instruction).

Work is split into tasks of whole buckets that start on a multiple of 8 elements (8 codes of b
bits fill exactly b bytes, so every task writes its own whole bytes): each task computes its
scales and then quantizes and packs them while the data is still in cache. Vectors with very few
(long) buckets compute the scales first and then split the elements. Inside a task, whole
buckets of the common cases (a uniform grid at 4 or 8 bits, or two levels at 1 bit, with
buckets of a multiple of 8 elements: the defaults and sign) take one loop per bucket over its
bytes (see "byte-aligned buckets" below); everything else goes through blocks of 512 in simple
loops that LLVM vectorizes. Two rules keep them vectorizable:
loops index slices from 0 (numba's negative-index wrap-around on a runtime offset would turn
every access into a select), and the parallel bodies only call separately compiled functions.
"""
from __future__ import annotations

import contextlib
import functools
import math

import numba
import numpy as np
from numba import njit, prange

from .codebooks import SCALE_L2, SCALE_MAXABS
from .common import (EINSUM_BUFFER, F32_ABS_MASK, F32_INF_BITS, PAIRWISE_LEAF, TABLE_WIDTH, check_decode_sizes,
                     check_kernel_args, check_offset, check_scale_kind, level_tables, num_buckets, packed_nbytes,
                     stream_key_u64)
from .rng import HASH_A, HASH_B, HASH_C1, HASH_C2, HASH_SHIFTS, MASK32, UNIFORM_SCALE, UNIFORM_SHIFT

_U32_HASH_A, _U32_HASH_B = np.uint32(HASH_A), np.uint32(HASH_B)
_U32_HASH_C1, _U32_HASH_C2 = np.uint32(HASH_C1), np.uint32(HASH_C2)
_U32_SHIFT1, _U32_SHIFT2, _U32_SHIFT3 = (np.uint32(s) for s in HASH_SHIFTS)
_U32_UNIFORM_SHIFT = np.uint32(UNIFORM_SHIFT)
_U64_MASK32 = np.uint64(MASK32)
_U64_32 = np.uint64(32)
_F32_UNIFORM_SCALE = np.float32(UNIFORM_SCALE)
_F32_HALF = np.float32(0.5)
_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
_ABS_MASK = np.uint32(F32_ABS_MASK)
_INF_BITS = np.uint32(F32_INF_BITS)

_BLOCK = 512            # elements per stage-by-stage block (scratch stays in L1)
_TASK = 1 << 15         # target elements per parallel task
_EINSUM_BUFFER = EINSUM_BUFFER    # einsum sums a single long row in pieces of this
_PAIRWISE_BLOCK = PAIRWISE_LEAF   # NumPy's pairwise summation leaf size
# How j is found: compare r with every level held in registers (K <= 2, 8 or 16 slots), the
# uniform grid formula, start from a table indexed by r's float pattern, or binary-search the
# levels.
_SEARCH_COUNT2, _SEARCH_COUNT8, _SEARCH_COUNT16 = 0, 1, 2
_SEARCH_UNIFORM, _SEARCH_LOOKUP, _SEARCH_BISECT = 3, 4, 5
# _SEARCH_LOOKUP's table: one entry per (sign, top 14 bits of |r|'s pattern); |r| <= 1 has a
# pattern <= 0x3F800000, so 14 bits after a shift of 16 cover it (cells 2^-7 wide relative).
_CELL_SHIFT = 16
_CELL_MAGNITUDES = 1 << 14
_CELL_SIGN_SHIFT = 14
_MAX_CORRECTIONS = 4  # a codebook needing more steps per cell is binary-searched instead
_NO_CELL_INDEX = np.zeros(1, np.uint8)
_COUNT_METHODS = ((2, _SEARCH_COUNT2), (8, _SEARCH_COUNT8), (16, _SEARCH_COUNT16))
# Rows of the per-codebook float32 table (TABLE_WIDTH columns: up to 2^8 levels).
_LEVELS, _WIDTHS, _COUNT_LOW, _COUNT_HIGH, _SEARCH = 0, 1, 2, 3, 4
_GRID_SLOT = TABLE_WIDTH  # in a decode table (_decode_table), after the levels: m of a uniform grid
_NUM_TABLES = 5
# What _decode_span does with the codes: write, add, only check them, subtract (the error-feedback
# residual p - decode(q) formed in place), or add and divide (the last payload of a mean).
_DECODE, _DECODE_ADD, _CHECK_CODES, _DECODE_SUB, _DECODE_ADD_DIV = 0, 1, 2, 3, 4
_MIN_BUCKET_TASKS = 8  # with fewer buckets, scales and quantization are parallelised separately
# Below this many elements a kernel runs on the calling thread alone: waking the other threads
# costs more than it saves, and on a busy machine a parallel region waits for its slowest
# thread to be scheduled at all (milliseconds).
_SERIAL_BELOW = 1 << 16

# Kernel options: compiled once and cached on disk (NUMBA_CACHE_DIR is honoured by numba);
# never fastmath (bit-identity); numpy error model so float division has no zero check.
_JIT = dict(cache=True, nogil=True, error_model="numpy")
_INLINE = dict(inline="always", **_JIT)


# ----------------------------------------------------------------------------- bucket scales

@njit(**_INLINE)
def _einsum_step(v, i, lane0, lane1):
    """One step of np.einsum's float64 sum of squares over v[i:i+8] (i unsigned, so the loads
    need no negative-index wrap-around): two lanes, each chaining four products (elements 6,
    4, 2, 0 into lane 0; 7, 5, 3, 1 into lane 1)."""
    e0 = np.float64(v[i])
    e1 = np.float64(v[i + np.uint64(1)])
    e2 = np.float64(v[i + np.uint64(2)])
    e3 = np.float64(v[i + np.uint64(3)])
    e4 = np.float64(v[i + np.uint64(4)])
    e5 = np.float64(v[i + np.uint64(5)])
    e6 = np.float64(v[i + np.uint64(6)])
    e7 = np.float64(v[i + np.uint64(7)])
    t0 = e6 * e6 + lane0
    t1 = e7 * e7 + lane1
    t0 = e4 * e4 + t0
    t1 = e5 * e5 + t1
    t0 = e2 * e2 + t0
    t1 = e3 * e3 + t1
    return e0 * e0 + t0, e1 * e1 + t1


@njit(**_INLINE)
def _einsum_finish(v, lane0, lane1):
    """The elements after the last full step (einsum's zero-filled vectors: a missing odd
    element adds nothing), then the two lanes added."""
    n8 = v.size - v.size % 8
    for i in range(n8, v.size):
        sq = np.float64(v[i]) * np.float64(v[i])
        if (i - n8) % 2 == 0:
            lane0 = sq + lane0
        else:
            lane1 = sq + lane1
    return lane0 + lane1


@njit(**_INLINE)
def _sumsq_einsum_order(v):
    """Sum of float64 squares of v in np.einsum's order."""
    lane0 = 0.0
    lane1 = 0.0
    for q in range(v.size // 8):
        lane0, lane1 = _einsum_step(v, np.uint64(8 * q), lane0, lane1)
    return _einsum_finish(v, lane0, lane1)


@njit(**_INLINE)
def _sumsq_einsum_order4(rows, sums):
    """_sumsq_einsum_order of the 4 rows of ``rows`` at once: each sum is one long chain of
    dependent additions, so four of them interleaved keep the adders busy."""
    a0 = a1 = b0 = b1 = c0 = c1 = d0 = d1 = 0.0
    ra, rb, rc, rd = rows[0], rows[1], rows[2], rows[3]
    n = rows.shape[1]
    for q in range(n // 8):
        i = np.uint64(8 * q)
        a0, a1 = _einsum_step(ra, i, a0, a1)
        b0, b1 = _einsum_step(rb, i, b0, b1)
        c0, c1 = _einsum_step(rc, i, c0, c1)
        d0, d1 = _einsum_step(rd, i, d0, d1)
    sums[0] = _einsum_finish(ra, a0, a1)
    sums[1] = _einsum_finish(rb, b0, b1)
    sums[2] = _einsum_finish(rc, c0, c1)
    sums[3] = _einsum_finish(rd, d0, d1)


@njit(**_INLINE)
def _l2_scale(v, single_bucket):
    if single_bucket:  # einsum over a single row runs through NumPy's 8192-element buffers
        total = 0.0
        for c in range(0, v.size, _EINSUM_BUFFER):
            total += _sumsq_einsum_order(v[c:c + _EINSUM_BUFFER])
    else:
        total = _sumsq_einsum_order(v)
    return np.float32(math.sqrt(total))


@njit(**_INLINE)
def _pairwise_leaf(v, lo, n):
    """One leaf (n <= 128) of NumPy's pairwise sum of float64 |v[lo:lo+n]|; positions at or past
    v.size are zeros (the reference pads the last bucket with zeros)."""
    if lo >= v.size:
        return 0.0
    if n < 8:
        res = 0.0
        for i in range(lo, min(lo + n, v.size)):
            res += abs(np.float64(v[i]))
        return res
    n8 = n - n % 8
    if lo + n <= v.size:  # the whole leaf is data: NumPy's 8-accumulator loop
        leaf = v[lo:lo + n]
        r0 = abs(np.float64(leaf[0]))
        r1 = abs(np.float64(leaf[1]))
        r2 = abs(np.float64(leaf[2]))
        r3 = abs(np.float64(leaf[3]))
        r4 = abs(np.float64(leaf[4]))
        r5 = abs(np.float64(leaf[5]))
        r6 = abs(np.float64(leaf[6]))
        r7 = abs(np.float64(leaf[7]))
        i = np.uint64(8)   # unsigned: no negative-index wrap-around on every access
        while i < np.uint64(n8):
            r0 += abs(np.float64(leaf[i]))
            r1 += abs(np.float64(leaf[i + np.uint64(1)]))
            r2 += abs(np.float64(leaf[i + np.uint64(2)]))
            r3 += abs(np.float64(leaf[i + np.uint64(3)]))
            r4 += abs(np.float64(leaf[i + np.uint64(4)]))
            r5 += abs(np.float64(leaf[i + np.uint64(5)]))
            r6 += abs(np.float64(leaf[i + np.uint64(6)]))
            r7 += abs(np.float64(leaf[i + np.uint64(7)]))
            i += np.uint64(8)
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(lo + n8, lo + n):
            res += abs(np.float64(v[i]))
        return res
    # A leaf that runs past the data: skipping the padding zeros adds exactly what they would.
    acc = np.zeros(8, np.float64)
    for i in range(lo, min(lo + n8, v.size)):
        acc[(i - lo) % 8] += abs(np.float64(v[i]))
    res = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for i in range(lo + n8, min(lo + n, v.size)):
        res += abs(np.float64(v[i]))
    return res


@njit(**_JIT)
def _pairwise_abs_sum(v, n):
    """NumPy's pairwise summation of float64 |v| over a zero-padded length n: halves (cut at a
    multiple of 8) summed recursively down to leaves of <= 128. Evaluated with an explicit stack
    (numba's on-disk cache does not reload self-recursive functions reliably)."""
    if n <= _PAIRWISE_BLOCK:
        return _pairwise_leaf(v, 0, n)
    depth = 64  # ample: every level halves n
    lo_stack = np.empty(depth, np.int64)
    n_stack = np.empty(depth, np.int64)
    state = np.empty(depth, np.int64)      # 0: left half next, 1: right half next, 2: combine
    values = np.empty(depth, np.float64)
    top = 0
    num_values = 0
    lo_stack[0] = 0
    n_stack[0] = n
    state[0] = 0
    while top >= 0:
        lo = lo_stack[top]
        m = n_stack[top]
        if m <= _PAIRWISE_BLOCK or lo >= v.size:   # a leaf, or padding only (sums to exactly 0)
            values[num_values] = _pairwise_leaf(v, lo, m)
            num_values += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if state[top] == 0:
            state[top] = 1
            top += 1
            lo_stack[top] = lo
            n_stack[top] = half
            state[top] = 0
        elif state[top] == 1:
            state[top] = 2
            top += 1
            lo_stack[top] = lo + half
            n_stack[top] = m - half
            state[top] = 0
        else:
            num_values -= 1
            values[num_values - 1] = values[num_values - 1] + values[num_values]
            top -= 1
    return values[0]


@njit(**_INLINE)
def _maxabs_scale(bits):
    """max |x| from the bit patterns: for finite floats |x| orders like its bits with the sign
    cleared, and an unsigned integer max vectorizes where a float max would not."""
    m = np.uint32(0)
    for i in range(bits.size):
        v = bits[i] & _ABS_MASK
        m = v if v > m else m
    if m > _INF_BITS:
        return np.float32(np.nan)  # a NaN in the bucket (the API refuses non-finite input)
    # Back to float32 exactly: (2^23 + mantissa) * 2^(exponent - 150), or mantissa * 2^-149
    # when subnormal; both are exact in float64 (inf comes out as 2^128, which rounds to inf).
    exponent = np.int64(m >> np.uint32(23))
    mantissa = np.float64(m & np.uint32(0x7FFFFF))
    if exponent == 0:
        return np.float32(math.ldexp(mantissa, -149))
    return np.float32(math.ldexp(mantissa + 8388608.0, exponent - 150))


@njit(**_JIT)
def _bucket_scales(x, x_bits, k0, k1, bucket_size, scale_kind, single_bucket, scales):
    """scales[k] for buckets k0..k1-1."""
    n = x.size
    if scale_kind == SCALE_L2 and not single_bucket:
        # whole buckets four at a time (see _sumsq_einsum_order4); the rest below
        sums = np.empty(4, np.float64)
        full_end = min(k1, n // bucket_size)
        while k0 + 4 <= full_end:
            _sumsq_einsum_order4(x[k0 * bucket_size:(k0 + 4) * bucket_size].reshape((4, bucket_size)), sums)
            for q in range(4):
                scales[k0 + q] = np.float32(math.sqrt(sums[q]))
            k0 += 4
    for k in range(k0, k1):
        start = k * bucket_size
        stop = min(start + bucket_size, n)
        if scale_kind == SCALE_L2:
            scales[k] = _l2_scale(x[start:stop], single_bucket)
        elif scale_kind == SCALE_MAXABS:
            scales[k] = _maxabs_scale(x_bits[start:stop])
        else:  # mean |x| over the bucket's true length
            total = _pairwise_abs_sum(x[start:stop], bucket_size)
            scales[k] = np.float32(total / np.float64(stop - start))


# ----------------------------------------------------------------------------- quantize

@njit(**_INLINE)
def _stream(key, base):
    """The run of draws of elements base, base + 1, ... of stream ``key`` (rng's hash):
    (k_lo + i_hi(base) * B, k_hi, i_lo(base)). Callers compute it outside the compiled function
    that loops over the elements and pass it in: the loop then does 32-bit arithmetic only and
    vectorizes eight lanes wide (computed in the same function, LLVM widened the hash to 64-bit
    lanes, measured no faster than SplitMix64)."""
    k_lo = np.uint32(key & _U64_MASK32)
    hi_term = np.uint32(np.uint32(base >> _U64_32) * _U32_HASH_B)
    return np.uint32(k_lo + hi_term), np.uint32(key >> _U64_32), np.uint32(base & _U64_MASK32)


@njit(**_INLINE)
def _uniform(run, q):
    """rng.uniforms(key, base + q, 1)[0] for ``run = _stream(key, base)`` and 0 <= q < 2^32. Where
    i_lo wraps past 2^32 inside the run, i_hi is one more: B more in the additive term."""
    k_add, k_hi, lo0 = run
    lo = np.uint32(lo0 + np.uint32(q))
    k_add = k_add if lo >= lo0 else np.uint32(k_add + _U32_HASH_B)
    x = np.uint32(np.uint32(lo * _U32_HASH_A) + k_add)
    x = np.uint32(x ^ (x >> _U32_SHIFT1))
    x = np.uint32(x * _U32_HASH_C1)
    x = np.uint32(x ^ k_hi)
    x = np.uint32(x ^ (x >> _U32_SHIFT2))
    x = np.uint32(x * _U32_HASH_C2)
    x = np.uint32(x ^ (x >> _U32_SHIFT3))
    return np.float32(x >> _U32_UNIFORM_SHIFT) * _F32_UNIFORM_SCALE


@njit(**_INLINE)
def _normalise(xv, s, first, last):
    """r = clip(x / s, l_0, l_{K-1}); a zero scale gives r = 0 (the quotient is then unused)."""
    q = xv / s
    v = q if s > _F32_ZERO else _F32_ZERO
    v = first if v < first else v
    return last if v > last else v


@njit(**_INLINE)
def _round(r, j, lo, w, stochastic, run, q):
    """The code: j, or j + 1 with probability p = (r - l_j) / w_j (stochastic) or when p >= 1/2."""
    p = (r - lo) / w
    if stochastic:
        return j + (1 if _uniform(run, q) < p else 0)
    return j + (1 if p >= _F32_HALF else 0)


@njit(**_INLINE)
def _search_input(r, first):
    """r as the searches see it: NaN (only from inf/NaN input, which the API refuses) becomes a
    harmless number; _nan_code then gives such elements the reference's code."""
    return r if r == r else first


@njit(**_INLINE)
def _nan_code(r, code, top_j):
    """np.searchsorted puts NaN after every level, so the reference gives j = K-2, and p = NaN
    never rounds up: the code is K-2."""
    return code if r == r else top_j


@njit(**_INLINE)
def _fill_scales(scales, bucket_size, b0, block_scale):
    """block_scale[e] = scale of element b0 + e, one constant run per bucket."""
    e = 0
    k = b0 // bucket_size
    while e < block_scale.size:
        run_end = min((k + 1) * bucket_size - b0, block_scale.size)
        block_scale[e:run_end] = scales[k]
        e = run_end
        k += 1


@njit(**_INLINE)
def _levels_of(codes, table, levels):
    """levels[e] = the level of codes[e] from a decode table (_decode_table): looked up, or for
    a uniform grid computed as float32(c - m) / m, which is exactly the table's entry (the grid
    was checked level by level) and vectorizes where a table lookup does not."""
    fm = table[_GRID_SLOT]
    if fm > _F32_ZERO:
        m = np.int32(fm)
        for e in range(codes.size):
            levels[e] = np.float32(np.int32(codes[e]) - m) / fm
    else:
        for e in range(codes.size):
            levels[e] = table[codes[e]]


@njit(**_INLINE)
def _search_count(r, low_slots, high_slots, top, slots):
    """(j, l_j, l_{j+1} - l_j) by comparing r with every interior level. ``slots`` is a
    compile-time constant (2, 8 or 16), so the level loops unroll and the caller's element loop
    vectorizes with the levels in registers. low_slots = l_0..l_{K-2} padded with +inf (never
    <= r); high_slots = the same padded with l_{K-1}; top = l_{K-1}."""
    j = _F32_ZERO     # counted in float32 (exact), so that every lane of the loop is 32-bit
    lo = low_slots[0]
    for i in range(1, slots):
        level = low_slots[i]
        below = level <= r
        j += _F32_ONE if below else _F32_ZERO
        lo = level if below else lo
    hi = top
    for i in range(slots - 1, 0, -1):
        level = high_slots[i]
        hi = level if level > r else hi
    return np.int32(j), lo, hi - lo


@njit(**_INLINE)
def _count_loop(xs, block_scale, tables, num_levels, slots, stochastic, run, codes):
    first = tables[_LEVELS, 0]
    last = tables[_LEVELS, num_levels - 1]
    low_slots = tables[_COUNT_LOW]
    high_slots = tables[_COUNT_HIGH]
    for e in range(xs.size):
        r = _normalise(xs[e], block_scale[e], first, last)
        j, lo, w = _search_count(_search_input(r, first), low_slots, high_slots, last, slots)
        codes[e] = _nan_code(r, _round(r, j, lo, w, stochastic, run, e), num_levels - 2)


@njit(**_INLINE)
def _count_rounding(xs, block_scale, tables, num_levels, slots, stochastic, run, codes):
    if stochastic:
        _count_loop(xs, block_scale, tables, num_levels, slots, True, run, codes)
    else:
        _count_loop(xs, block_scale, tables, num_levels, slots, False, run, codes)


# One compiled loop per slot count (a literal here, so the level loops unroll): K <= slots.
@njit(**_JIT)
def _quantize_count2(xs, block_scale, tables, num_levels, stochastic, run, codes):
    _count_rounding(xs, block_scale, tables, num_levels, 2, stochastic, run, codes)


@njit(**_JIT)
def _quantize_count8(xs, block_scale, tables, num_levels, stochastic, run, codes):
    _count_rounding(xs, block_scale, tables, num_levels, 8, stochastic, run, codes)


@njit(**_JIT)
def _quantize_count16(xs, block_scale, tables, num_levels, stochastic, run, codes):
    _count_rounding(xs, block_scale, tables, num_levels, 16, stochastic, run, codes)


@njit(**_INLINE)
def _uniform_code(xv, s, first, last, fm, top_j, stochastic, run, q):
    """The code of one element on a uniform grid: the reference's t = r * m + m,
    j = min(floor(t), K-2), p = t - j, rounded up with probability p (or when p >= 1/2)."""
    r = _normalise(xv, s, first, last)
    t = _search_input(r, first) * fm + fm          # in [0, 2m]: truncation is floor
    j = min(np.int32(t), top_j)
    p = t - np.float32(j)
    if stochastic:
        code = j + np.int32(_uniform(run, q) < p)
    else:
        code = j + np.int32(p >= _F32_HALF)
    return _nan_code(r, code, top_j)


@njit(**_INLINE)
def _uniform_loop(xs, block_scale, tables, num_levels, uniform_m, stochastic, run, codes):
    first = tables[_LEVELS, 0]
    last = tables[_LEVELS, num_levels - 1]
    fm = np.float32(uniform_m)
    top_j = np.int32(num_levels - 2)   # 32-bit lanes throughout, so the loop vectorizes widely
    for e in range(xs.size):
        codes[e] = _uniform_code(xs[e], block_scale[e], first, last, fm, top_j, stochastic, run, e)


@njit(**_JIT)
def _quantize_uniform(xs, block_scale, tables, num_levels, uniform_m, stochastic, run, codes):
    """Uniform grids l_i = float32(i - m) / float32(m) (common.uniform_grid_m): the reference's
    grid formula t = r * m + m, j = min(floor(t), K-2), p = t - j; no search, no division."""
    if stochastic:
        _uniform_loop(xs, block_scale, tables, num_levels, uniform_m, True, run, codes)
    else:
        _uniform_loop(xs, block_scale, tables, num_levels, uniform_m, False, run, codes)


@njit(**_INLINE)
def _round_loop(r, j, lo, w, top_j, stochastic, run, codes):
    for e in range(r.size):
        re = r[e]
        codes[e] = _nan_code(re, _round(re, j[e], lo[e], w[e], stochastic, run, e), top_j)


@njit(**_INLINE)
def _round_from_table(r, j, tables, num_levels, stochastic, run, lo, w, codes):
    """codes from r and j: the level lookups in a loop of their own, so that the rounding loop
    (with its hashing) stays vectorizable."""
    levels = tables[_LEVELS]
    widths = tables[_WIDTHS]
    for e in range(r.size):
        jj = j[e]
        lo[e] = levels[jj]
        w[e] = widths[jj]
    if stochastic:
        _round_loop(r, j, lo, w, num_levels - 2, True, run, codes)
    else:
        _round_loop(r, j, lo, w, num_levels - 2, False, run, codes)


@njit(**_JIT)
def _quantize_bisect(xs, block_scale, tables, num_levels, search_steps, stochastic, run, r, j, lo, w,
                     codes):
    """Any sorted codebook, stage by stage: a branchless binary search for the last entry
    <= r of l_0..l_{K-2} padded with +inf."""
    search = tables[_SEARCH]
    first = tables[_LEVELS, 0]
    last = tables[_LEVELS, num_levels - 1]
    for e in range(xs.size):
        r[e] = _normalise(xs[e], block_scale[e], first, last)
        j[e] = 0
    step = 1 << search_steps
    for _ in range(search_steps):
        step >>= 1
        for e in range(xs.size):
            t = j[e] + step
            j[e] = t if search[t] <= _search_input(r[e], first) else j[e]
    _round_from_table(r, j, tables, num_levels, stochastic, run, lo, w, codes)


@njit(**_JIT)
def _quantize_lookup(xs, block_scale, tables, num_levels, cell_index, corrections, stochastic, run, r, j,
                     lo, w, codes):
    """Any sorted codebook, stage by stage: j starts at a lower bound read from a table indexed
    by r's sign, exponent and top mantissa bits (see _cell_index_table), then steps up while
    the next level is still <= r; ``corrections`` steps are always enough (the most levels any
    cell holds), so the result is exact."""
    search = tables[_SEARCH]
    first = tables[_LEVELS, 0]
    last = tables[_LEVELS, num_levels - 1]
    for e in range(xs.size):
        r[e] = _normalise(xs[e], block_scale[e], first, last)
    r_bits = r.view(np.uint32)
    for e in range(xs.size):
        b = np.int64(r_bits[e])
        magnitude = min((b & 0x7FFFFFFF) >> _CELL_SHIFT, _CELL_MAGNITUDES - 1)  # NaN: any cell
        j[e] = cell_index[((b >> 31) << _CELL_SIGN_SHIFT) | magnitude]
    for _ in range(corrections):
        for e in range(xs.size):
            t = j[e] + 1
            j[e] = t if search[t] <= r[e] else j[e]   # search[K-1] = +inf stops at K-2
    _round_from_table(r, j, tables, num_levels, stochastic, run, lo, w, codes)


# ----------------------------------------------------------------------------- pack / unpack

@njit(**_INLINE)
def _pack_group(codes, bits, out):
    """Up to 8 codes, LSB-first, into the ceil(len*bits/8) bytes of out."""
    acc = np.uint64(0)
    for k in range(codes.size):
        acc |= np.uint64(codes[k]) << np.uint64(k * bits)
    for t in range(out.size):
        out[t] = np.uint8((acc >> np.uint64(8 * t)) & np.uint64(0xFF))


@njit(**_INLINE)
def _pack(codes, bits, out):
    """All codes into out (ceil(len*bits/8) bytes); 8 codes fill exactly ``bits`` bytes."""
    groups = codes.size // 8
    if bits == 8:
        out[:groups * 8] = codes[:groups * 8]
    elif bits == 4:
        for q in range(groups * 4):
            out[q] = codes[2 * q] | (codes[2 * q + 1] << 4)
    elif bits == 2:
        for q in range(groups * 2):
            out[q] = codes[4 * q] | (codes[4 * q + 1] << 2) | (codes[4 * q + 2] << 4) | (codes[4 * q + 3] << 6)
    elif bits == 1:
        for q in range(groups):
            out[q] = (codes[8 * q] | (codes[8 * q + 1] << 1) | (codes[8 * q + 2] << 2) | (codes[8 * q + 3] << 3)
                      | (codes[8 * q + 4] << 4) | (codes[8 * q + 5] << 5) | (codes[8 * q + 6] << 6)
                      | (codes[8 * q + 7] << 7))
    else:
        for g in range(groups):
            _pack_group(codes[8 * g:8 * g + 8], bits, out[g * bits:(g + 1) * bits])
    if codes.size > groups * 8:
        _pack_group(codes[groups * 8:], bits, out[groups * bits:])


@njit(**_INLINE)
def _unpack_group(packed, bits, codes):
    acc = np.uint64(0)
    for t in range(packed.size):
        acc |= np.uint64(packed[t]) << np.uint64(8 * t)
    mask = np.uint64((1 << bits) - 1)
    for k in range(codes.size):
        codes[k] = np.uint8((acc >> np.uint64(k * bits)) & mask)


@njit(**_INLINE)
def _unpack(packed, bits, codes):
    """Inverse of _pack: codes.size codes from packed (ceil(len*bits/8) bytes)."""
    groups = codes.size // 8
    if bits == 8:
        codes[:groups * 8] = packed[:groups * 8]
    elif bits == 4:
        for q in range(groups * 4):
            v = packed[q]
            codes[2 * q] = v & 15
            codes[2 * q + 1] = v >> 4
    elif bits == 2:
        for q in range(groups * 2):
            v = packed[q]
            codes[4 * q] = v & 3
            codes[4 * q + 1] = (v >> 2) & 3
            codes[4 * q + 2] = (v >> 4) & 3
            codes[4 * q + 3] = v >> 6
    elif bits == 1:
        for q in range(groups):
            v = packed[q]
            for k in range(8):
                codes[8 * q + k] = (v >> k) & 1
    else:
        for g in range(groups):
            _unpack_group(packed[g * bits:(g + 1) * bits], bits, codes[8 * g:8 * g + 8])
    if codes.size > groups * 8:
        _unpack_group(packed[groups * bits:], bits, codes[groups * 8:])


@njit(**_INLINE)
def _unpack_block(packed, b0, bits, codes):
    """The codes of elements b0 .. b0 + codes.size - 1 (b0 a multiple of 8) from a packed
    stream; returns the largest, so that the callers can reject codes past the codebook."""
    byte0 = (b0 // 8) * bits
    _unpack(packed[byte0:byte0 + (codes.size * bits + 7) // 8], bits, codes)
    block_max = np.uint8(0)
    for e in range(codes.size):
        block_max = codes[e] if codes[e] > block_max else block_max
    return int(block_max)


# ----------------------------------------------------------------------------- encode / decode spans

@njit(**_JIT)
def _encode_blocks(x, e0, e1, scales, bucket_size, tables, method, num_levels, search_steps, uniform_m,
                   cell_index, corrections, bits, stochastic, key, offset, packed, residual_table, residual):
    """Quantize and pack elements e0..e1-1 (e0 a multiple of 8) with their buckets' scales.
    With ``residual`` (x itself, writeable; else an empty array), also
    residual[e] = x[e] - residual_table[code] * scale (the error-feedback residual
    p - decode(q) formed in place, bit for bit _decode_span's _DECODE_SUB) while the block's
    codes are still in L1."""
    block_scale = np.empty(_BLOCK, np.float32)
    r = np.empty(_BLOCK, np.float32)
    j = np.empty(_BLOCK, np.int32)
    lo = np.empty(_BLOCK, np.float32)
    w = np.empty(_BLOCK, np.float32)
    codes = np.empty(_BLOCK, np.uint8)
    for b0 in range(e0, e1, _BLOCK):
        length = min(_BLOCK, e1 - b0)
        xs = x[b0:b0 + length]
        ss = block_scale[:length]
        cs = codes[:length]
        run = _stream(key, offset + np.uint64(b0))
        _fill_scales(scales, bucket_size, b0, ss)
        if method == _SEARCH_COUNT2:
            _quantize_count2(xs, ss, tables, num_levels, stochastic, run, cs)
        elif method == _SEARCH_COUNT8:
            _quantize_count8(xs, ss, tables, num_levels, stochastic, run, cs)
        elif method == _SEARCH_COUNT16:
            _quantize_count16(xs, ss, tables, num_levels, stochastic, run, cs)
        elif method == _SEARCH_LOOKUP:
            _quantize_lookup(xs, ss, tables, num_levels, cell_index, corrections, stochastic, run,
                             r[:length], j[:length], lo[:length], w[:length], cs)
        elif method == _SEARCH_UNIFORM:
            _quantize_uniform(xs, ss, tables, num_levels, uniform_m, stochastic, run, cs)
        else:
            _quantize_bisect(xs, ss, tables, num_levels, search_steps, stochastic, run,
                             r[:length], j[:length], lo[:length], w[:length], cs)
        byte0 = (b0 // 8) * bits
        _pack(cs, bits, packed[byte0:byte0 + (length * bits + 7) // 8])
        if residual.size:
            rs = residual[b0:b0 + length]
            ls = r[:length]
            _levels_of(cs, residual_table, ls)
            for e in range(length):
                rs[e] = xs[e] - ls[e] * ss[e]


@njit(**_JIT)
def _decode_blocks(scales, packed, table, bits, bucket_size, out, e0, e1, mode, divisor):
    """For elements e0..e1-1 (e0 a multiple of 8): out[e] = level(code) * scale (_DECODE), or
    out[e] += ... (_DECODE_ADD), out[e] -= ... (_DECODE_SUB), out[e] = (out[e] + ...) / divisor
    (_DECODE_ADD_DIV), or nothing (_CHECK_CODES). Returns the largest code seen, so the caller
    can reject codes past the codebook."""
    block_scale = np.empty(_BLOCK, np.float32)
    block_level = np.empty(_BLOCK, np.float32)
    codes = np.empty(_BLOCK, np.uint8)
    seen = 0
    for b0 in range(e0, e1, _BLOCK):
        length = min(_BLOCK, e1 - b0)
        ss = block_scale[:length]
        ls = block_level[:length]
        cs = codes[:length]
        os = out[b0:b0 + length]
        seen = max(seen, _unpack_block(packed, b0, bits, cs))
        if mode == _CHECK_CODES:
            continue
        _fill_scales(scales, bucket_size, b0, ss)
        _levels_of(cs, table, ls)
        if mode == _DECODE_ADD:
            for e in range(length):
                os[e] = os[e] + ls[e] * ss[e]
        elif mode == _DECODE:
            for e in range(length):
                os[e] = ls[e] * ss[e]
        elif mode == _DECODE_SUB:
            for e in range(length):
                os[e] = os[e] - ls[e] * ss[e]
        elif mode == _DECODE_ADD_DIV:
            for e in range(length):
                os[e] = (os[e] + ls[e] * ss[e]) / divisor
    return seen


# ----------------------------------------------------------------------------- parallel kernels

@njit(parallel=True, **_JIT)
def _encode_kernel(x, x_bits, task_buckets, task_elements, tables, method, num_levels, search_steps, uniform_m,
                   cell_index, corrections, bits, bucket_size, scale_kind, stochastic, key, offset, scales,
                   packed):
    """Task t computes the scales of buckets task_buckets[t] (a range, maybe empty), then
    quantizes and packs elements task_elements[t] (maybe empty) with them."""
    single_bucket = scales.size == 1
    for t in prange(task_buckets.shape[0]):
        _bucket_scales(x, x_bits, task_buckets[t, 0], task_buckets[t, 1], bucket_size, scale_kind, single_bucket,
                       scales)
        _encode_span(x, task_elements[t, 0], task_elements[t, 1], scales, bucket_size, tables, method, num_levels,
                     search_steps, uniform_m, cell_index, corrections, bits, stochastic, key, offset, packed,
                     tables[_LEVELS], np.empty(0, np.float32))   # (no residual: the table is unused)


@njit(parallel=True, **_JIT)
def _decode_kernel(scales, packed, table, bits, bucket_size, out, n, mode, divisor, max_code):
    for t in prange(max_code.size):
        max_code[t] = _decode_span(scales, packed, table, bits, bucket_size, out, t * _TASK,
                                   min((t + 1) * _TASK, n), mode, divisor)


@njit(**_JIT)
def _compensate(v, e, p, start, stop):
    """p = v + e over [start, stop)."""
    vs, es, ps = v[start:stop], e[start:stop], p[start:stop]
    for i in range(stop - start):
        ps[i] = vs[i] + es[i]


@njit(**_JIT)
def _any_nonfinite(bits, start, stop):
    """Whether float32 values [start, stop) hold inf or NaN (from their bit patterns)."""
    bad = np.uint32(0)
    pb = bits[start:stop]
    for i in range(stop - start):
        bad |= np.uint32((pb[i] & _ABS_MASK) >= _INF_BITS)
    return bad != 0


@njit(parallel=True, **_JIT)
def _encode_ef_kernel(v, e, p, p_bits, task_buckets, task_elements, tables, method, num_levels, search_steps,
                      uniform_m, cell_index, corrections, bits, bucket_size, scale_kind, stochastic, key, offset,
                      decode_table, scales, packed, nonfinite):
    """Error feedback fused with quantization, task by task while the data is in cache:
    p = v + e over the task's buckets, their scales, then codes of its elements block by block,
    each block followed by p -= decode(codes), which leaves the new residual in p."""
    single_bucket = scales.size == 1
    scale_bits = scales.view(np.uint32)
    n = p.size
    for t in prange(task_buckets.shape[0]):
        k0, k1 = task_buckets[t, 0], task_buckets[t, 1]
        if k1 > k0:
            a, b = k0 * bucket_size, min(k1 * bucket_size, n)
            _compensate(v, e, p, a, b)
            _bucket_scales(p, p_bits, k0, k1, bucket_size, scale_kind, single_bucket, scales)
            # Every scale kind turns an inf or NaN element into a non-finite scale (max |x| from
            # the bits, or float64 sums, which finite float32 input cannot overflow): finite
            # scales clear the task without reading p again; a non-finite one (or a float32 L2
            # scale that overflowed) sends it to the exact check.
            nonfinite[t] = _any_nonfinite(scale_bits, k0, k1) and _any_nonfinite(p_bits, a, b)
        e0, e1 = task_elements[t, 0], task_elements[t, 1]
        if e1 > e0:
            _encode_span(p, e0, e1, scales, bucket_size, tables, method, num_levels, search_steps, uniform_m,
                         cell_index, corrections, bits, stochastic, key, offset, packed, decode_table, p)


# ----------------------------------------------------------------------------- Python entry points

def _readonly(a):
    """A read-only view: the kernels are compiled for read-only inputs only, so writable arrays
    and read-only ones (e.g. payloads parsed from received bytes) share one compiled kernel."""
    view = a.view()
    view.flags.writeable = False
    return view


def _cell_index_table(lv):
    """(cell_index, corrections) for _SEARCH_LOOKUP. Cell c = (sign, |r| pattern >> 16) holds an
    interval of floats; cell_index[c] is j for its lowest value (a lower bound for every r in
    the cell, as j is monotone in r), corrections the most that j grows across any cell."""
    magnitude = np.arange(_CELL_MAGNITUDES, dtype=np.uint32)
    low_pattern = np.minimum(magnitude << np.uint32(_CELL_SHIFT), np.uint32(0x3F800000))
    high_pattern = np.minimum(low_pattern | np.uint32((1 << _CELL_SHIFT) - 1), np.uint32(0x3F800000))
    low_abs, high_abs = low_pattern.view(np.float32), high_pattern.view(np.float32)
    k = lv.size

    def j_of(r):
        return np.clip(np.searchsorted(lv, r, side="right") - 1, 0, k - 2)

    # positive cells run from low_abs up to high_abs; negative ones from -high_abs up to -low_abs
    start = np.concatenate([j_of(low_abs), j_of(-high_abs)])
    end = np.concatenate([j_of(high_abs), j_of(-low_abs)])
    return start.astype(np.uint8), int((end - start).max())


@functools.lru_cache(maxsize=64)
def _search_tables_cached(level_bytes):
    lv = np.frombuffer(level_bytes, dtype=np.float32)
    k = lv.size
    shared = level_tables(lv)
    tables = np.zeros((_NUM_TABLES, TABLE_WIDTH), dtype=np.float32)
    tables[_LEVELS] = shared.levels
    tables[_WIDTHS] = shared.widths
    tables[_COUNT_LOW] = shared.search                    # +inf is above any r: never counted
    tables[_COUNT_HIGH, :] = lv[-1]
    tables[_COUNT_HIGH, :k - 1] = lv[:-1]
    tables[_SEARCH] = shared.search
    steps = shared.search_steps
    uniform_m = int(shared.params[0])     # common.uniform_grid_m's m, or 0
    cell_index, corrections = _NO_CELL_INDEX, 0
    if uniform_m:
        method = _SEARCH_UNIFORM
    elif k <= _COUNT_METHODS[-1][0]:
        method = next(m for slots, m in _COUNT_METHODS if k <= slots)
    else:
        cell_index, corrections = _cell_index_table(lv)
        method = _SEARCH_LOOKUP if corrections <= _MAX_CORRECTIONS else _SEARCH_BISECT
    for table in (tables, cell_index):
        table.flags.writeable = False
    return tables, method, steps, uniform_m, cell_index, corrections


def _search_tables(lv):
    """(tables, method, binary search steps, m, cell index, corrections) for a sorted float32
    codebook: how _encode_span finds j. Cached, as adaptive codebooks change rarely."""
    return _search_tables_cached(np.ascontiguousarray(lv, dtype=np.float32).tobytes())


@contextlib.contextmanager
def _threads_for(n):
    """Run the kernels inside on one thread when n is small (numba's setting is per thread)."""
    if n >= _SERIAL_BELOW:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _encode_passes(n, bucket_size, nb):
    """The task lists (bucket ranges, element ranges), one per call of _encode_kernel."""
    if nb >= _MIN_BUCKET_TASKS:
        # Tasks of whole buckets spanning a multiple of 8 elements, so each owns whole bytes.
        align = 8 // math.gcd(bucket_size, 8)
        per_task = -(-max(1, _TASK // bucket_size) // align) * align
        k0 = np.arange(0, nb, per_task, dtype=np.int64)
        k1 = np.minimum(k0 + per_task, nb)
        return [(np.stack([k0, k1], 1), np.stack([k0 * bucket_size, np.minimum(k1 * bucket_size, n)], 1))]
    # Few long buckets: all scales first (a task per bucket), then the elements in chunks.
    k0 = np.arange(nb, dtype=np.int64)
    e0 = np.arange(0, n, _TASK, dtype=np.int64)
    no_elements = np.zeros((nb, 2), np.int64)
    no_buckets = np.zeros((e0.size, 2), np.int64)
    return [(np.stack([k0, k0 + 1], 1), no_elements), (no_buckets, np.stack([e0, np.minimum(e0 + _TASK, n)], 1))]


def encode(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset=0):
    """fp32 vector -> (scales float32[num_buckets], packed uint8[ceil(n*bits/8)]), exactly as
    reference.encode. Non-float32 input is converted to float32 first (as the API does)."""
    lv, bits, bucket_size = check_kernel_args(levels, bits, bucket_size)
    scale_kind, offset = check_scale_kind(scale_kind), check_offset(offset)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    scales = np.empty(num_buckets(n, bucket_size), dtype=np.float32)
    packed = np.empty(packed_nbytes(n, bits), dtype=np.uint8)
    if n == 0:
        return scales, packed
    tables, method, steps, uniform_m, cell_index, corrections = _search_tables(lv)
    x_ro, x_bits = _readonly(x), _readonly(x.view(np.uint32))
    with _threads_for(n):
        for task_buckets, task_elements in _encode_passes(n, bucket_size, scales.size):
            _encode_kernel(x_ro, x_bits, task_buckets, task_elements, tables, method, lv.size, steps, uniform_m,
                           cell_index, corrections, bits, bucket_size, scale_kind, bool(stochastic),
                           stream_key_u64(key), np.uint64(offset), scales, packed)
    return scales, packed


def _decode_inputs(scales, packed, levels, bits, bucket_size, n):
    lv, bits, bucket_size = check_kernel_args(levels, bits, bucket_size)
    n = int(n)
    scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    check_decode_sizes(scales.size, packed.size, n, bits, bucket_size)
    return _readonly(scales), _readonly(packed), lv, _decode_table(lv), bits, bucket_size, n


@functools.lru_cache(maxsize=64)
def _decode_table_cached(level_bytes):
    shared = level_tables(np.frombuffer(level_bytes, dtype=np.float32))
    table = np.concatenate([shared.decode, shared.params[:1]])   # NaN past the codebook, then m
    table.flags.writeable = False
    return table


def _decode_table(lv):
    """float32[TABLE_WIDTH + 1]: the levels padded with NaN (a code past the codebook decodes to
    NaN; the callers reject such payloads), then at _GRID_SLOT the m of a uniform grid (else 0),
    with which _levels_of computes levels instead of looking them up."""
    return _decode_table_cached(np.ascontiguousarray(lv, dtype=np.float32).tobytes())


def _run_decode(scales, packed, table, bits, bucket_size, out, n, mode, num_levels, divisor=1.0):
    max_code = np.zeros(-(-n // _TASK), dtype=np.int64)
    with _threads_for(n):
        _decode_kernel(scales, packed, table, bits, bucket_size, out, n, mode, np.float32(divisor), max_code)
    if max_code.size and int(max_code.max()) >= num_levels:
        raise ValueError(f"decode: code {int(max_code.max())} is out of range for a codebook of "
                         f"{num_levels} levels (corrupt payload)")


def decode(scales, packed, levels, bits, bucket_size, n):
    """Packed codes -> float32[n] (level * bucket scale), exactly as reference.decode."""
    scales, packed, lv, table, bits, bucket_size, n = _decode_inputs(scales, packed, levels, bits,
                                                                      bucket_size, n)
    out = np.empty(n, dtype=np.float32)
    if n:
        _run_decode(scales, packed, table, bits, bucket_size, out, n, _DECODE, lv.size)
    return out


def decode_add(acc, scales, packed, levels, bits, bucket_size, n, divisor=None):
    """acc += decode(...) in place (float32 acc of n elements); returns acc. Bit for bit
    acc + decode(...), or (acc + decode(...)) / divisor when ``divisor`` is given (the last
    payload of a mean). Codes are checked before acc is touched, so a corrupt payload raises
    ValueError and leaves acc unchanged."""
    scales, packed, lv, table, bits, bucket_size, n = _decode_inputs(scales, packed, levels, bits,
                                                                      bucket_size, n)
    if not (isinstance(acc, np.ndarray) and acc.dtype == np.float32 and acc.size == n
            and acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError(f"decode_add: acc must be a writeable contiguous float32 array of {n} elements")
    if n:
        flat = acc.reshape(-1)
        if lv.size < 2 ** bits:  # some code values are invalid: look before writing
            _run_decode(scales, packed, table, bits, bucket_size, flat, n, _CHECK_CODES, lv.size)
        if divisor is None:
            _run_decode(scales, packed, table, bits, bucket_size, flat, n, _DECODE_ADD, lv.size)
        else:
            _run_decode(scales, packed, table, bits, bucket_size, flat, n, _DECODE_ADD_DIV, lv.size, divisor)
    return acc


def decode_into(out, scales, packed, levels, bits, bucket_size, n):
    """out[:] = decode(...) into a caller's float32 buffer; returns out. Raises ValueError for
    codes past the codebook (out may then hold partial results: it is scratch)."""
    scales, packed, lv, table, bits, bucket_size, n = _decode_inputs(scales, packed, levels, bits,
                                                                      bucket_size, n)
    flat = _writeable_f32(out, n, "decode_into: out")
    if n:
        _run_decode(scales, packed, table, bits, bucket_size, flat, n, _DECODE, lv.size)
    return out


def _writeable_f32(a, n, what):
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.size == n and a.flags.c_contiguous
            and a.flags.writeable):
        raise ValueError(f"{what} must be a writeable contiguous float32 array of {n} elements")
    return a.reshape(-1)


def encode_ef(v, e, out, levels, bits, bucket_size, scale_kind, stochastic, key, offset=0):
    """Error-feedback quantization in one pass: p = v + e; (scales, packed) = encode(p);
    out = p - decode(scales, packed). Returns (scales, packed, nonfinite) where nonfinite says
    whether p held inf or NaN (then the codes are meaningless). Bit for bit what
    ``p = v + e; encode(p); p - decode(...)`` gives. ``out`` must not overlap ``v`` or ``e``."""
    lv, bits, bucket_size = check_kernel_args(levels, bits, bucket_size)
    scale_kind, offset = check_scale_kind(scale_kind), check_offset(offset)
    v = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
    n = v.size
    e = np.ascontiguousarray(e, dtype=np.float32).reshape(-1)
    if e.size != n:
        raise ValueError(f"encode_ef: residual has {e.size} elements, the vector {n}")
    p = _writeable_f32(out, n, "encode_ef: out")
    if np.may_share_memory(p, v) or np.may_share_memory(p, e):
        raise ValueError("encode_ef: out must not overlap the input vector or the residual")
    scales = np.empty(num_buckets(n, bucket_size), dtype=np.float32)
    packed = np.empty(packed_nbytes(n, bits), dtype=np.uint8)
    if n == 0:
        return scales, packed, False
    tables, method, steps, uniform_m, cell_index, corrections = _search_tables(lv)
    table = _decode_table(lv)
    passes = _encode_passes(n, bucket_size, scales.size)
    nonfinite = np.zeros(max(t[0].shape[0] for t in passes), dtype=np.bool_)
    with _threads_for(n):
        for task_buckets, task_elements in passes:
            _encode_ef_kernel(_readonly(v), _readonly(e), p, p.view(np.uint32), task_buckets, task_elements, tables,
                              method, lv.size, steps, uniform_m, cell_index, corrections, bits, bucket_size,
                              scale_kind, bool(stochastic), stream_key_u64(key), np.uint64(offset),
                              table, scales, packed, nonfinite)
    return scales, packed, bool(nonfinite.any())


@njit(**_JIT)
def _mean_blocks(scales, packed, table, bits, bucket_size, out, e0, e1, divisor):
    """out[e] = ((d_0[e] + d_1[e]) + ...) / divisor for elements e0..e1-1 (e0 a multiple of 8),
    d_r the decode of row r of ``scales``/``packed``: every payload is decoded and added in rank
    order while the block is in L1, so ``out`` is written once instead of read and written once
    per payload. Returns the largest code seen."""
    block_scale = np.empty(_BLOCK, np.float32)
    block_level = np.empty(_BLOCK, np.float32)
    codes = np.empty(_BLOCK, np.uint8)
    acc = np.empty(_BLOCK, np.float32)
    seen = 0
    for b0 in range(e0, e1, _BLOCK):
        length = min(_BLOCK, e1 - b0)
        ss = block_scale[:length]
        cs = codes[:length]
        ac = acc[:length]
        ls = block_level[:length]
        for r in range(scales.shape[0]):
            _fill_scales(scales[r], bucket_size, b0, ss)
            seen = max(seen, _unpack_block(packed[r], b0, bits, cs))
            _levels_of(cs, table, ls)
            if r == 0:
                for e in range(length):
                    ac[e] = ls[e] * ss[e]
            else:
                for e in range(length):
                    ac[e] = ac[e] + ls[e] * ss[e]
        os = out[b0:b0 + length]
        for e in range(length):
            os[e] = ac[e] / divisor
    return seen


@njit(parallel=True, **_JIT)
def _mean_kernel(scales, packed, table, bits, bucket_size, out, n, divisor, max_code):
    for t in prange(max_code.size):
        max_code[t] = _mean_span(scales, packed, table, bits, bucket_size, out, t * _TASK,
                                 min((t + 1) * _TASK, n), divisor)


def decode_mean(out, scales_list, packed_list, levels, bits, bucket_size, n):
    """out = (d_0 + d_1 + ... + d_{N-1}) / N in one pass, bit for bit what decode_into of the
    first payload, decode_add of the next ones and the division with the last give (the sum in
    rank order). Raises ValueError for codes past the codebook (out is then scratch)."""
    if not scales_list or len(scales_list) != len(packed_list):
        raise ValueError("decode_mean: one (scales, packed) pair per payload, at least one")
    rows = [_decode_inputs(s, p, levels, bits, bucket_size, n) for s, p in zip(scales_list, packed_list)]
    _, _, lv, table, bits, bucket_size, n = rows[0]
    flat = _writeable_f32(out, n, "decode_mean: out")
    if n:
        nbytes = packed_nbytes(n, bits)
        scales = np.stack([r[0] for r in rows])
        packed = np.stack([r[1][:nbytes] for r in rows])
        max_code = np.zeros(-(-n // _TASK), dtype=np.int64)
        with _threads_for(n):
            _mean_kernel(_readonly(scales), _readonly(packed), table, bits, bucket_size, flat, n,
                         np.float32(len(rows)), max_code)
        if int(max_code.max()) >= lv.size:
            raise ValueError(f"decode: code {int(max_code.max())} is out of range for a codebook of "
                             f"{lv.size} levels (corrupt payload)")
    return out


@njit(**_JIT)
def _first_flagged(data, flagged):
    for i in range(data.size):
        if flagged[data[i]]:
            return i
    return -1


_ONES_LANES = {2: 0x5555555555555555, 4: 0x1111111111111111, 8: 0x0101010101010101}


@njit(**_INLINE)
def _all_ones_fields(w, bits, lanes):
    """The lowest bit of every ``bits``-wide field of w that is all ones (its lowest bit survives
    AND-ing w with itself shifted by 1..bits-1), the other bits clear."""
    t = w
    for sh in range(1, bits):
        t &= w >> np.uint64(sh)
    return t & lanes


@njit(**_JIT)
def _any_all_ones(packed, bits, lanes):
    """Whether some ``bits``-wide field of packed is all ones, eight bytes at a time."""
    words = packed.size // 8
    w64 = packed[:words * 8].view(np.uint64)
    acc = np.uint64(0)
    for i in range(words):
        acc |= _all_ones_fields(w64[i], bits, lanes)
    for b in range(words * 8, packed.size):
        acc |= _all_ones_fields(np.uint64(packed[b]), bits, lanes & np.uint64(0xFF))
    return acc != 0


@njit(**_INLINE)
def _pack_6(pk, q, c0, c1, c2, c3):
    """Codes 4q .. 4q+3 (6 bits each) into bytes 3q .. 3q+2, LSB-first: _pack_group's layout."""
    pk[3 * q] = np.uint8(c0 | ((c1 & 3) << 6))
    pk[3 * q + 1] = np.uint8((c1 >> 2) | ((c2 & 15) << 4))
    pk[3 * q + 2] = np.uint8((c2 >> 4) | (c3 << 2))


@njit(**_INLINE)
def _unpack_6(pk, q):
    """The inverse of _pack_6: codes 4q .. 4q+3 from bytes 3q .. 3q+2."""
    b0, b1, b2 = np.int32(pk[3 * q]), np.int32(pk[3 * q + 1]), np.int32(pk[3 * q + 2])
    return b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2


@njit(**_JIT)
def _any_all_ones_6(packed):
    """Whether some 6-bit field of packed is 63: four fields per 3 bytes (_pack_6), then the
    whole fields of a 1- or 2-byte tail (the rest of a tail is padding)."""
    triples = packed.size // 3
    for q in range(triples):
        c0, c1, c2, c3 = _unpack_6(packed, q)
        if c0 == 63 or c1 == 63 or c2 == 63 or c3 == 63:
            return True
    tail = packed.size - 3 * triples
    if tail >= 1 and (packed[3 * triples] & 63) == 63:
        return True
    if tail == 2:
        v = np.int32(packed[3 * triples]) | (np.int32(packed[3 * triples + 1]) << 8)
        return ((v >> 6) & 63) == 63
    return False


def any_all_ones_code(packed, bits):
    """Whether any packed code (2, 4, 6 or 8 bits) is 2^bits - 1: the one invalid code of a
    uniform grid, which has 2^bits - 1 levels. The wire parser uses it to clear a payload before
    looking for where a bad code is (measured 2.5 -> 2.0 ms for a 5.5 MB 4-bit payload; at 6 bits
    the alternative is unpacking every code in NumPy). Padding bits past the last code may be
    counted: a false alarm only sends the caller to its exact search."""
    flat = _readonly(np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1))
    if bits == 6:
        return bool(_any_all_ones_6(flat))
    if bits not in _ONES_LANES:
        raise ValueError(f"any_all_ones_code: bits must be 2, 4, 6 or 8, got {bits}")
    return bool(_any_all_ones(flat, int(bits), np.uint64(_ONES_LANES[bits])))


def first_flagged_byte(data, flagged):
    """Index of the first byte b of ``data`` with ``flagged[b]`` (a 256-entry bool table), or -1:
    one pass that stops at the first hit (the wire parser's check for codes past the codebook)."""
    return int(_first_flagged(_readonly(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)),
                              _readonly(np.ascontiguousarray(flagged, dtype=np.bool_))))


# ----------------------------------------------------------------------------- byte-aligned buckets
# The common cases skip the 512-element staging above: a uniform grid at 4, 6 or 8 bits (the
# defaults: 6-bit qsgdinf, buckets of 128) or a two-level codebook at 1 bit (sign, buckets of
# 512), with buckets of a multiple of 8 elements. Every bucket then starts on a byte, so one loop
# over a bucket's bytes reads its elements (or codes), computes the codes (or the levels:
# float32(c - m) / m on a grid, l_0 or l_1 for two levels) and writes one value per element. The
# float32 operations and their order are the block path's, so the results are the same bits;
# measured 1.2-1.6x faster to encode and 1.6-5x to decode, as nothing goes through scratch arrays. The spans send the whole buckets of
# [e0, e1) here and any partial bucket at either end to the block path.

@njit(**_INLINE)
def _aligned(uniform_grid, num_levels, bits, bucket_size):
    """Whether the byte-aligned path applies."""
    if bucket_size % 8 != 0:
        return False
    if bits == 1:
        return num_levels == 2
    # (2-bit grids measured slower here than on the block path: 4 codes per byte in one loop;
    # 6 bits packs 4 codes into 3 bytes, 8 | bucket_size makes that whole groups)
    return uniform_grid and (bits == 4 or bits == 6 or bits == 8)


@njit(**_INLINE)
def _whole_buckets(e0, e1, bucket_size):
    """(first, end) bucket index of the whole buckets inside [e0, e1); end <= first if none."""
    return -(-e0 // bucket_size), e1 // bucket_size


@njit(**_INLINE)
def _grid_level(c, m, fm):
    """Level of code c on the uniform grid of m: exactly the codebook's float32(c - m) / m."""
    return np.float32(c - m) / fm


@njit(**_INLINE)
def _two_level_code(xv, s, l0, l1, w, stochastic, run, q):
    """The code of one element with levels (l0, l1): _count_loop's arithmetic for K = 2 (j = 0,
    p = (r - l0) / w; a NaN r gets code 0, as in the reference)."""
    r = _normalise(xv, s, l0, l1)
    return _nan_code(r, _round(r, np.int32(0), l0, w, stochastic, run, q), np.int32(0))


@njit(**_INLINE)
def _aligned_constants(tables, num_levels, uniform_m):
    """(l_0, l_{K-1}, m, float32 m, K - 2, l_{K-1} - l_0) for the byte-aligned encoders."""
    first, last = tables[_LEVELS, 0], tables[_LEVELS, num_levels - 1]
    return first, last, np.int32(uniform_m), np.float32(uniform_m), np.int32(num_levels - 2), last - first


@njit(**_INLINE)
def _bucket_views(x, packed, k, k0, bucket_size, bits):
    """Bucket k's elements, its bytes, and the index of its first element counted from bucket
    k0 (where the encoders' random-stream run starts)."""
    per_bucket = bucket_size * bits // 8
    return (x[k * bucket_size:(k + 1) * bucket_size], packed[k * per_bucket:(k + 1) * per_bucket],
            (k - k0) * bucket_size)


@njit(**_JIT)
def _encode_aligned_6(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, stochastic, run, packed):
    """_encode_aligned at 6 bits: 4 codes, LSB-first, in 3 bytes (_pack_6)."""
    first, last, m, fm, top_j, _ = _aligned_constants(tables, num_levels, uniform_m)
    for k in range(k0, k1):
        s = scales[k]
        xs, pk, kb = _bucket_views(x, packed, k, k0, bucket_size, 6)
        for q in range(pk.size // 3):
            x0, x1, x2, x3 = xs[4 * q], xs[4 * q + 1], xs[4 * q + 2], xs[4 * q + 3]
            c0 = _uniform_code(x0, s, first, last, fm, top_j, stochastic, run, kb + 4 * q)
            c1 = _uniform_code(x1, s, first, last, fm, top_j, stochastic, run, kb + 4 * q + 1)
            c2 = _uniform_code(x2, s, first, last, fm, top_j, stochastic, run, kb + 4 * q + 2)
            c3 = _uniform_code(x3, s, first, last, fm, top_j, stochastic, run, kb + 4 * q + 3)
            _pack_6(pk, q, c0, c1, c2, c3)
            xs[4 * q] = x0 - _grid_level(c0, m, fm) * s
            xs[4 * q + 1] = x1 - _grid_level(c1, m, fm) * s
            xs[4 * q + 2] = x2 - _grid_level(c2, m, fm) * s
            xs[4 * q + 3] = x3 - _grid_level(c3, m, fm) * s


@njit(**_JIT)
def _encode_aligned_6_ro(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, stochastic, run,
                         packed):
    """_encode_aligned_6 without the residual, for read-only x."""
    first, last, _, fm, top_j, _ = _aligned_constants(tables, num_levels, uniform_m)
    for k in range(k0, k1):
        s = scales[k]
        xs, pk, kb = _bucket_views(x, packed, k, k0, bucket_size, 6)
        for q in range(pk.size // 3):
            c0 = _uniform_code(xs[4 * q], s, first, last, fm, top_j, stochastic, run, kb + 4 * q)
            c1 = _uniform_code(xs[4 * q + 1], s, first, last, fm, top_j, stochastic, run, kb + 4 * q + 1)
            c2 = _uniform_code(xs[4 * q + 2], s, first, last, fm, top_j, stochastic, run, kb + 4 * q + 2)
            c3 = _uniform_code(xs[4 * q + 3], s, first, last, fm, top_j, stochastic, run, kb + 4 * q + 3)
            _pack_6(pk, q, c0, c1, c2, c3)


@njit(**_JIT)
def _encode_aligned(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, bits, stochastic, run,
                    packed):
    """Codes of buckets k0..k1-1 of x into packed, and x[e] -= level(code) * scale in place: the
    error-feedback residual (x is read and written through one array, which keeps the loops
    vectorizable). ``run``: the random stream from bucket k0's first element (_stream). Compiled
    on its own, with ``stochastic`` a run-time flag: inlining a copy per rounding measured no
    faster and tripled the cold compile time. (Computing the residual in a second loop per
    bucket, a decode of the bytes just written, measured up to 1.3x faster on its own and up to
    10x slower compiled into this function.) 6 bits is a function of its own: its loop compiled
    in here made the 1-bit loop about 3x slower (sign encode_ef of 10.5M elements 9.5 ms without
    it, 25-30 ms with it)."""
    if bits == 6:
        _encode_aligned_6(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, stochastic, run, packed)
        return
    first, last, m, fm, top_j, w = _aligned_constants(tables, num_levels, uniform_m)
    for k in range(k0, k1):
        s = scales[k]
        xs, pk, kb = _bucket_views(x, packed, k, k0, bucket_size, bits)
        if bits == 8:
            for q in range(pk.size):
                xv = xs[q]
                c = _uniform_code(xv, s, first, last, fm, top_j, stochastic, run, kb + q)
                pk[q] = np.uint8(c)
                xs[q] = xv - _grid_level(c, m, fm) * s
        elif bits == 4:
            for q in range(pk.size):
                x0, x1 = xs[2 * q], xs[2 * q + 1]
                c0 = _uniform_code(x0, s, first, last, fm, top_j, stochastic, run, kb + 2 * q)
                c1 = _uniform_code(x1, s, first, last, fm, top_j, stochastic, run, kb + 2 * q + 1)
                pk[q] = np.uint8(c0 | (c1 << 4))
                xs[2 * q] = x0 - _grid_level(c0, m, fm) * s
                xs[2 * q + 1] = x1 - _grid_level(c1, m, fm) * s
        else:       # 1 bit, two levels
            for q in range(pk.size):
                v = np.int32(0)
                for i in range(8):
                    xv = xs[8 * q + i]
                    c = _two_level_code(xv, s, first, last, w, stochastic, run, kb + 8 * q + i)
                    v |= c << i
                    xs[8 * q + i] = xv - (last if c else first) * s
                pk[q] = np.uint8(v)


@njit(**_JIT)
def _encode_aligned_ro(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, bits, stochastic, run,
                       packed):
    """_encode_aligned without the residual, for read-only x (a kernel that writes x does not
    compile for a read-only array)."""
    if bits == 6:
        _encode_aligned_6_ro(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, stochastic, run,
                             packed)
        return
    first, last, _, fm, top_j, w = _aligned_constants(tables, num_levels, uniform_m)
    for k in range(k0, k1):
        s = scales[k]
        xs, pk, kb = _bucket_views(x, packed, k, k0, bucket_size, bits)
        if bits == 8:
            for q in range(pk.size):
                pk[q] = np.uint8(_uniform_code(xs[q], s, first, last, fm, top_j, stochastic, run,
                                               kb + q))
        elif bits == 4:
            for q in range(pk.size):
                c0 = _uniform_code(xs[2 * q], s, first, last, fm, top_j, stochastic, run, kb + 2 * q)
                c1 = _uniform_code(xs[2 * q + 1], s, first, last, fm, top_j, stochastic, run,
                                   kb + 2 * q + 1)
                pk[q] = np.uint8(c0 | (c1 << 4))
        else:
            for q in range(pk.size):
                v = np.int32(0)
                for i in range(8):
                    v |= _two_level_code(xs[8 * q + i], s, first, last, w, stochastic, run,
                                         kb + 8 * q + i) << i
                pk[q] = np.uint8(v)


@njit(**_JIT)
def _encode_span(x, e0, e1, scales, bucket_size, tables, method, num_levels, search_steps, uniform_m,
                 cell_index, corrections, bits, stochastic, key, offset, packed, residual_table, residual):
    """_encode_blocks over elements e0..e1-1 (e0 a multiple of 8), its whole buckets on the
    byte-aligned path where that applies. ``residual``, when not empty, is x itself."""
    k0, k1 = _whole_buckets(e0, e1, bucket_size)
    if not _aligned(method == _SEARCH_UNIFORM, num_levels, bits, bucket_size) or k1 <= k0:
        _encode_blocks(x, e0, e1, scales, bucket_size, tables, method, num_levels, search_steps, uniform_m,
                       cell_index, corrections, bits, stochastic, key, offset, packed, residual_table, residual)
        return
    if k0 * bucket_size > e0:
        _encode_blocks(x, e0, k0 * bucket_size, scales, bucket_size, tables, method, num_levels, search_steps,
                       uniform_m, cell_index, corrections, bits, stochastic, key, offset, packed, residual_table,
                       residual)
    run = _stream(key, offset + np.uint64(k0 * bucket_size))
    if residual.size:
        _encode_aligned(residual, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, bits, stochastic,
                        run, packed)
    else:
        _encode_aligned_ro(x, k0, k1, scales, bucket_size, tables, num_levels, uniform_m, bits, stochastic,
                           run, packed)
    if e1 > k1 * bucket_size:
        _encode_blocks(x, k1 * bucket_size, e1, scales, bucket_size, tables, method, num_levels, search_steps,
                       uniform_m, cell_index, corrections, bits, stochastic, key, offset, packed, residual_table,
                       residual)


@njit(**_INLINE)
def _combine(o, level, s, mode, divisor):
    """What decode mode ``mode`` (_DECODE, _DECODE_ADD or _DECODE_ADD_DIV) writes for one element
    whose current value is o. One store per element and three cases keep the loops vectorized
    (a fourth case measured 3x slower); _DECODE_SUB is _DECODE_ADD with the scale negated, which
    IEEE arithmetic makes identical: o - l * s == o + l * (-s) in every bit."""
    if mode == _DECODE:
        return level * s
    if mode == _DECODE_ADD:
        return o + level * s
    return (o + level * s) / divisor      # _DECODE_ADD_DIV


@njit(**_INLINE)
def _decode_aligned_bucket(pk, bits, s, m, fm, l0, l1, os, mode, divisor):
    """os combined (``mode``: _DECODE, _DECODE_ADD or _DECODE_ADD_DIV) with the decode of one
    bucket's bytes pk; returns the largest code."""
    seen = np.int32(0)
    if bits == 4:
        for q in range(pk.size):
            v = np.int32(pk[q])
            c0, c1 = v & 15, v >> 4
            seen = max(seen, max(c0, c1))
            os[2 * q] = _combine(os[2 * q], _grid_level(c0, m, fm), s, mode, divisor)
            os[2 * q + 1] = _combine(os[2 * q + 1], _grid_level(c1, m, fm), s, mode, divisor)
    elif bits == 8:
        for q in range(pk.size):
            c = np.int32(pk[q])
            seen = max(seen, c)
            os[q] = _combine(os[q], _grid_level(c, m, fm), s, mode, divisor)
    elif bits == 6:
        for q in range(pk.size // 3):
            c0, c1, c2, c3 = _unpack_6(pk, q)
            seen = max(seen, max(max(c0, c1), max(c2, c3)))
            os[4 * q] = _combine(os[4 * q], _grid_level(c0, m, fm), s, mode, divisor)
            os[4 * q + 1] = _combine(os[4 * q + 1], _grid_level(c1, m, fm), s, mode, divisor)
            os[4 * q + 2] = _combine(os[4 * q + 2], _grid_level(c2, m, fm), s, mode, divisor)
            os[4 * q + 3] = _combine(os[4 * q + 3], _grid_level(c3, m, fm), s, mode, divisor)
    else:       # 1 bit, two levels: both codes are valid (seen stays 0)
        for q in range(pk.size):
            v = np.int32(pk[q])
            for i in range(8):
                c = (v >> i) & 1
                os[8 * q + i] = _combine(os[8 * q + i], l1 if c else l0, s, mode, divisor)
    return seen


@njit(**_INLINE)
def _decode_constants(table, bits, bucket_size):
    """(m, float32 m, l_0, l_1, bytes per bucket) of a decode table for the byte-aligned decoders."""
    m = np.int32(table[_GRID_SLOT])
    return m, np.float32(m), table[0], table[1], bucket_size * bits // 8


@njit(**_JIT)
def _decode_aligned(scales, packed, table, bits, bucket_size, out, k0, k1, mode, divisor):
    m, fm, l0, l1, per_bucket = _decode_constants(table, bits, bucket_size)
    sign = np.float32(-1.0) if mode == _DECODE_SUB else np.float32(1.0)    # see _combine
    seen = 0
    for k in range(k0, k1):
        pk = packed[k * per_bucket:(k + 1) * per_bucket]
        os = out[k * bucket_size:(k + 1) * bucket_size]
        sk = sign * scales[k]
        # a call site per mode, each with the mode as a constant: the inlined loops then carry no
        # branch on it (LLVM does not reliably unswitch them itself; measured 2x)
        if mode == _DECODE:
            b = _decode_aligned_bucket(pk, bits, sk, m, fm, l0, l1, os, _DECODE, divisor)
        elif mode == _DECODE_ADD or mode == _DECODE_SUB:
            b = _decode_aligned_bucket(pk, bits, sk, m, fm, l0, l1, os, _DECODE_ADD, divisor)
        else:
            b = _decode_aligned_bucket(pk, bits, sk, m, fm, l0, l1, os, _DECODE_ADD_DIV, divisor)
        seen = max(seen, b)
    return seen


@njit(**_INLINE)
def _table_aligned(table, bits, bucket_size):
    """_aligned for a decode table: a uniform grid has its m at _GRID_SLOT; two levels are the
    only valid 1-bit codebook."""
    return _aligned(table[_GRID_SLOT] > _F32_ZERO, 2, bits, bucket_size)


@njit(**_JIT)
def _decode_span(scales, packed, table, bits, bucket_size, out, e0, e1, mode, divisor):
    """_decode_blocks over elements e0..e1-1, its whole buckets on the byte-aligned path where
    that applies. Returns the largest code seen."""
    k0, k1 = _whole_buckets(e0, e1, bucket_size)
    # (_CHECK_CODES, which only looks at codes, stays on the block path: one more inlined copy of
    # the aligned loops would cost compile time for a mode used only before decode_add)
    if not _table_aligned(table, bits, bucket_size) or k1 <= k0 or mode == _CHECK_CODES:
        return _decode_blocks(scales, packed, table, bits, bucket_size, out, e0, e1, mode, divisor)
    seen = 0
    if k0 * bucket_size > e0:
        seen = _decode_blocks(scales, packed, table, bits, bucket_size, out, e0, k0 * bucket_size, mode, divisor)
    seen = max(seen, _decode_aligned(scales, packed, table, bits, bucket_size, out, k0, k1, mode, divisor))
    if e1 > k1 * bucket_size:
        seen = max(seen, _decode_blocks(scales, packed, table, bits, bucket_size, out, k1 * bucket_size, e1, mode,
                                        divisor))
    return seen


@njit(**_JIT)
def _mean_aligned(scales, packed, table, bits, bucket_size, out, k0, k1, divisor):
    """_mean_blocks over whole buckets k0..k1-1: each bucket of out takes the rows' decodes in
    rank order while it is in L1, then the division."""
    m, fm, l0, l1, per_bucket = _decode_constants(table, bits, bucket_size)
    seen = 0
    for k in range(k0, k1):
        os = out[k * bucket_size:(k + 1) * bucket_size]
        seen = max(seen, _decode_aligned_bucket(packed[0, k * per_bucket:(k + 1) * per_bucket], bits, scales[0, k],
                                                m, fm, l0, l1, os, _DECODE, divisor))
        for r in range(1, scales.shape[0]):        # constant modes: see _decode_aligned
            seen = max(seen, _decode_aligned_bucket(packed[r, k * per_bucket:(k + 1) * per_bucket], bits,
                                                    scales[r, k], m, fm, l0, l1, os, _DECODE_ADD, divisor))
        for e in range(bucket_size):
            os[e] = os[e] / divisor
    return seen


@njit(**_JIT)
def _mean_span(scales, packed, table, bits, bucket_size, out, e0, e1, divisor):
    """_mean_blocks over elements e0..e1-1, its whole buckets on the byte-aligned path where
    that applies. Returns the largest code seen."""
    k0, k1 = _whole_buckets(e0, e1, bucket_size)
    if not _table_aligned(table, bits, bucket_size) or k1 <= k0:
        return _mean_blocks(scales, packed, table, bits, bucket_size, out, e0, e1, divisor)
    seen = 0
    if k0 * bucket_size > e0:
        seen = _mean_blocks(scales, packed, table, bits, bucket_size, out, e0, k0 * bucket_size, divisor)
    seen = max(seen, _mean_aligned(scales, packed, table, bits, bucket_size, out, k0, k1, divisor))
    if e1 > k1 * bucket_size:
        seen = max(seen, _mean_blocks(scales, packed, table, bits, bucket_size, out, k1 * bucket_size, e1, divisor))
    return seen


__all__ = ["encode", "encode_ef", "decode", "decode_add", "decode_into", "decode_mean", "first_flagged_byte",
           "any_all_ones_code"]
