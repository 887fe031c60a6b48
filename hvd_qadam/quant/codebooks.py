"""The quantizer family: codebooks, scale kinds and which bit widths each member allows.

A quantizer is (scale kind, sorted codebook inside [-1, 1], rounding). Fixed codebooks are
rebuilt from (name, bits) on both ends; adaptive ones (ALQ/AMQ) travel with the payload.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import QuantizerError  # noqa: F401 - re-exported

SCALE_L2, SCALE_MAXABS, SCALE_MEANABS = 0, 1, 2
SCALE_NAMES = {SCALE_L2: "l2", SCALE_MAXABS: "maxabs", SCALE_MEANABS: "meanabs"}
# The defaults of every entry point (quantize(), Compression.simulated, the optimizer's links),
# defined here once. Bit width: the quantizer's fixed width, else 6 for the max-abs and L2 grids
# (at 4 bits the defaults trained a 10M-parameter LM 1.9 % above Horovod Adam's validation loss,
# 3 seeds, at 6 bits 0.2 %: docs/results.md), else 4.
DEFAULT_BITS = {"qsgd": 6, "qsgdinf": 6}
OTHER_DEFAULT_BITS = 4
# Elements per fp32 scale: 128 (6.25 bits per element at 6 bits; trained closer to Horovod Adam
# than 512 on the LM for 6 % more bytes), 512 for a 1-bit quantizer (sign), whose payload a scale
# per 128 elements would grow by 25 %.
DEFAULT_BUCKET_SIZE = 128
ONE_BIT_DEFAULT_BUCKET_SIZE = 512


@dataclass(frozen=True)
class QuantizerKind:
    name: str
    wire_id: int          # the id written in payload headers; never reuse a number
    scale: int            # SCALE_*; ignored for pass-throughs
    min_bits: int
    max_bits: int
    stochastic: bool      # default rounding: stochastic (unbiased) or nearest
    adaptive: bool = False
    passthrough: bool = False
    fixed_bits: int | None = None  # e.g. terngrad is always 2 bits, sign 1 bit

    @property
    def default_bits(self) -> int:
        """The width when none is given (:data:`DEFAULT_BITS`)."""
        if self.fixed_bits is not None:
            return self.fixed_bits
        return DEFAULT_BITS.get(self.name, OTHER_DEFAULT_BITS)

    @property
    def default_bucket_size(self) -> int:
        """Elements per scale when none is given (:data:`DEFAULT_BUCKET_SIZE`)."""
        return ONE_BIT_DEFAULT_BUCKET_SIZE if self.fixed_bits == 1 else DEFAULT_BUCKET_SIZE

    def check_bits(self, bits: int | None) -> int:
        """The validated bit width; ``None`` means the quantizer's default (:attr:`default_bits`)."""
        if bits is None:
            return self.default_bits
        if self.fixed_bits is not None:
            if bits != self.fixed_bits:
                raise QuantizerError(f"quantizer {self.name!r} always uses {self.fixed_bits} bit(s); got bits={bits}")
            return self.fixed_bits
        if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
            raise QuantizerError(f"bits must be an integer, got {bits!r}")
        if not self.min_bits <= bits <= self.max_bits:
            raise QuantizerError(
                f"quantizer {self.name!r} supports bits in {self.min_bits}..{self.max_bits}; got bits={bits}")
        return int(bits)


KINDS: dict[str, QuantizerKind] = {k.name: k for k in [
    QuantizerKind("none", 0, SCALE_L2, 32, 32, False, passthrough=True, fixed_bits=32),
    QuantizerKind("fp16", 1, SCALE_L2, 16, 16, False, passthrough=True, fixed_bits=16),
    QuantizerKind("qsgd", 2, SCALE_L2, 2, 8, True),
    QuantizerKind("qsgdinf", 3, SCALE_MAXABS, 2, 8, True),
    QuantizerKind("nuq", 4, SCALE_L2, 2, 8, True),
    QuantizerKind("terngrad", 5, SCALE_MAXABS, 2, 2, True, fixed_bits=2),
    QuantizerKind("sign", 6, SCALE_MEANABS, 1, 1, False, fixed_bits=1),
    QuantizerKind("alq", 7, SCALE_L2, 1, 8, True, adaptive=True),
    QuantizerKind("amq", 8, SCALE_L2, 2, 8, True, adaptive=True),
    QuantizerKind("alq_n", 9, SCALE_L2, 1, 8, True, adaptive=True),
    QuantizerKind("amq_n", 10, SCALE_L2, 2, 8, True, adaptive=True),
    QuantizerKind("bf16", 11, SCALE_L2, 16, 16, False, passthrough=True, fixed_bits=16),
]}
KINDS_BY_ID = {k.wire_id: k for k in KINDS.values()}


def kind(name: str) -> QuantizerKind:
    try:
        return KINDS[name]
    except KeyError:
        raise QuantizerError(f"unknown quantizer {name!r}; choose one of {sorted(KINDS)}") from None


@lru_cache(maxsize=None)
def _fixed_codebook(name: str, bits: int) -> np.ndarray:
    if name in ("qsgd", "qsgdinf"):
        m = 2 ** (bits - 1) - 1                       # magnitude levels; b=4 -> 15 levels
        levels = np.arange(-m, m + 1, dtype=np.float64) / m
    elif name == "nuq":
        m = 2 ** (bits - 1) - 1                       # {0, +-2^-(m-1), ..., +-1/2, +-1}
        mags = 2.0 ** -np.arange(m - 1, -1, -1, dtype=np.float64)
        levels = np.concatenate([-mags[::-1], [0.0], mags])
    elif name == "terngrad":
        levels = np.array([-1.0, 0.0, 1.0])
    elif name == "sign":
        levels = np.array([-1.0, 1.0])
    else:
        raise QuantizerError(f"quantizer {name!r} has no fixed codebook")
    out = levels.astype(np.float32)
    out.setflags(write=False)
    return out


def codebook(name: str, bits: int) -> np.ndarray:
    """The fixed codebook of ``name`` at ``bits`` (read-only float32, sorted, in [-1, 1])."""
    k = kind(name)
    return _fixed_codebook(k.name, k.check_bits(bits))


def default_adaptive_codebook(bits: int) -> np.ndarray:
    """Starting levels for ALQ/AMQ before the first fit: NUQSGD-like exponential grid, 2^b levels."""
    half = 2 ** (bits - 1)
    mags = 0.5 ** np.arange(half - 1, -1, -1, dtype=np.float64)
    return np.concatenate([-mags[::-1], mags]).astype(np.float32)


def validate_codebook(levels: np.ndarray, bits: int) -> np.ndarray:
    """A codebook must be finite, strictly increasing, inside [-1, 1], with 2 <= K <= 2^bits."""
    lv = np.asarray(levels, dtype=np.float32).ravel()
    if lv.size < 2 or lv.size > 2 ** bits:
        raise QuantizerError(f"codebook has {lv.size} levels; {bits} bit(s) allow 2..{2 ** bits}")
    if not np.all(np.isfinite(lv)) or np.any(np.diff(lv) <= 0):
        raise QuantizerError("codebook levels must be finite and strictly increasing")
    if lv[0] < -1 or lv[-1] > 1:
        raise QuantizerError("codebook levels must lie inside [-1, 1]")
    return lv
