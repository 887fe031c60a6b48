"""Counter-based random numbers for stochastic rounding.

Every uniform draw is a pure function of (stream key, element index), both 64-bit, split into
32-bit halves (k_lo, k_hi) and (i_lo, i_hi):

    x = i_lo * A + k_lo + i_hi * B                    (mod 2^32)
    x ^= x >> 16;  x *= C1;  x ^= k_hi
    x ^= x >> 15;  x *= C2;  x ^= x >> 15              (mod 2^32)
    u = (x >> 8) * 2^-24                               (24 bits: exact in float32, in [0, 1))

a Weyl sequence over the index, mixed by a two-multiply 32-bit finaliser (constants from
Wellons' hash prospector). Only 32-bit multiplies, so the CPU kernels run eight draws per AVX2
instruction; SplitMix64, used before, needs 64-bit multiplies, which AVX2 emulates with three
32-bit ones. No generator state is carried between calls, so any backend (NumPy, numba, CuPy)
and any split of a vector into chunks reproduces the same draws bit for bit; the numba kernels
and the CUDA source take their constants from here. The stream key is derived from (seed, rank,
step, tensor, direction) with the SplitMix64 finaliser, once per stream.
"""
from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
# stream keys: SplitMix64
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MIX_SHIFTS = (30, 27, 31)   # z ^= z >> s before each multiplication, and once at the end
# draws: the 32-bit counter hash above (A, B odd, so the index map is a bijection mod 2^32)
HASH_A = 0x9E3779B9
HASH_B = 0x85EBCA6B
HASH_C1 = 0x21F0AAAD
HASH_C2 = 0xD35A2D97
HASH_SHIFTS = (16, 15, 15)
# 24 random bits -> float32 in [0, 1) exactly (float32 has a 24-bit significand).
UNIFORM_SHIFT = 8
UNIFORM_SCALE = np.float32(2.0 ** -24)

# Directions keep uplink and downlink draws of the same step independent.
UPLINK, DOWNLINK = 0, 1


def mix64(z: int) -> int:
    """SplitMix64 finaliser on a Python int (wraps at 64 bits)."""
    s1, s2, s3 = MIX_SHIFTS
    z &= MASK64
    z = ((z ^ (z >> s1)) * MIX1) & MASK64
    z = ((z ^ (z >> s2)) * MIX2) & MASK64
    return z ^ (z >> s3)


def stream_key(seed: int, rank: int = 0, step: int = 0, tensor: int = 0, direction: int = UPLINK) -> int:
    """The 64-bit key of one (seed, rank, step, tensor, direction) stream."""
    k = mix64(int(seed) & MASK64)
    for part in (rank, step, tensor, direction):
        k = mix64(k ^ ((int(part) + 1) * GOLDEN & MASK64))
    return k


def uniforms(key: int, offset: int, n: int) -> np.ndarray:
    """float32 uniforms in [0, 1) for element indices offset .. offset+n-1 of stream ``key``."""
    s1, s2, s3 = (np.uint32(s) for s in HASH_SHIFTS)
    key = int(key) & MASK64
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    lo = (idx & np.uint64(MASK32)).astype(np.uint32)
    hi = (idx >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        x = lo * np.uint32(HASH_A) + np.uint32(key & MASK32) + hi * np.uint32(HASH_B)
        x ^= x >> s1
        x *= np.uint32(HASH_C1)
        x ^= np.uint32(key >> 32)
        x ^= x >> s2
        x *= np.uint32(HASH_C2)
        x ^= x >> s3
    return (x >> np.uint32(UNIFORM_SHIFT)).astype(np.float32) * UNIFORM_SCALE
