"""Counter-based random numbers for stochastic rounding.

Every uniform draw is a pure function of (stream key, element index): the SplitMix64 finaliser
applied to ``key + (index + 1) * GOLDEN``. No generator state is carried between calls, so
any backend (NumPy, numba, CuPy) and any split of a vector into chunks reproduces the same
draws bit for bit; the numba kernels and the CUDA source take their constants from here. The
stream key is derived from (seed, rank, step, tensor, direction).
"""
from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MIX_SHIFTS = (30, 27, 31)   # z ^= z >> s before each multiplication, and once at the end
# 24 random bits -> float32 in [0, 1) exactly (float32 has a 24-bit significand).
UNIFORM_SHIFT = 40
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
    s1, s2, s3 = (np.uint64(s) for s in MIX_SHIFTS)
    with np.errstate(over="ignore"):
        idx = np.arange(offset + 1, offset + n + 1, dtype=np.uint64)
        z = np.uint64(key) + idx * np.uint64(GOLDEN)
        z = (z ^ (z >> s1)) * np.uint64(MIX1)
        z = (z ^ (z >> s2)) * np.uint64(MIX2)
        z = z ^ (z >> s3)
    return (z >> np.uint64(UNIFORM_SHIFT)).astype(np.float32) * UNIFORM_SCALE
