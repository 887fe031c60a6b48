"""CuPy (CUDA) kernels for the quantizer family, bit-identical to :mod:`hvd_qadam.quant.reference`.

Same functions as the numba CPU backend, on CuPy arrays: ``encode(x, levels, bits, bucket_size,
scale_kind, stochastic, key, offset)`` -> (scales, packed), ``decode(...)``, ``decode_into(out,
...)``, ``decode_add(acc, ..., divisor=None)``, and the fused ones: ``encode_ef(v, e, out, ...)``
(error feedback p = v + e, its codes and the new residual out = p - decode(codes) without storing p)
and ``decode_mean(out, scales_list, packed_list, ...)`` (the mean of N payloads, out written once);
also the optimizer transforms of :mod:`hvd_qadam.functional` (``adam_update``, ``momentum_update``,
``momentum_ema``, ``frozen_adam_apply``, ``axpby``), same signatures and constants, bit for bit its
numba kernels. All run on the input's device and on the current CuPy stream; nothing is synchronised
except encode_ef's non-finite flag (``.get()`` on a result waits for the stream, as usual in CuPy).
Only the GPU path uses this module (``backend.gpu_backend()``); it imports without CuPy (for
``KERNEL_SOURCE`` and the NumPy helpers), and its kernels raise ImportError then.

How the output matches the CPU bit for bit:
  * Every float operation is an explicit IEEE round-to-nearest intrinsic (__fdiv_rn, __fmul_rn,
    __dadd_rn, ...): NVRTC would otherwise contract a*b+c into an FMA, which rounds once where
    the reference rounds twice. Division is a true division, sqrt a correctly rounded one.
  * Uniform grids (common.uniform_grid_m) use the reference's grid formula t = r m + m,
    j = min(floor(t), K-2), p = t - j; for other codebooks j (the largest level <= r, clipped
    to 0..K-2) comes from a binary search over the level table itself, so it equals
    np.searchsorted. The uniforms are the counter-based 32-bit
    hash of :mod:`.rng`, a pure function of (key, element index).
  * Bucket scales are float64 sums in NumPy's own order, rounded once to float32, as on the
    CPU (the shared orders are spelled out in :mod:`.common`): one thread per bucket sums it
    sequentially; long buckets (> 8192) are split where NumPy's order allows it without
    changing a bit (8192-element pieces of a single-bucket L2 sum, chunks of a max, subtrees of
    the pairwise mean |x|). A long L2 bucket among several is summed by one thread: exact, but
    slow for buckets of millions. Should a NumPy build use another summation order, only the
    last float64 bits of a scale's sum can differ, which changes the float32 scale only when the
    sum lies within those bits of a float32 rounding boundary (practically never).
Codes past the codebook (only a corrupt payload has them; the wire format rejects those)
decode to NaN rather than reading out of bounds; unlike the CPU backend, the GPU does not stop
to check.

``KERNEL_SOURCE`` is plain CUDA C++ with ``extern "C"`` kernels that are thin loops over
``__host__ __device__`` functions, so a test can compile it with ``nvcc`` and even run those
functions on the host (the test suite's CuPy stand-in runs whole launches so). The scale and
encode functions are templates over their input, a pointer or ``hq_ef_sum`` (v[i] + e[i] formed
on load), which is how the error-feedback kernels share every line of the plain ones. Every
constant the source shares with the Python side (the hash constants of :mod:`.rng`, the scale
kinds of :mod:`.codebooks`, NumPy's summation sizes and the level-table layout of
:mod:`.common`) is written into it from the Python definition (``_shared_defines``).
"""
from __future__ import annotations

import functools
import time

import numpy as np

try:
    import cupy as cp
except ImportError:  # a CPU machine: KERNEL_SOURCE and the NumPy helpers still work
    cp = None

from . import rng
from .codebooks import SCALE_L2, SCALE_MAXABS, SCALE_MEANABS
from .common import (EINSUM_BUFFER, F32_ABS_MASK, F32_INF_BITS, PAIRWISE_LEAF, TABLE_WIDTH, check_decode_sizes,
                     check_kernel_args, check_offset, check_scale_kind, level_tables, num_buckets, packed_nbytes,
                     stream_key_u64)

_THREADS = 256          # threads per block
_PIECE = EINSUM_BUFFER  # HQ_PIECE: long buckets are split into pieces of NumPy's iterator buffer
# The order of the rows in the flat table block (see host_tables), at multiples of TABLE_WIDTH.
_TABLE_ROWS = ("levels", "widths", "search", "decode", "params")
_OPTIONS = ("--std=c++17", "--fmad=false")  # the source uses _rn intrinsics anyway


def _shared_defines() -> str:
    """The ``#define``s of every constant the CUDA source shares with the Python side."""
    u32 = "0x{:08X}u".format
    shift1, shift2, shift3 = rng.HASH_SHIFTS
    defines = {
        "HQ_HASH_A": u32(rng.HASH_A), "HQ_HASH_B": u32(rng.HASH_B), "HQ_HASH_C1": u32(rng.HASH_C1),
        "HQ_HASH_C2": u32(rng.HASH_C2),
        "HQ_HASH_SHIFT1": shift1, "HQ_HASH_SHIFT2": shift2, "HQ_HASH_SHIFT3": shift3,
        "HQ_UNIFORM_SHIFT": rng.UNIFORM_SHIFT,
        "HQ_UNIFORM_SCALE": float(rng.UNIFORM_SCALE).hex() + "f",   # exact: a hexadecimal literal
        "HQ_PAIRWISE_LEAF": PAIRWISE_LEAF, "HQ_PIECE": _PIECE,
        "HQ_SCALE_L2": SCALE_L2, "HQ_SCALE_MAXABS": SCALE_MAXABS, "HQ_SCALE_MEANABS": SCALE_MEANABS,
        "HQ_ABS_MASK": f"0x{F32_ABS_MASK:08X}u", "HQ_INF_BITS": f"0x{F32_INF_BITS:08X}u",
        "HQ_TABLE_WIDTH": TABLE_WIDTH,
        **{f"HQ_{row.upper()}": i * TABLE_WIDTH for i, row in enumerate(_TABLE_ROWS)},
    }
    return "".join(f"#define {name} {value}\n" for name, value in defines.items())


_PRELUDE = r"""
// hvd_qadam quantizer kernels: see hvd_qadam/quant/gpu_cupy.py and reference.py.
#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <cstring>
#endif

typedef unsigned long long hq_u64;
typedef long long hq_i64;
typedef unsigned int hq_u32;
typedef unsigned char hq_u8;

#define HQ_FN __host__ __device__ __forceinline__
// Constants defined in Python (rng.py, codebooks.py, common.py):
"""

_BODY = r"""
// HQ_PAIRWISE_LEAF: NumPy's pairwise-summation leaf; HQ_PIECE: NumPy's iterator buffer, also the
// split size of long buckets.

// IEEE round-to-nearest operations that the compiler may not fuse or approximate.
#if defined(__CUDA_ARCH__)
#define F32_ADD(a, b) __fadd_rn((a), (b))
#define F32_SUB(a, b) __fsub_rn((a), (b))
#define F32_MUL(a, b) __fmul_rn((a), (b))
#define F32_DIV(a, b) __fdiv_rn((a), (b))
#define F64_ADD(a, b) __dadd_rn((a), (b))
#define F64_MUL(a, b) __dmul_rn((a), (b))
#define F64_DIV(a, b) __ddiv_rn((a), (b))
#define F64_SQRT(a) __dsqrt_rn(a)
#else
#define F32_ADD(a, b) ((a) + (b))
#define F32_SUB(a, b) ((a) - (b))
#define F32_MUL(a, b) ((a) * (b))
#define F32_DIV(a, b) ((a) / (b))
#define F64_ADD(a, b) ((a) + (b))
#define F64_MUL(a, b) ((a) * (b))
#define F64_DIV(a, b) ((a) / (b))
#define F64_SQRT(a) std::sqrt(a)
#endif

HQ_FN float hq_float_from_bits(hq_u32 bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

HQ_FN hq_u32 hq_bits_of(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    hq_u32 bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
#endif
}

HQ_FN hq_i64 hq_min(hq_i64 a, hq_i64 b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------- inputs
// The scale and encode functions are templates over where their float32 input x[i] comes
// from (``Src``, indexed and offset like a pointer): a plain ``const float*``, or hq_ef_sum,
// error feedback's p = v + e formed on load (one float32 addition, as the CPU's), so the fused
// kernels never store p before its codes are known.
struct hq_ef_sum {
    const float* v;
    const float* e;
    HQ_FN float operator[](hq_i64 i) const { return F32_ADD(v[i], e[i]); }
    HQ_FN hq_ef_sum operator+(hq_i64 k) const { return hq_ef_sum{v + k, e + k}; }
};

// ---------------------------------------------------------------------------- counter-based RNG
// rng.uniform: the 32-bit counter hash of (key, index), top 24 bits * 2^-24.
HQ_FN float hq_uniform(hq_u64 key, hq_u64 index) {
    hq_u32 x = (hq_u32)index * HQ_HASH_A + (hq_u32)key + (hq_u32)(index >> 32) * HQ_HASH_B;
    x ^= x >> HQ_HASH_SHIFT1;
    x *= HQ_HASH_C1;
    x ^= (hq_u32)(key >> 32);
    x ^= x >> HQ_HASH_SHIFT2;
    x *= HQ_HASH_C2;
    x ^= x >> HQ_HASH_SHIFT3;
    return F32_MUL((float)(x >> HQ_UNIFORM_SHIFT), HQ_UNIFORM_SCALE);
}

// ---------------------------------------------------------------------------- bucket scales
// Sum of float64 squares in np.einsum's order: two lanes, four products chained per lane per
// step of 8 elements, a zero-filled last vector, lanes added at the end.
template <class Src>
HQ_FN double hq_sumsq_einsum(Src v, hq_i64 n) {
    double lane0 = 0.0, lane1 = 0.0;
    hq_i64 n8 = n - n % 8;
    for (hq_i64 i = 0; i < n8; i += 8) {
        double t0 = F64_ADD(F64_MUL((double)v[i + 6], (double)v[i + 6]), lane0);
        double t1 = F64_ADD(F64_MUL((double)v[i + 7], (double)v[i + 7]), lane1);
        t0 = F64_ADD(F64_MUL((double)v[i + 4], (double)v[i + 4]), t0);
        t1 = F64_ADD(F64_MUL((double)v[i + 5], (double)v[i + 5]), t1);
        t0 = F64_ADD(F64_MUL((double)v[i + 2], (double)v[i + 2]), t0);
        t1 = F64_ADD(F64_MUL((double)v[i + 3], (double)v[i + 3]), t1);
        lane0 = F64_ADD(F64_MUL((double)v[i], (double)v[i]), t0);
        lane1 = F64_ADD(F64_MUL((double)v[i + 1], (double)v[i + 1]), t1);
    }
    for (hq_i64 i = n8; i < n; ++i) {
        double sq = F64_MUL((double)v[i], (double)v[i]);
        if ((i - n8) % 2 == 0) lane0 = F64_ADD(sq, lane0); else lane1 = F64_ADD(sq, lane1);
    }
    return F64_ADD(lane0, lane1);
}

// max |x| as a bit pattern (|x| orders like its bits with the sign cleared; NaN above inf)
template <class Src>
HQ_FN hq_u32 hq_max_abs_bits(Src v, hq_i64 n) {
    hq_u32 m = 0;
    for (hq_i64 i = 0; i < n; ++i) {
        hq_u32 b = hq_bits_of(v[i]) & HQ_ABS_MASK;
        m = b > m ? b : m;
    }
    return m;
}

HQ_FN float hq_max_abs_scale(hq_u32 m) {
    return m > HQ_INF_BITS ? hq_float_from_bits(0x7FC00000u) : hq_float_from_bits(m);  // NaN
}

// One leaf (n <= 128) of NumPy's pairwise sum of |v[lo:lo+n]|; positions >= valid are zeros
// (the reference pads the last bucket), and skipping them adds exactly what they would.
template <class Src>
HQ_FN double hq_pairwise_leaf(Src v, hq_i64 valid, hq_i64 lo, hq_i64 n) {
    if (lo >= valid) return 0.0;
    if (n < 8) {
        double res = 0.0;
        for (hq_i64 i = lo; i < hq_min(lo + n, valid); ++i) res = F64_ADD(res, fabs((double)v[i]));
        return res;
    }
    hq_i64 n8 = n - n % 8;
    double r[8];
    for (int k = 0; k < 8; ++k) r[k] = lo + k < valid ? fabs((double)v[lo + k]) : 0.0;
    for (hq_i64 i = lo + 8; i < hq_min(lo + n8, valid); ++i)
        r[(i - lo) % 8] = F64_ADD(r[(i - lo) % 8], fabs((double)v[i]));
    double res = F64_ADD(F64_ADD(F64_ADD(r[0], r[1]), F64_ADD(r[2], r[3])),
                         F64_ADD(F64_ADD(r[4], r[5]), F64_ADD(r[6], r[7])));
    for (hq_i64 i = lo + n8; i < hq_min(lo + n, valid); ++i) res = F64_ADD(res, fabs((double)v[i]));
    return res;
}

// NumPy's pairwise sum of |v| over [lo0, lo0+n0): halves cut at a multiple of 8, recursively,
// down to leaves of <= 128 (an explicit stack). A subtree starting at or past ``limit`` holds
// only padding and sums to exactly 0. With ``pieces`` given, every other subtree of at most
// HQ_PIECE elements is read from pieces[] (left to right) instead of being summed here; the
// limit is then the same for all buckets (see gpu_cupy.pairwise_pieces), else ``valid``.
template <class Src>
HQ_FN double hq_pairwise_abs_sum(Src v, hq_i64 valid, hq_i64 lo0, hq_i64 n0, const double* pieces,
                                 hq_i64 limit) {
    hq_i64 lo_stack[64], n_stack[64];
    int state[64];
    double values[64];
    int top = 0, num_values = 0;
    hq_i64 next_piece = 0;
    lo_stack[0] = lo0; n_stack[0] = n0; state[0] = 0;
    while (top >= 0) {
        hq_i64 lo = lo_stack[top], m = n_stack[top];
        if (lo >= limit) {
            values[num_values++] = 0.0;
            --top;
            continue;
        }
        if (pieces != 0 && m <= HQ_PIECE) {
            values[num_values++] = pieces[next_piece++];
            --top;
            continue;
        }
        if (m <= HQ_PAIRWISE_LEAF) {
            values[num_values++] = hq_pairwise_leaf(v, valid, lo, m);
            --top;
            continue;
        }
        hq_i64 half = m / 2;
        half -= half % 8;
        if (state[top] == 0) {
            state[top] = 1;
            ++top; lo_stack[top] = lo; n_stack[top] = half; state[top] = 0;
        } else if (state[top] == 1) {
            state[top] = 2;
            ++top; lo_stack[top] = lo + half; n_stack[top] = m - half; state[top] = 0;
        } else {
            --num_values;
            values[num_values - 1] = F64_ADD(values[num_values - 1], values[num_values]);
            --top;
        }
    }
    return values[0];
}

// One piece of a long bucket (see gpu_cupy._scale_pieces): the L2 sum of 8192 elements of a
// single-bucket vector, the max |x| bits of 8192 elements of bucket k, or the pairwise sum of
// subtree (piece_lo, piece_len) of bucket k.
template <class Src>
HQ_FN double hq_scale_piece(Src x, hq_i64 n, hq_i64 bucket_size, int scale_kind, hq_i64 k, hq_i64 q,
                            hq_i64 piece_lo, hq_i64 piece_len) {
    hq_i64 start = k * bucket_size;
    hq_i64 valid = hq_min(bucket_size, n - start);
    if (scale_kind == HQ_SCALE_MEANABS)
        return hq_pairwise_abs_sum(x + start, valid, piece_lo, piece_len, (const double*)0, valid);
    hq_i64 lo = q * HQ_PIECE;
    hq_i64 len = lo < valid ? hq_min(HQ_PIECE, valid - lo) : 0;
    if (scale_kind == HQ_SCALE_L2) return hq_sumsq_einsum(x + start + lo, len);
    return (double)hq_max_abs_bits(x + start + lo, len);
}

// scales[k]; ``pieces`` (num_pieces per bucket) when the bucket was split, else null.
template <class Src>
HQ_FN float hq_bucket_scale(Src x, hq_i64 n, hq_i64 bucket_size, hq_i64 num_buckets, int scale_kind,
                            hq_i64 k, const double* pieces, hq_i64 num_pieces) {
    hq_i64 start = k * bucket_size;
    hq_i64 valid = hq_min(bucket_size, n - start);
    const double* own = pieces != 0 ? pieces + k * num_pieces : 0;
    if (scale_kind == HQ_SCALE_L2) {
        double total = 0.0;
        if (own != 0) {
            for (hq_i64 q = 0; q < num_pieces; ++q) total = F64_ADD(total, own[q]);
        } else if (num_buckets == 1) {  // einsum sums a single row in 8192-element buffers
            for (hq_i64 c = 0; c < valid; c += HQ_PIECE)
                total = F64_ADD(total, hq_sumsq_einsum(x + start + c, hq_min(HQ_PIECE, valid - c)));
        } else {
            total = hq_sumsq_einsum(x + start, valid);
        }
        return (float)F64_SQRT(total);
    }
    if (scale_kind == HQ_SCALE_MAXABS) {
        hq_u32 m = 0;
        if (own != 0) {
            for (hq_i64 q = 0; q < num_pieces; ++q) m = (hq_u32)own[q] > m ? (hq_u32)own[q] : m;
        } else {
            m = hq_max_abs_bits(x + start, valid);
        }
        return hq_max_abs_scale(m);
    }
    double total = hq_pairwise_abs_sum(x + start, valid, 0, bucket_size, own,
                                       own != 0 ? hq_min(bucket_size, n) : valid);
    return (float)F64_DIV(total, (double)valid);
}

// ---------------------------------------------------------------------------- quantize + pack
// tables: rows of HQ_TABLE_WIDTH entries (common.LevelTables) at HQ_LEVELS: the levels,
// HQ_WIDTHS: widths l_{j+1} - l_j, HQ_SEARCH: l_0..l_{K-2} padded with +inf for the binary
// search, HQ_DECODE: the levels padded with NaN for decoding, HQ_PARAMS: [0] = m of a uniform
// grid l_i = (i - m) / m (common.uniform_grid_m), else 0.

HQ_FN int hq_code(float xv, float s, const float* tables, int num_levels, int search_steps, int stochastic,
                  hq_u64 key, hq_u64 index) {
    const float first = tables[HQ_LEVELS], last = tables[HQ_LEVELS + num_levels - 1];
    float q = F32_DIV(xv, s);
    float r = s > 0.0f ? q : 0.0f;           // a zero scale gives r = 0
    r = r < first ? first : r;
    r = r > last ? last : r;
    const bool is_nan = r != r;               // only from inf/NaN input
    const float rs = is_nan ? first : r;
    const float fm = tables[HQ_PARAMS];
    int j = 0;
    float p;
    if (fm > 0.0f) {                          // uniform grid: t = r m + m, j = floor(t), p = t - j
        const float t = F32_ADD(F32_MUL(rs, fm), fm);
        j = (int)t;                           // t >= 0: truncation is floor
        j = j > num_levels - 2 ? num_levels - 2 : j;
        p = F32_SUB(t, (float)j);
    } else {
        int step = 1 << search_steps;
        for (int t = 0; t < search_steps; ++t) {  // last entry <= r of l_0..l_{K-2}, +inf padded
            step >>= 1;
            j = tables[HQ_SEARCH + j + step] <= rs ? j + step : j;
        }
        p = F32_DIV(F32_SUB(r, tables[HQ_LEVELS + j]), tables[HQ_WIDTHS + j]);
    }
    int up = stochastic ? (hq_uniform(key, index) < p) : (p >= 0.5f);
    // np.searchsorted puts NaN after every level (j = K-2) and p = NaN never rounds up
    return is_nan ? num_levels - 2 : j + up;
}

// Elements 8g .. 8g+7 -> exactly ``bits`` bytes at packed[g * bits] (fewer for the last group).
// With ``residual``: residual[i] = x[i] - level(code_i) * scale, error feedback's new residual
// p - decode(q), formed while the code is at hand (bit for bit a decode and a subtraction).
template <class Src>
HQ_FN void hq_encode_group(hq_i64 g, Src x, hq_i64 n, const float* scales, hq_i64 bucket_size,
                           const float* tables, int num_levels, int search_steps, int bits, int stochastic,
                           hq_u64 key, hq_u64 offset, hq_u8* packed, float* residual = 0) {
    hq_i64 e0 = g * 8;
    int count = (int)hq_min(8, n - e0);
    hq_i64 k = e0 / bucket_size, next_bucket = (k + 1) * bucket_size;
    float s = scales[k];
    hq_u64 acc = 0;
    for (int t = 0; t < count; ++t) {
        hq_i64 i = e0 + t;
        if (i == next_bucket) { ++k; next_bucket += bucket_size; s = scales[k]; }
        const float xv = x[i];
        int code = hq_code(xv, s, tables, num_levels, search_steps, stochastic, key, offset + (hq_u64)i);
        acc |= (hq_u64)code << (t * bits);
        if (residual != 0) residual[i] = F32_SUB(xv, F32_MUL(tables[HQ_DECODE + code], s));
    }
    int nbytes = (count * bits + 7) / 8;
    for (int b = 0; b < nbytes; ++b) packed[g * bits + b] = (hq_u8)(acc >> (8 * b));
}

// level(code_i) * scale of element i, codes LSB-first.
HQ_FN float hq_decoded(hq_i64 i, const float* scales, const hq_u8* packed, const float* tables, int bits,
                       hq_i64 bucket_size) {
    hq_i64 bit = i * bits;
    hq_u32 window = packed[bit >> 3];
    int shift = (int)(bit & 7);
    if (shift + bits > 8) window |= (hq_u32)packed[(bit >> 3) + 1] << 8;
    hq_u32 code = (window >> shift) & ((1u << bits) - 1u);
    return F32_MUL(tables[HQ_DECODE + code], scales[i / bucket_size]);
}

// mode HQ_DECODE_SET: out[i] = decoded; HQ_DECODE_ADD: out[i] += decoded; HQ_DECODE_ADD_DIV:
// out[i] = (out[i] + decoded) / divisor (the last payload of a mean, as the CPU's decode_add).
#define HQ_DECODE_SET 0
#define HQ_DECODE_ADD 1
#define HQ_DECODE_ADD_DIV 2
HQ_FN void hq_decode_element(hq_i64 i, const float* scales, const hq_u8* packed, const float* tables, int bits,
                             hq_i64 bucket_size, int mode, float* out, float divisor = 1.0f) {
    float value = hq_decoded(i, scales, packed, tables, bits, bucket_size);
    if (mode == HQ_DECODE_SET) out[i] = value;
    else if (mode == HQ_DECODE_ADD) out[i] = F32_ADD(out[i], value);
    else out[i] = F32_DIV(F32_ADD(out[i], value), divisor);
}

// out[i] = ((d_0 + d_1) + ... + d_{rows-1}) / divisor, d_r decoded from row r of the stacked
// scales (num_buckets per row) and codes (row_bytes per row): the sum in row (rank) order, as
// the CPU's decode_mean, and out written once.
HQ_FN void hq_decode_mean_element(hq_i64 i, const float* scales, hq_i64 num_buckets, const hq_u8* packed,
                                  hq_i64 row_bytes, int rows, const float* tables, int bits, hq_i64 bucket_size,
                                  float divisor, float* out) {
    float acc = hq_decoded(i, scales, packed, tables, bits, bucket_size);
    for (int r = 1; r < rows; ++r)
        acc = F32_ADD(acc, hq_decoded(i, scales + r * num_buckets, packed + r * row_bytes, tables, bits,
                                      bucket_size));
    out[i] = F32_DIV(acc, divisor);
}

// Whether any of x[0 .. n) is inf or NaN.
template <class Src>
HQ_FN int hq_any_nonfinite(Src x, hq_i64 n) {
    for (hq_i64 i = 0; i < n; ++i)
        if ((hq_bits_of(x[i]) & HQ_ABS_MASK) >= HQ_INF_BITS) return 1;
    return 0;
}

// ---------------------------------------------------------------------------- optimizer transforms
// hvd_qadam.functional's kernels, element i, float32 one IEEE operation at a time in the same
// order (see there for the math). Flags are ints, constants float32; an input that a flag turns
// off (x without weight decay, buf on the first step) is never read.
HQ_FN float hq_sqrt_f32(float a) { return (float)F64_SQRT((double)a); }   // math.sqrt, rounded once

HQ_FN void hq_adam_element(hq_i64 i, const float* g, const float* m, const float* v, const float* x, float* m_out,
                           float* v_out, float* d_out, float sign, float l2, float b1, float omb1, float b2,
                           float omb2, int use_bc, float bc1, float bc2, float lr, float eps, float lr_wd,
                           int decoupled) {
    float gi = F32_MUL(g[i], sign);
    if (l2 != 0.0f) gi = F32_ADD(gi, F32_MUL(x[i], l2));
    float mi = F32_ADD(F32_MUL(m[i], b1), F32_MUL(gi, omb1));
    float vi = F32_ADD(F32_MUL(v[i], b2), F32_MUL(F32_MUL(gi, gi), omb2));
    m_out[i] = mi;
    v_out[i] = vi;
    if (use_bc) {
        mi = F32_DIV(mi, bc1);
        vi = F32_DIV(vi, bc2);
    }
    float d = F32_DIV(F32_MUL(mi, lr), F32_ADD(hq_sqrt_f32(vi), eps));
    if (decoupled) d = F32_ADD(d, F32_MUL(x[i], lr_wd));
    d_out[i] = d;
}

HQ_FN void hq_momentum_element(hq_i64 i, const float* g, const float* buf, const float* x, float* buf_out,
                               float* d_out, float sign, float wd, float momentum, float damp, int first,
                               int nesterov, float lr) {
    float gi = F32_MUL(g[i], sign);
    if (wd != 0.0f) gi = F32_ADD(gi, F32_MUL(x[i], wd));
    if (momentum != 0.0f) {
        const float b = first ? gi : F32_ADD(F32_MUL(buf[i], momentum), F32_MUL(gi, damp));
        buf_out[i] = b;
        gi = nesterov ? F32_ADD(gi, F32_MUL(b, momentum)) : b;
    }
    d_out[i] = F32_MUL(gi, lr);
}

HQ_FN void hq_momentum_ema_element(hq_i64 i, const float* g, const float* m, const float* x, float* out, float sign,
                                   float l2, float b1, float omb1) {
    float gi = F32_MUL(g[i], sign);
    if (l2 != 0.0f) gi = F32_ADD(gi, F32_MUL(x[i], l2));
    out[i] = F32_ADD(F32_MUL(m[i], b1), F32_MUL(gi, omb1));
}

HQ_FN void hq_frozen_adam_element(hq_i64 i, const float* m, const float* v, const float* x, float* m_out,
                                  float* d_out, int use_bc, float bc2, float lr, float eps, float lr_wd,
                                  int decoupled) {
    float vi = v[i], mi, d;
    if (vi == 0.0f) {
        mi = 0.0f;
        d = 0.0f;
    } else {
        mi = m[i];
        if (use_bc) vi = F32_DIV(vi, bc2);
        d = F32_DIV(F32_MUL(mi, lr), F32_ADD(hq_sqrt_f32(vi), eps));
    }
    if (decoupled) d = F32_ADD(d, F32_MUL(x[i], lr_wd));
    m_out[i] = mi;
    d_out[i] = d;
}

// ---------------------------------------------------------------------------- kernels
// HQ_HOST_LAUNCH: a host build that supplies blockIdx/blockDim/threadIdx itself and runs every
// grid x block index in turn (the test suite's CuPy stand-in); other host builds see thread 0.
HQ_FN hq_i64 hq_thread_index() {
#if defined(__CUDA_ARCH__) || defined(HQ_HOST_LAUNCH)
    return (hq_i64)blockIdx.x * blockDim.x + threadIdx.x;
#else
    return 0;
#endif
}

extern "C" __global__ void hq_scale_pieces(const float* x, hq_i64 n, hq_i64 bucket_size, int scale_kind,
                                           hq_i64 num_buckets, hq_i64 num_pieces, const hq_i64* piece_lo,
                                           const hq_i64* piece_len, double* pieces) {
    hq_i64 id = hq_thread_index();
    if (id >= num_buckets * num_pieces) return;
    hq_i64 k = id / num_pieces, q = id % num_pieces;
    pieces[id] = hq_scale_piece(x, n, bucket_size, scale_kind, k, q, piece_lo[q], piece_len[q]);
}

extern "C" __global__ void hq_bucket_scales(const float* x, hq_i64 n, hq_i64 bucket_size, hq_i64 num_buckets,
                                            int scale_kind, const double* pieces, hq_i64 num_pieces,
                                            float* scales) {
    hq_i64 k = hq_thread_index();
    if (k < num_buckets)
        scales[k] = hq_bucket_scale(x, n, bucket_size, num_buckets, scale_kind, k, num_pieces ? pieces : 0,
                                    num_pieces);
}

extern "C" __global__ void hq_encode(const float* x, hq_i64 n, const float* scales, hq_i64 bucket_size,
                                     const float* tables, int num_levels, int search_steps, int bits,
                                     int stochastic, hq_u64 key, hq_u64 offset, hq_u8* packed) {
    hq_i64 g = hq_thread_index();
    if (g * 8 < n)
        hq_encode_group(g, x, n, scales, bucket_size, tables, num_levels, search_steps, bits, stochastic, key,
                        offset, packed);
}

extern "C" __global__ void hq_decode(const float* scales, const hq_u8* packed, const float* tables, int bits,
                                     hq_i64 bucket_size, hq_i64 n, int mode, float divisor, float* out) {
    hq_i64 i = hq_thread_index();
    if (i < n) hq_decode_element(i, scales, packed, tables, bits, bucket_size, mode, out, divisor);
}

// The mean of ``rows`` payloads in one pass (see hq_decode_mean_element).
extern "C" __global__ void hq_decode_mean(const float* scales, hq_i64 num_buckets, const hq_u8* packed,
                                          hq_i64 row_bytes, int rows, const float* tables, int bits,
                                          hq_i64 bucket_size, hq_i64 n, float divisor, float* out) {
    hq_i64 i = hq_thread_index();
    if (i < n)
        hq_decode_mean_element(i, scales, num_buckets, packed, row_bytes, rows, tables, bits, bucket_size, divisor,
                               out);
}

// Error feedback fused with quantization: the kernels above with p = v + e formed on load
// (hq_ef_sum). The scales first (pieces of long buckets, then one thread per bucket, which also
// flags a bucket whose p holds inf or NaN: only a non-finite scale sends it to that check), then
// one thread per 8 elements writes their codes and the new residual out = p - decode(codes).
extern "C" __global__ void hq_ef_scale_pieces(const float* v, const float* e, hq_i64 n, hq_i64 bucket_size,
                                              int scale_kind, hq_i64 num_buckets, hq_i64 num_pieces,
                                              const hq_i64* piece_lo, const hq_i64* piece_len, double* pieces) {
    hq_i64 id = hq_thread_index();
    if (id >= num_buckets * num_pieces) return;
    hq_i64 k = id / num_pieces, q = id % num_pieces;
    pieces[id] = hq_scale_piece(hq_ef_sum{v, e}, n, bucket_size, scale_kind, k, q, piece_lo[q], piece_len[q]);
}

extern "C" __global__ void hq_ef_bucket_scales(const float* v, const float* e, hq_i64 n, hq_i64 bucket_size,
                                               hq_i64 num_buckets, int scale_kind, const double* pieces,
                                               hq_i64 num_pieces, float* scales, hq_u8* nonfinite) {
    hq_i64 k = hq_thread_index();
    if (k >= num_buckets) return;
    const hq_ef_sum p{v, e};
    const float s = hq_bucket_scale(p, n, bucket_size, num_buckets, scale_kind, k, num_pieces ? pieces : 0,
                                    num_pieces);
    scales[k] = s;
    const hq_i64 start = k * bucket_size;
    nonfinite[k] = (hq_u8)((hq_bits_of(s) & HQ_ABS_MASK) >= HQ_INF_BITS
                           && hq_any_nonfinite(p + start, hq_min(bucket_size, n - start)));
}

extern "C" __global__ void hq_ef_encode(const float* v, const float* e, hq_i64 n, const float* scales,
                                        hq_i64 bucket_size, const float* tables, int num_levels, int search_steps,
                                        int bits, int stochastic, hq_u64 key, hq_u64 offset, hq_u8* packed,
                                        float* out) {
    hq_i64 g = hq_thread_index();
    if (g * 8 < n)
        hq_encode_group(g, hq_ef_sum{v, e}, n, scales, bucket_size, tables, num_levels, search_steps, bits,
                        stochastic, key, offset, packed, out);
}

// The optimizer transforms, one thread per element.
extern "C" __global__ void hq_adam(const float* g, const float* m, const float* v, const float* x, float* m_out,
                                   float* v_out, float* d_out, hq_i64 n, float sign, float l2, float b1, float omb1,
                                   float b2, float omb2, int use_bc, float bc1, float bc2, float lr, float eps,
                                   float lr_wd, int decoupled) {
    hq_i64 i = hq_thread_index();
    if (i < n)
        hq_adam_element(i, g, m, v, x, m_out, v_out, d_out, sign, l2, b1, omb1, b2, omb2, use_bc, bc1, bc2, lr, eps,
                        lr_wd, decoupled);
}

extern "C" __global__ void hq_momentum(const float* g, const float* buf, const float* x, float* buf_out,
                                       float* d_out, hq_i64 n, float sign, float wd, float momentum, float damp,
                                       int first, int nesterov, float lr) {
    hq_i64 i = hq_thread_index();
    if (i < n) hq_momentum_element(i, g, buf, x, buf_out, d_out, sign, wd, momentum, damp, first, nesterov, lr);
}

extern "C" __global__ void hq_momentum_ema(const float* g, const float* m, const float* x, float* out, hq_i64 n,
                                           float sign, float l2, float b1, float omb1) {
    hq_i64 i = hq_thread_index();
    if (i < n) hq_momentum_ema_element(i, g, m, x, out, sign, l2, b1, omb1);
}

extern "C" __global__ void hq_frozen_adam(const float* m, const float* v, const float* x, float* m_out,
                                          float* d_out, hq_i64 n, int use_bc, float bc2, float lr, float eps,
                                          float lr_wd, int decoupled) {
    hq_i64 i = hq_thread_index();
    if (i < n) hq_frozen_adam_element(i, m, v, x, m_out, d_out, use_bc, bc2, lr, eps, lr_wd, decoupled);
}

// out = a * alpha + b * beta
extern "C" __global__ void hq_axpby(const float* a, const float* b, float* out, hq_i64 n, float alpha, float beta) {
    hq_i64 i = hq_thread_index();
    if (i < n) out[i] = F32_ADD(F32_MUL(a[i], alpha), F32_MUL(b[i], beta));
}
"""

KERNEL_SOURCE = _PRELUDE + _shared_defines() + _BODY


def _require_cupy():
    if cp is None:
        raise ImportError("the CuPy backend needs cupy (pip install cupy-cuda12x) and a CUDA device")


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=KERNEL_SOURCE, options=_OPTIONS)


def _kernel(name: str):
    return _module(cp.cuda.runtime.getDevice()).get_function(name)


def _grid(count: int) -> tuple:
    return (max(1, -(-int(count) // _THREADS)),)


def host_tables(levels) -> tuple[np.ndarray, int]:
    """(float32[5 * TABLE_WIDTH] table block, binary search steps) for a sorted codebook: the
    rows of common.level_tables one after the other, in _TABLE_ROWS order (see HQ_LEVELS)."""
    shared = level_tables(levels)
    return np.concatenate([getattr(shared, row) for row in _TABLE_ROWS]), shared.search_steps


@functools.lru_cache(maxsize=64)
def _device_tables(device_id: int, level_bytes: bytes):
    tables, steps = host_tables(np.frombuffer(level_bytes, dtype=np.float32))
    with cp.cuda.Device(device_id):
        return cp.asarray(tables), steps


def pairwise_pieces(length: int, limit: int, piece: int = _PIECE) -> tuple[np.ndarray, np.ndarray]:
    """The subtrees of NumPy's pairwise summation over ``length`` (padded) elements where the
    recursion first reaches <= ``piece`` elements, left to right, skipping those that start at
    or past ``limit`` (padding in every bucket): (starts, lengths)."""
    starts, lengths, stack = [], [], [(0, length)]
    while stack:
        lo, m = stack.pop()
        if lo >= limit:
            continue
        if m <= piece:
            starts.append(lo)
            lengths.append(m)
            continue
        half = m // 2
        half -= half % 8
        stack.append((lo + half, m - half))   # popped after the left half
        stack.append((lo, half))
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


def scale_pieces(n: int, bucket_size: int, nb: int, scale_kind: int):
    """How a long bucket's scale is split across threads, or None to sum each bucket in one
    thread: (piece starts, piece lengths); only the pairwise sum uses them, the others cut
    plain 8192-element chunks (an L2 sum only in a single-bucket vector, where NumPy does)."""
    if bucket_size <= _PIECE:
        return None
    if scale_kind == SCALE_MEANABS:
        return pairwise_pieces(bucket_size, min(bucket_size, n))
    if scale_kind == SCALE_L2 and nb > 1:
        return None
    count = -(-min(bucket_size, n) // _PIECE)   # no bucket holds data past min(bucket_size, n)
    return np.zeros(count, np.int64), np.zeros(count, np.int64)


def _check_common(levels, bits, bucket_size):
    _require_cupy()
    return check_kernel_args(levels, bits, bucket_size)


def _device_f32(a, what):
    """``a`` as a flat contiguous cupy float32 array (a copy only if it is not one already)."""
    if not isinstance(a, cp.ndarray):
        raise TypeError(f"{what} must be a CuPy array, got {type(a).__name__}")
    return cp.ascontiguousarray(a, dtype=cp.float32).reshape(-1)


def _writeable_f32(a, n, what):
    if not (isinstance(a, cp.ndarray) and a.dtype == cp.float32 and a.size == n and a.flags.c_contiguous):
        raise ValueError(f"{what} must be a contiguous cupy float32 array of {n} elements")
    return a.reshape(-1)


def _scales_and_codes(prefix, sources, n, bucket_size, scale_kind, lv, bits, stochastic, key, offset, extra):
    """Launch the scale and encode kernels of one family: prefix "hq_" reads x (sources = (x,)),
    "hq_ef_" reads p = v + e (sources = (v, e)) and also writes the residual and the nonfinite
    flags (``extra`` = (flags,) and (out,)). Returns (scales, packed)."""
    nb = num_buckets(n, bucket_size)
    scales = cp.empty(nb, dtype=cp.float32)
    packed = cp.empty(packed_nbytes(n, bits), dtype=cp.uint8)
    if n == 0:
        return scales, packed
    flags, residual = extra
    tables, steps = _device_tables(sources[0].device.id, lv.tobytes())
    pieces_plan = scale_pieces(n, bucket_size, nb, scale_kind)
    num_pieces = 0
    pieces = cp.empty(1, dtype=cp.float64)
    if pieces_plan is not None:
        starts, lengths = (cp.asarray(a) for a in pieces_plan)
        num_pieces = int(starts.size)
        pieces = cp.empty(nb * num_pieces, dtype=cp.float64)
        _kernel(prefix + "scale_pieces")(
            _grid(nb * num_pieces), (_THREADS,),
            (*sources, np.int64(n), np.int64(bucket_size), np.int32(scale_kind), np.int64(nb), np.int64(num_pieces),
             starts, lengths, pieces))
    _kernel(prefix + "bucket_scales")(
        _grid(nb), (_THREADS,),
        (*sources, np.int64(n), np.int64(bucket_size), np.int64(nb), np.int32(scale_kind), pieces,
         np.int64(num_pieces), scales, *flags))
    _kernel(prefix + "encode")(
        _grid(-(-n // 8)), (_THREADS,),
        (*sources, np.int64(n), scales, np.int64(bucket_size), tables, np.int32(lv.size), np.int32(steps),
         np.int32(bits), np.int32(bool(stochastic)), stream_key_u64(key), np.uint64(offset), packed, *residual))
    return scales, packed


def encode(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset=0):
    """CuPy fp32 vector -> (scales cupy.float32[num_buckets], packed cupy.uint8[ceil(n*bits/8)])."""
    lv, bits, bucket_size = _check_common(levels, bits, bucket_size)
    scale_kind, offset = check_scale_kind(scale_kind), check_offset(offset)
    x = _device_f32(x, "encode: x")
    with x.device:
        return _scales_and_codes("hq_", (x,), int(x.size), bucket_size, scale_kind, lv, bits, stochastic, key, offset,
                                 ((), ()))


def encode_ef(v, e, out, levels, bits, bucket_size, scale_kind, stochastic, key, offset=0):
    """Error-feedback quantization fused on the device: p = v + e, (scales, packed) = encode(p),
    out = p - decode(scales, packed), without storing p: p is formed as it is loaded (one float32
    addition, as on the CPU), by the scale kernels and again by the encode kernel, which writes
    the codes and the residual together. Returns (scales, packed, nonfinite), nonfinite saying
    whether p held inf or NaN (then the codes are meaningless; it waits for the stream). Bit for
    bit the CPU's ``encode_ef``. ``out`` must not overlap ``v`` or ``e``."""
    lv, bits, bucket_size = _check_common(levels, bits, bucket_size)
    scale_kind, offset = check_scale_kind(scale_kind), check_offset(offset)
    v = _device_f32(v, "encode_ef: v")
    e = _device_f32(e, "encode_ef: e")
    n = int(v.size)
    if e.size != n:
        raise ValueError(f"encode_ef: residual has {e.size} elements, the vector {n}")
    p = _writeable_f32(out, n, "encode_ef: out")
    if cp.may_share_memory(p, v) or cp.may_share_memory(p, e):
        raise ValueError("encode_ef: out must not overlap the input vector or the residual")
    with v.device:
        flags = cp.zeros(max(1, num_buckets(n, bucket_size)), dtype=cp.uint8)
        scales, packed = _scales_and_codes("hq_ef_", (v, e), n, bucket_size, scale_kind, lv, bits, stochastic, key,
                                           offset, ((flags,), (p,)))
        return scales, packed, bool(flags.any())


_SET, _ADD, _ADD_DIV = 0, 1, 2   # HQ_DECODE_SET, HQ_DECODE_ADD, HQ_DECODE_ADD_DIV


def _decode_into(out, scales, packed, levels, bits, bucket_size, n, mode, divisor=1.0):
    lv, bits, bucket_size = _check_common(levels, bits, bucket_size)
    n = int(n)
    scales = cp.ascontiguousarray(cp.asarray(scales), dtype=cp.float32).reshape(-1)
    packed = cp.ascontiguousarray(cp.asarray(packed), dtype=cp.uint8).reshape(-1)
    check_decode_sizes(scales.size, packed.size, n, bits, bucket_size)
    if n:
        with out.device:
            tables, _ = _device_tables(out.device.id, lv.tobytes())
            _kernel("hq_decode")(
                _grid(n), (_THREADS,),
                (scales, packed, tables, np.int32(bits), np.int64(bucket_size), np.int64(n), np.int32(mode),
                 np.float32(divisor), out))
    return out


def decode(scales, packed, levels, bits, bucket_size, n):
    """Packed codes -> cupy.float32[n] (level * bucket scale), on the device of ``packed``."""
    _require_cupy()
    with cp.asarray(packed).device:
        out = cp.empty(int(n), dtype=cp.float32)
    return _decode_into(out, scales, packed, levels, bits, bucket_size, n, _SET)


def decode_into(out, scales, packed, levels, bits, bucket_size, n):
    """out[:] = decode(...) into a caller's contiguous cupy float32 buffer of n elements; returns out."""
    _require_cupy()
    _decode_into(_writeable_f32(out, int(n), "decode_into: out"), scales, packed, levels, bits, bucket_size, n, _SET)
    return out


def decode_add(acc, scales, packed, levels, bits, bucket_size, n, divisor=None):
    """acc += decode(...) in place (cupy float32 of n elements); bit for bit acc + decode(...), or
    (acc + decode(...)) / divisor when ``divisor`` is given (the last payload of a mean)."""
    _require_cupy()
    flat = _writeable_f32(acc, int(n), "decode_add: acc")
    if divisor is None:
        _decode_into(flat, scales, packed, levels, bits, bucket_size, n, _ADD)
    else:
        _decode_into(flat, scales, packed, levels, bits, bucket_size, n, _ADD_DIV, divisor)
    return acc


def _stacked(rows, dtype, width):
    """The rows (NumPy or CuPy arrays) as one cupy [len(rows), width] array: payloads received as
    host bytes go up in one copy, device ones are gathered on the device."""
    if all(isinstance(r, np.ndarray) for r in rows):
        return cp.asarray(np.stack([np.ascontiguousarray(r, dtype=dtype).reshape(-1)[:width] for r in rows]))
    return cp.stack([cp.ascontiguousarray(cp.asarray(r), dtype=dtype).reshape(-1)[:width] for r in rows])


def decode_mean(out, scales_list, packed_list, levels, bits, bucket_size, n):
    """out = (d_0 + d_1 + ... + d_{N-1}) / N in one pass over the elements, bit for bit the CPU's
    decode_mean (the sum in rank order). ``out``: a contiguous cupy float32 array of n elements."""
    _require_cupy()
    if not scales_list or len(scales_list) != len(packed_list):
        raise ValueError("decode_mean: one (scales, packed) pair per payload, at least one")
    lv, bits, bucket_size = _check_common(levels, bits, bucket_size)
    n = int(n)
    flat = _writeable_f32(out, n, "decode_mean: out")
    nb, nbytes = num_buckets(n, bucket_size), packed_nbytes(n, bits)
    for s, p in zip(scales_list, packed_list):
        check_decode_sizes(int(s.size), int(p.size), n, bits, bucket_size)
    if n:
        with out.device:
            scales = _stacked(scales_list, np.float32, nb)
            packed = _stacked(packed_list, np.uint8, nbytes)
            tables, _ = _device_tables(out.device.id, lv.tobytes())
            _kernel("hq_decode_mean")(
                _grid(n), (_THREADS,),
                (scales, np.int64(nb), packed, np.int64(nbytes), np.int32(len(scales_list)), tables, np.int32(bits),
                 np.int64(bucket_size), np.int64(n), np.float32(len(scales_list)), flat))
    return out


# ----------------------------------------------------------------------------- optimizer transforms
# hvd_qadam.functional's fused transforms on CuPy buffers, with its signatures and constant dicts
# (functional.adam_constants, momentum_constants): one thread per element, bit for bit the numba
# kernels. Every buffer is a contiguous float32 CuPy array of the same size, used in place (no
# copies: outputs may be the inputs, as on the CPU); an input that a flag turns off may be None.

def _buffers(named, n=None):
    """The cupy arrays of ``named`` ((name, array or None) pairs) as they are, after checking
    them; None becomes the first array (a placeholder the kernel never reads)."""
    first = next(a for _, a in named if a is not None)
    n = int(first.size) if n is None else n
    out = []
    for name, a in named:
        out.append(first if a is None else _writeable_f32(a, n, name))
    return n, out


def _launch_elementwise(name, n, args):
    if n:
        _kernel(name)(_grid(n), (_THREADS,), args)


def adam_update(g, m, v, x, m_out, v_out, d_out, c: dict) -> None:
    """functional.adam_update: m_out, v_out, d_out of one Adam step (x may be None without weight decay)."""
    _require_cupy()
    n, (g, m, v, x, m_out, v_out, d_out) = _buffers(
        [("g", g), ("m", m), ("v", v), ("x", x), ("m_out", m_out), ("v_out", v_out), ("d_out", d_out)])
    f = np.float32
    with g.device:
        _launch_elementwise("hq_adam", n, (g, m, v, x, m_out, v_out, d_out, np.int64(n), f(c["sign"]), f(c["l2"]),
                                           f(c["b1"]), f(c["omb1"]), f(c["b2"]), f(c["omb2"]), np.int32(c["use_bc"]),
                                           f(c["bc1"]), f(c["bc2"]), f(c["lr"]), f(c["eps"]), f(c["lr_wd"]),
                                           np.int32(c["decoupled"])))


def momentum_update(g, buf, x, buf_out, d_out, c: dict) -> None:
    """functional.momentum_update: torch.optim.SGD's direction times lr into d_out, the new buffer
    into buf_out (buf, x and buf_out may be None where the constants never use them)."""
    _require_cupy()
    n, (g, buf, x, buf_out, d_out) = _buffers([("g", g), ("buf", buf), ("x", x), ("buf_out", buf_out),
                                               ("d_out", d_out)])
    f = np.float32
    with g.device:
        _launch_elementwise("hq_momentum", n, (g, buf, x, buf_out, d_out, np.int64(n), f(c["sign"]), f(c["wd"]),
                                               f(c["momentum"]), f(c["damp"]), np.int32(c["first"]),
                                               np.int32(c["nesterov"]), f(c["lr"])))


def momentum_ema(g, m, x, out, c: dict) -> None:
    """functional.momentum_ema: out = b1 m + (1 - b1) g (x may be None without L2 decay)."""
    _require_cupy()
    n, (g, m, x, out) = _buffers([("g", g), ("m", m), ("x", x), ("out", out)])
    f = np.float32
    with g.device:
        _launch_elementwise("hq_momentum_ema", n, (g, m, x, out, np.int64(n), f(c["sign"]), f(c["l2"]), f(c["b1"]),
                                                   f(c["omb1"])))


def frozen_adam_apply(m, v, x, m_out, d_out, c: dict) -> None:
    """functional.frozen_adam_apply: 1-bit Adam's step from the averaged m and the frozen v."""
    _require_cupy()
    n, (m, v, x, m_out, d_out) = _buffers([("m", m), ("v", v), ("x", x), ("m_out", m_out), ("d_out", d_out)])
    f = np.float32
    with m.device:
        _launch_elementwise("hq_frozen_adam", n, (m, v, x, m_out, d_out, np.int64(n), np.int32(c["use_bc"]),
                                                  f(c["bc2"]), f(c["lr"]), f(c["eps"]), f(c["lr_wd"]),
                                                  np.int32(c["decoupled"])))


def axpby(a, b, out, alpha: float, beta: float) -> None:
    """functional.axpby: out = alpha a + beta b in float32."""
    _require_cupy()
    n, (a, b, out) = _buffers([("a", a), ("b", b), ("out", out)])
    with a.device:
        _launch_elementwise("hq_axpby", n, (a, b, out, np.int64(n), np.float32(alpha), np.float32(beta)))


def warmup():
    """Compile the kernels for the current device; returns the seconds it took."""
    _require_cupy()
    t0 = time.perf_counter()
    x = cp.linspace(-1, 1, 40, dtype=cp.float32)
    lv = np.array([-1, 0, 1], np.float32)
    scales, packed = encode(x, lv, 2, 4, SCALE_L2, True, 1, 0)
    decode_add(decode(scales, packed, lv, 2, 4, x.size), scales, packed, lv, 2, 4, x.size)
    residual = cp.empty_like(x)
    encode_ef(x, x, residual, lv, 2, 4, SCALE_L2, True, 1, 0)
    decode_mean(residual, [scales, scales], [packed, packed], lv, 2, 4, x.size)
    cp.cuda.get_current_stream().synchronize()
    return time.perf_counter() - t0


__all__ = ["KERNEL_SOURCE", "encode", "encode_ef", "decode", "decode_into", "decode_add", "decode_mean", "adam_update",
           "momentum_update", "momentum_ema", "frozen_adam_apply", "axpby", "warmup"]
