"""Which quantizer settings error feedback cannot carry: a rule, computed from the quantizer itself.

Error feedback (EF) sends ``Q(g + e)`` and keeps the rest, ``e <- g + e - Q(g + e)``, for the next
step. Nothing is lost, but what the quantizer does not send arrives late: a quantizer that rounds
most of a bucket to zero makes the residual grow until it alone decides what is sent. How far it
grows depends on the quantizer's scale (the bucket's L2 norm, its max-abs or its mean-abs), the
bucket size ``d``, the bits (the grid's ``m`` magnitude levels, or its smallest level) and the
rounding, and on nothing else once the input has a shape, so the rule computes it.

Model: each step's gradient is a bucket of ``d`` i.i.d. N(0, 1) entries, fresh every step (what
a gradient looks like to a quantizer after the fusion buffer mixes layers: no element is
special). For an L2 scale the grid's step is ``||x|| / m ~ sqrt(d) / m`` times an entry's RMS, so
an entry rounds to zero with nearest rounding when ``|x_i| < sqrt(d) / (2m)`` RMS: the fraction
grows with the bucket (QSGD's variance bound ``min(d/s^2, sqrt(d)/s)`` says the same). A
max-abs scale's step is ``max|x| / m ~ sqrt(2 ln d) / m`` RMS and its largest entry is always
sent exactly; a mean-abs scale (``sign``) sends every entry. Three numbers, from the quantizer's
own reference implementation (:mod:`hvd_qadam.quant.reference`) on this model:

* ``zero_fraction``: the expected fraction of a bucket's entries sent as 0, in one step;
* ``omega``: ``E||Q(x) - x||^2 / ||x||^2`` in one step: for stochastic rounding the variance
  factor of the unbiased quantizer, which must be < 1 for EF to be contractive without damping;
  for nearest rounding ``1 - delta``, delta the compressor's contraction;
* ``residual_ratio``: ``||e|| / ||g||`` in EF's steady state, the EF recursion run for
  ``STEPS`` steps (mean over the last half). It is what the telemetry's compression-error signal
  measures in a real run (:mod:`hvd_qadam.telemetry`). Where it grows without bound (nothing is
  sent and ``e`` is a random walk) the number after ``STEPS`` steps is about ``sqrt(STEPS / 2)``.

The verdict uses ``residual_ratio``: one number that accounts for both the zeros and the
rounding (one step's numbers alone do not: ``terngrad``'s 2-bit max-abs grid zeroes 84 % of a
bucket of 128, about as many as NUQ's 3-bit L2 grid at bucket 128, yet its residual settles at
1.1x the gradient and NUQ's at 1.4x; QSGD's 3-bit grid at bucket 128 zeroes 94 % and its
residual grows without bound). Above ``RESIDUAL_STALLS`` the residual does not settle (a
bounded steady state stays below ~2.6 on this model; an unbounded one is a random walk, ~5 and
more after ``STEPS`` steps, or grows geometrically for stochastic rounding with ``omega`` > 1):
training stalls and the optimizer refuses the setting. Above ``RESIDUAL_MARGINAL`` the residual
settles but above what a ternary max-abs grid (``terngrad``) leaves, and the optimizer warns:
such settings were measured to end training well above full precision's loss. The measurement
is in docs/stall_rule.md (``studies/stall_calibration.py``).
Adaptive quantizers (``alq``/``amq``) fit their levels to the data and are not modelled here;
links without error feedback are unbiased (stochastic) or lose what rounds to zero by design,
and are not judged.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .algorithms import ALGORITHMS
from .quant import codebooks as cb
from .quant import reference

STEPS = 64                 # EF recursion length of the model
ELEMENTS = 1 << 15         # entries per step (at least MIN_BUCKETS buckets)
MIN_BUCKETS = 16
RESIDUAL_MARGINAL = 1.2    # residual_ratio above which the optimizer warns
RESIDUAL_STALLS = 3.0      # ... and above which it refuses (docs/stall_rule.md)

OK, MARGINAL, STALLS = "ok", "marginal", "stalls"


@dataclass(frozen=True)
class StallEstimate:
    """The rule's numbers for one quantizer setting under error feedback (see the module)."""
    quantizer: str
    bits: int
    bucket_size: int
    stochastic: bool
    zero_fraction: float
    omega: float
    residual_ratio: float

    @property
    def verdict(self) -> str:
        if self.residual_ratio > RESIDUAL_STALLS:
            return STALLS
        if self.residual_ratio > RESIDUAL_MARGINAL:
            return MARGINAL
        return OK

    def describe(self) -> str:
        rounding = "stochastic" if self.stochastic else "nearest"
        scale = cb.SCALE_NAMES[cb.kind(self.quantizer).scale]
        return (f"quantizer={self.quantizer!r} ({scale} scale) at {self.bits} bits, bucket_size={self.bucket_size}, "
                f"{rounding} rounding: on a bucket of Gaussian entries {self.zero_fraction:.0%} of the entries are "
                f"sent as 0 (one-step error factor {self.omega:.2f}), and error feedback's residual settles at "
                f"{self.residual_ratio:.2f}x the gradient's norm")


def judged(quantizer: str) -> bool:
    """Whether the rule applies to ``quantizer`` (fixed grids; not pass-throughs, not adaptive)."""
    k = cb.kind(quantizer)
    return not k.passthrough and not k.adaptive


@lru_cache(maxsize=None)
def estimate(quantizer: str, bits: int, bucket_size: int, stochastic: bool) -> StallEstimate:
    """The rule's numbers for ``quantizer`` at ``bits`` with ``bucket_size`` entries per scale.
    Deterministic (fixed seeds); a few tens of milliseconds, once per setting."""
    if not judged(quantizer):
        raise ValueError(f"quantizer {quantizer!r} is not a fixed grid: the stall rule does not model it")
    k = cb.kind(quantizer)
    levels = cb.codebook(quantizer, bits)
    d = int(bucket_size)
    n = max(ELEMENTS // d, MIN_BUCKETS) * d
    gen = np.random.default_rng(0)

    def quantize(x: np.ndarray, step: int) -> np.ndarray:
        scales = reference.bucket_scales(x, d, k.scale)
        codes = reference.quantize_codes(x, scales, levels, d, stochastic, key=0x5EED + step)
        return reference.dequantize_codes(codes, scales, levels, d)

    first = gen.standard_normal(n).astype(np.float32)
    q = quantize(first, 0)
    zero_fraction = float(np.mean(q == 0))
    omega = float(np.sum((q - first).astype(np.float64) ** 2) / np.sum(first.astype(np.float64) ** 2))
    e = np.zeros(n, dtype=np.float32)
    ratios = []
    for t in range(STEPS):
        g = first if t == 0 else gen.standard_normal(n).astype(np.float32)
        x = g + e
        e = x - quantize(x, t)
        if t >= STEPS // 2:
            ratios.append(float(np.linalg.norm(e) / np.linalg.norm(g)))
    return StallEstimate(quantizer, int(bits), d, bool(stochastic), zero_fraction, omega, float(np.mean(ratios)))


def suggestion(quantizer: str, bits: int, bucket_size: int, stochastic: bool, prefix: str = "") -> str:
    """Settings near the given one that the rule passes: more bits, a smaller bucket, nearest
    rounding, or the max-abs grid at the same width (option names with ``prefix``, e.g.
    ``"downlink_"``)."""
    options = []
    k = cb.kind(quantizer)
    if k.fixed_bits is None:
        for b in range(bits + 1, k.max_bits + 1):
            if estimate(quantizer, b, bucket_size, stochastic).verdict == OK:
                options.append(f"{prefix}bits={b}")
                break
    for size in (256, 128, 64, 32):
        if size < bucket_size and estimate(quantizer, bits, size, stochastic).verdict == OK:
            options.append(f"{prefix}bucket_size={size}")
            break
    if stochastic and estimate(quantizer, bits, bucket_size, False).verdict == OK:
        options.append(f"{prefix}rounding='nearest'")
    if quantizer != "qsgdinf" and 2 <= bits <= 8 and estimate("qsgdinf", bits, bucket_size, stochastic).verdict == OK:
        options.append(f"{prefix}quantizer='qsgdinf' (max-abs scale) at {bits} bits")
    options.append("the defaults (quantizer='qsgdinf', 6 bits, bucket_size=128)")
    return "use " + " or ".join(options)


def check(config) -> None:
    """Judge every link of ``config`` (a :class:`~hvd_qadam.config.Config`) that runs under error
    feedback: raise ValueError where training stalls, warn (RuntimeWarning) where it is marginal.
    Called once, when the optimizer is built."""
    links = []
    if config.error_feedback:
        links.append(("uplink", config.uplink, ""))
    if config.server_error_feedback and ALGORITHMS[config.algorithm].server_ef:
        links.append(("downlink", config.downlink, "downlink_"))
    for where, link, prefix in links:
        if link.passthrough or not judged(link.quantizer):
            continue
        est = estimate(link.quantizer, link.bits, link.bucket_size, link.stochastic)
        if est.verdict == OK:
            continue
        hint = suggestion(link.quantizer, link.bits, link.bucket_size, link.stochastic, prefix)
        if est.verdict == STALLS:
            raise ValueError(f"the {where} stalls under error feedback: {est.describe()}, above "
                             f"{RESIDUAL_STALLS}: the residual grows without bound and training stalls; {hint}")
        warnings.warn(f"the {where} is marginal under error feedback: {est.describe()}, above "
                      f"{RESIDUAL_MARGINAL}: training was measured to end well above full precision's loss; "
                      f"{hint}", RuntimeWarning, stacklevel=3)
