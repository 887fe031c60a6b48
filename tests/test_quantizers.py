"""Unit tests of the quantizer family: statistics with theory-derived bounds, exact semantics, errors.

How the statistical tests decide (all seeds are fixed, so every run sees the same draws):

* For a coordinate with normalised value r between levels l_j <= r <= l_{j+1} of bucket scale s,
  one stochastic decode is s*l_{j+1} with probability p = (r - l_j)/(l_{j+1} - l_j), else s*l_j.
  Its mean is s*r = x and its variance is exactly var = s^2 (l_{j+1} - r)(r - l_j)
  (hvd_qadam/quant/reference.py states the rounding);
  one draw never lies farther than c = s (l_{j+1} - l_j) from its mean.
* Per coordinate, the mean of N independent decodes is checked with Bernstein's inequality,
      P(|mean - x| >= t) <= 2 exp(-N t^2 / (2 var + 2 c t / 3)),
  solved for t at delta = 1e-10 per coordinate. Bernstein is rigorous for bounded variables (no
  normal approximation, so it is also right for coordinates with p close to 0 or 1, where a plain
  z-score is not) and the Bonferroni union over the ~1e4 coordinates tested keeps the family-wise
  false-alarm probability below 1e-5. Float32 arithmetic (r = x/s rounded, p rounded, uniforms on a
  2^-24 grid) biases a correct kernel by a few float32 ulps of s; the bound adds 1e-6 * s for that.
* In aggregate, the standardised errors z_i = (mean_i - x_i) / sqrt(var_i / N) have E[z^2] = 1
  exactly, and Var[z^2] = kurt_i / N + 3 (N-1)/N - 1 exactly (kurt = (1 - 3p(1-p)) / (p(1-p)) for
  a two-point law), so T = sum z_i^2 is tested against its exact mean and standard deviation
  (6 sigma). This catches biases far below what the per-coordinate bound can see: a shift of p by
  0.02 moves T by several times the number of coordinates.
* Per-seed draws use seeds 0..N-1 with the NumPy reference; for the default backend (numba when
  importable) N copies of one vector are quantized in a single call (each copy draws from its own
  counters), which is fast and exercises the many-bucket parallel path; the payload must also be
  byte-identical to the reference's.
* The negative controls feed the same checks with nearest rounding, always-round-down, the wrong
  neighbour and a p shifted by 0.02, and assert that the checks flag every one of them.
"""
from __future__ import annotations

import functools
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

import hvd_qadam
from hvd_qadam import QuantizerError, dequantize, quantize
from hvd_qadam.quant import codebooks, common, rng
from hvd_qadam.quant.reference import pack_codes, unpack_codes

N_SEEDS = 2000
DELTA = 1e-10          # per-coordinate false-alarm probability of the Bernstein bound
Z_AGG = 6.0            # sigmas for the aggregate chi-square-like statistic and the variance check
FP_SLACK = 1e-6        # float32 rounding allowance, relative to the bucket scale

STOCHASTIC = ["qsgd", "qsgdinf", "nuq", "terngrad", "alq", "amq", "alq_n", "amq_n"]
FIXED = ["qsgd", "qsgdinf", "nuq", "terngrad", "sign"]
ADAPTIVE = ["alq", "amq", "alq_n", "amq_n"]


# ------------------------------------------------------------------------------------------------
# helpers

def amq_codebook(bits: int, mult: float | None = None) -> np.ndarray:
    """AMQ-style levels +-mult^j, j = 0..2^(b-1)-1 (2^b levels, endpoints +-1)."""
    half = 2 ** (bits - 1)
    if mult is None:
        mult = 0.4 if bits <= 4 else 0.9   # 0.4^127 would underflow float32 at 8 bits
    mags = mult ** np.arange(half - 1, -1, -1, dtype=np.float64)
    return np.concatenate([-mags[::-1], mags]).astype(np.float32)


def codebook_for(name: str, bits: int):
    if name in ("alq", "alq_n"):
        return codebooks.default_adaptive_codebook(bits)
    if name in ("amq", "amq_n"):
        return amq_codebook(bits)
    return None


def levels_for(name: str, bits: int) -> np.ndarray:
    cbk = codebook_for(name, bits)
    return np.asarray(cbk if cbk is not None else codebooks.codebook(name, bits), dtype=np.float64)


def default_bits(name: str) -> int:
    return {"sign": 1, "terngrad": 2}.get(name, 3)


def make_x(n: int = 600, bucket: int = 128, seed: int = 1234) -> np.ndarray:
    """Buckets of very different magnitude, a zero bucket, a spike, exact zeros, a short tail."""
    g = np.random.default_rng(seed)
    x = g.standard_normal(n)
    x[bucket:2 * bucket] *= 1e3
    x[2 * bucket:3 * bucket] = 0.0                    # a whole zero bucket in the middle
    x[3 * bucket:4 * bucket] *= 1e-3
    x[3 * bucket + 17] = 0.05                         # a spike dominating its bucket
    x[4 * bucket::7] = 0.0                            # exact zeros in the short last bucket
    return x.astype(np.float32)


X = make_x()
B = 128


def moments(x, scales, levels, bucket_size):
    """Exact per-coordinate law of one stochastic decode (float64, from the payload's scales)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    s = np.repeat(np.asarray(scales, dtype=np.float64), bucket_size)[:n]
    lv = np.asarray(levels, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s > 0, x / np.where(s > 0, s, 1.0), 0.0)
    r = np.clip(r, lv[0], lv[-1])
    j = np.clip(np.searchsorted(lv, r, side="right") - 1, 0, lv.size - 2)
    lo, hi = lv[j], lv[j + 1]
    p = (r - lo) / (hi - lo)
    return SimpleNamespace(
        x=x, s=s, r=r, j=j, lo=lo, hi=hi, p=p,
        var=s * s * (hi - r) * (r - lo),              # exact variance of one decode
        up2=(s * (hi - r)) ** 2,                      # squared error when rounding up
        down2=(s * (r - lo)) ** 2,                    # squared error when rounding down
        gap=s * (hi - lo),                            # range of one decode around its mean
    )


def bernstein_t(var, c, n, delta=DELTA):
    L = math.log(2.0 / delta)
    a = c * L / (3.0 * n)
    return a + np.sqrt(a * a + 2.0 * var * L / n)


def bias_check(mean, mom, n):
    """Per-coordinate Bernstein check and the aggregate z^2 statistic for a vector of sample means."""
    err = mean - mom.x
    tiny = FP_SLACK * mom.s
    t = bernstein_t(mom.var, mom.gap, n)
    bad = np.flatnonzero(np.abs(err) > t + tiny)
    sd = np.sqrt(mom.var / n)
    use = sd > 10 * tiny
    use &= (mom.p > 1e-3) & (mom.p < 1 - 1e-3)
    z = err[use] / sd[use]
    pq = mom.p[use] * (1 - mom.p[use])
    var_z2 = (1 - 3 * pq) / (pq * n) + 3.0 * (n - 1) / n - 1.0
    T, dof, T_sd = float(np.sum(z * z)), int(use.sum()), float(np.sqrt(var_z2.sum()))
    return SimpleNamespace(bad=bad, T=T, dof=dof, T_sd=T_sd, agg_ok=abs(T - dof) <= Z_AGG * T_sd,
                           err=err, bound=t + tiny)


def variance_check(sq_err_per_seed, mom):
    """Empirical E||Q(x)-x||^2 against the exact sum of s^2 (hi-r)(r-lo), CLT at Z_AGG sigmas."""
    n = sq_err_per_seed.size
    expected = float(mom.var.sum())
    # Var of ||Q(x)-x||^2 for one seed: independent two-point terms, each p(1-p)(up2 - down2)^2.
    var_V = float(np.sum(mom.p * (1 - mom.p) * (mom.up2 - mom.down2) ** 2))
    slack = FP_SLACK * float(np.sum(mom.s * mom.gap))
    emp = float(sq_err_per_seed.mean())
    return SimpleNamespace(emp=emp, expected=expected, margin=Z_AGG * math.sqrt(var_V / n) + slack,
                           ok=abs(emp - expected) <= Z_AGG * math.sqrt(var_V / n) + slack)


@functools.lru_cache(maxsize=None)
def sample_stats(name, bits, backend, rounding=None, n_seeds=N_SEEDS):
    """Mean decode per coordinate and ||Q(x)-x||^2 per seed over seeds 0..n_seeds-1."""
    cbk = codebook_for(name, bits)
    x64 = X.astype(np.float64)
    acc = np.zeros(X.size)
    sq = np.empty(n_seeds)
    scales = None
    for i in range(n_seeds):
        p = quantize(X, name, bits, B, seed=i, rounding=rounding, codebook=cbk, backend=backend)
        if scales is None:
            scales = p.scales.copy()
        else:
            assert np.array_equal(p.scales, scales)  # scales never depend on the seed
        y = dequantize(p, backend=backend).astype(np.float64)
        acc += y
        sq[i] = np.sum((y - x64) ** 2)
    return acc / n_seeds, sq, scales


def synthetic_stats(rule, name="qsgd", bits=3, n_seeds=N_SEEDS):
    """A deliberately wrong stochastic quantizer built from the library's own scales and RNG."""
    lv = levels_for(name, bits)
    scales = quantize(X, name, bits, B, seed=0, backend="numpy").scales
    mom = moments(X, scales, lv, B)
    acc = np.zeros(X.size)
    sq = np.empty(n_seeds)
    for i in range(n_seeds):
        u = rng.uniforms(rng.stream_key(i), 0, X.size).astype(np.float64)
        if rule == "down":
            up = np.zeros(X.size, dtype=bool)
        elif rule == "wrong_neighbour":
            up = u < 1 - mom.p
        elif rule == "p_plus_0.02":
            up = u < np.clip(mom.p + 0.02, 0, 1)
        else:
            raise AssertionError(rule)
        y = np.where(up, mom.hi, mom.lo) * mom.s
        acc += y
        sq[i] = np.sum((y - mom.x) ** 2)
    return acc / n_seeds, sq, mom


# ------------------------------------------------------------------------------------------------
# codebooks

def test_fixed_codebooks_match_spec():
    for b in range(2, 9):
        m = 2 ** (b - 1) - 1
        q = codebooks.codebook("qsgd", b).astype(np.float64)
        assert q.size == 2 * m + 1 <= 2 ** b
        np.testing.assert_allclose(q, np.arange(-m, m + 1) / m, rtol=0, atol=1e-7)
        assert np.array_equal(codebooks.codebook("qsgdinf", b), codebooks.codebook("qsgd", b))
        nq = codebooks.codebook("nuq", b).astype(np.float64)
        mags = 2.0 ** -np.arange(m - 1, -1, -1)
        assert np.array_equal(nq, np.concatenate([-mags[::-1], [0.0], mags]))
        assert nq.size <= 2 ** b
    assert codebooks.codebook("qsgd", 4).size == 15
    assert codebooks.codebook("nuq", 3).tolist() == [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]
    assert codebooks.codebook("terngrad", 2).tolist() == [-1, 0, 1]
    assert codebooks.codebook("sign", 1).tolist() == [-1, 1]
    for b in range(1, 9):
        a = codebooks.default_adaptive_codebook(b)
        assert a.size == 2 ** b and a[0] == -1 and a[-1] == 1 and np.all(np.diff(a) > 0)
        codebooks.validate_codebook(a, b)


# ------------------------------------------------------------------------------------------------
# unbiasedness and exact variance

UNBIASED_CASES = [
    ("qsgd", 2, "numpy"), ("qsgd", 3, "numpy"), ("qsgd", 4, "numpy"), ("qsgd", 8, "numpy"),
    ("qsgdinf", 2, "numpy"), ("qsgdinf", 5, "numpy"),
    ("nuq", 2, "numpy"), ("nuq", 3, "numpy"), ("nuq", 4, "numpy"), ("nuq", 6, "numpy"),
    ("terngrad", 2, "numpy"),
    ("alq", 1, "numpy"), ("alq", 2, "numpy"), ("alq", 3, "numpy"), ("amq", 3, "numpy"),
    # The default backend (numba when importable): N_SEEDS copies of a 640-element vector in ONE
    # call, each copy drawing from its own counters (offsets), which also runs the many-bucket
    # parallel path; per-seed calls of a small vector are covered by the bit-identity tests.
    ("qsgd", 4, None), ("nuq", 3, None), ("alq", 3, None), ("terngrad", 2, None), ("qsgdinf", 6, None),
]


def get_stats(name, bits, backend):
    """(mean decode, ||Q(x)-x||^2 per draw, scales, x, bucket) for one case of UNBIASED_CASES."""
    if backend == "numpy":
        mean, sq, scales = sample_stats(name, bits, backend)
        return mean, sq, scales, X, B
    mean, sq, scales = tiled_stats(name, bits)
    return mean, sq, scales, X_TILE, B


X_TILE = make_x(640, 128, seed=4321)   # 5 whole buckets of 128: copies tile bucket-aligned


@functools.lru_cache(maxsize=None)
def tiled_stats(name, bits, n_copies=N_SEEDS):
    cbk = codebook_for(name, bits)
    xt = np.tile(X_TILE, n_copies)
    p = quantize(xt, name, bits, B, seed=77, codebook=cbk)                 # default backend
    ref = quantize(xt, name, bits, B, seed=77, codebook=cbk, backend="numpy")
    assert p.to_bytes() == ref.to_bytes()
    nbk = X_TILE.size // B
    scales = p.scales.reshape(n_copies, nbk)
    assert np.all(scales == scales[0])
    y = dequantize(p).astype(np.float64).reshape(n_copies, X_TILE.size)
    sq = np.sum((y - X_TILE.astype(np.float64)) ** 2, axis=1)
    return y.mean(axis=0), sq, scales[0].copy()


def _case_id(c):
    return f"{c[0]}-{c[1]}b-{c[2] or 'default'}"


@pytest.mark.parametrize("name,bits,backend", UNBIASED_CASES, ids=[_case_id(c) for c in UNBIASED_CASES])
def test_stochastic_rounding_is_unbiased(name, bits, backend):
    mean, _, scales, x, bs = get_stats(name, bits, backend)
    mom = moments(x, scales, levels_for(name, bits), bs)
    chk = bias_check(mean, mom, N_SEEDS)
    assert chk.bad.size == 0, (
        f"{name} {bits}b biased at {chk.bad[:10]}: err {chk.err[chk.bad[:10]]} > bound {chk.bound[chk.bad[:10]]}")
    assert chk.dof > 200  # the aggregate test has real power on this vector
    assert chk.agg_ok, f"sum z^2 = {chk.T:.1f} for {chk.dof} coords (expected {chk.dof} +- {chk.T_sd:.1f})"
    # the zero bucket decodes to exact zeros in every draw
    assert np.all(x[2 * bs:3 * bs] == 0) and np.all(mean[2 * bs:3 * bs] == 0)


@pytest.mark.parametrize("name,bits,backend", UNBIASED_CASES, ids=[_case_id(c) for c in UNBIASED_CASES])
def test_expected_squared_error_matches_exact_variance(name, bits, backend):
    _, sq, scales, x, bs = get_stats(name, bits, backend)
    mom = moments(x, scales, levels_for(name, bits), bs)
    v = variance_check(sq, mom)
    assert v.expected > 0
    assert v.ok, f"E||Q(x)-x||^2: empirical {v.emp:.6g}, exact {v.expected:.6g}, allowed +- {v.margin:.3g}"


@pytest.mark.parametrize("rule", ["down", "wrong_neighbour", "p_plus_0.02"])
def test_negative_control_biased_synthetic_quantizers_are_flagged(rule):
    mean, sq, mom = synthetic_stats(rule)
    chk = bias_check(mean, mom, N_SEEDS)
    assert not chk.agg_ok and chk.T > chk.dof + 20 * chk.T_sd, (rule, chk.T, chk.dof, chk.T_sd)
    if rule != "p_plus_0.02":
        assert chk.bad.size > 100  # gross biases fail the per-coordinate bound too
        assert not variance_check(sq, mom).ok


def test_negative_control_synthetic_correct_rule_passes():
    """The same synthetic machinery with the correct rule passes: the harness is not the culprit."""
    lv = levels_for("qsgd", 3)
    scales = quantize(X, "qsgd", 3, B, seed=0, backend="numpy").scales
    mom = moments(X, scales, lv, B)
    acc = np.zeros(X.size)
    for i in range(N_SEEDS):
        u = rng.uniforms(rng.stream_key(i), 0, X.size).astype(np.float64)
        acc += np.where(u < mom.p, mom.hi, mom.lo) * mom.s
    chk = bias_check(acc / N_SEEDS, mom, N_SEEDS)
    assert chk.bad.size == 0 and chk.agg_ok


@pytest.mark.parametrize("name,bits", [("qsgd", 3), ("nuq", 3), ("terngrad", 2)])
def test_negative_control_nearest_rounding_is_flagged_as_biased(name, bits):
    mean, sq, scales = sample_stats(name, bits, "numpy", rounding="nearest", n_seeds=N_SEEDS)
    mom = moments(X, scales, levels_for(name, bits), B)
    chk = bias_check(mean, mom, N_SEEDS)
    assert chk.bad.size > 100
    assert not chk.agg_ok
    assert not variance_check(sq, mom).ok  # nearest rounding also has a different (smaller) error


# ------------------------------------------------------------------------------------------------
# QSGD and NUQSGD variance bounds

def _bound_vectors(d, g):
    yield "gaussian", g.standard_normal(d)
    yield "all_equal", np.full(d, 0.37)
    spike = np.zeros(d)
    spike[d // 3] = -2.5
    yield "one_spike", spike
    yield "spike_plus_noise", spike + 1e-3 * g.standard_normal(d)
    sparse = np.where(g.random(d) < 0.05, g.standard_normal(d), 0.0)
    sparse[0] = 1.0
    yield "sparse", sparse
    yield "heavy_tail", g.standard_cauchy(d)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("d", [1, 2, 16, 128, 1024, 4096])
def test_qsgd_exact_variance_within_qsgd_bound(bits, d):
    m = 2 ** (bits - 1) - 1
    g = np.random.default_rng(100 * bits + d)
    lv = levels_for("qsgd", bits)
    for label, x in _bound_vectors(d, g):
        x = x.astype(np.float32)
        p = quantize(x, "qsgd", bits, d, seed=1, backend="numpy")
        mom = moments(x, p.scales, lv, d)
        nx2 = float(np.sum(x.astype(np.float64) ** 2))
        exact = float(mom.var.sum())
        bound = min(d / m ** 2, math.sqrt(d) / m) * nx2
        assert exact <= bound * (1 + 1e-6), (label, exact, bound)
        # the sharper per-coordinate form (hi-r)(r-lo) <= gap^2/4 gives d/(4 m^2)
        assert exact <= d / (4 * m * m) * nx2 * (1 + 1e-6), (label, exact)
        if label == "one_spike":  # r = +-1 is a level: no error at all
            assert exact == 0 and np.array_equal(dequantize(p), x)


@pytest.mark.parametrize("bits", [2, 3])
def test_qsgd_bound_is_nearly_tight_for_all_equal_coordinates(bits):
    """x = c*ones(d), d >> m^2: r = 1/sqrt(d) < 1/m, so E||Q-x||^2 = (sqrt(d)/m - 1) ||x||^2 exactly,
    a fraction 1 - m/sqrt(d) of the bound sqrt(d)/m ||x||^2; the empirical value agrees."""
    d, m = 4096, 2 ** (bits - 1) - 1
    x = np.full(d, 1.0, dtype=np.float32)
    nx2 = float(d)
    bound = min(d / m ** 2, math.sqrt(d) / m) * nx2
    closed_form = (math.sqrt(d) / m - 1) * nx2
    mom = moments(x, quantize(x, "qsgd", bits, d, backend="numpy").scales, levels_for("qsgd", bits), d)
    assert float(mom.var.sum()) == pytest.approx(closed_form, rel=1e-6)
    assert closed_form >= (1 - m / math.sqrt(d)) * bound * (1 - 1e-9)
    assert closed_form / bound > 0.95
    n = 400
    sq = np.empty(n)
    for s in range(n):
        y = dequantize(quantize(x, "qsgd", bits, d, seed=s, backend="numpy")).astype(np.float64)
        sq[s] = np.sum((y - 1.0) ** 2)
    v = variance_check(sq, mom)
    assert v.ok, (v.emp, v.expected, v.margin)
    assert v.emp <= bound + v.margin


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("d", [16, 512, 4096])
def test_nuq_exact_variance_within_exponential_grid_bound(bits, d):
    """NUQSGD: for |r| in [l_k, 2 l_k], (hi-r)(r-lo) <= l_k^2/4 <= r^2/4; below the smallest level
    l_1 = 2^-(m-1) it is <= l_1 |r|. So E||Q-x||^2 <= (1/4 + l_1 sqrt(d)) ||x||^2."""
    m = 2 ** (bits - 1) - 1
    l1 = 2.0 ** -(m - 1)
    g = np.random.default_rng(7 * bits + d)
    lv = levels_for("nuq", bits)
    for label, x in _bound_vectors(d, g):
        x = x.astype(np.float32)
        mom = moments(x, quantize(x, "nuq", bits, d, backend="numpy").scales, lv, d)
        nx2 = float(np.sum(x.astype(np.float64) ** 2))
        assert float(mom.var.sum()) <= (0.25 + l1 * math.sqrt(d)) * nx2 * (1 + 1e-6), label


def test_empirical_variance_below_qsgd_bound_on_adversarial_inputs():
    bits, d = 3, 256
    m = 2 ** (bits - 1) - 1
    lv = levels_for("qsgd", bits)
    g = np.random.default_rng(5)
    for label, x in _bound_vectors(d, g):
        x = x.astype(np.float32)
        nx2 = float(np.sum(x.astype(np.float64) ** 2))
        bound = min(d / m ** 2, math.sqrt(d) / m) * nx2
        sq = np.empty(300)
        scales = None
        for s in range(300):
            p = quantize(x, "qsgd", bits, d, seed=s, backend="numpy")
            scales = p.scales
            sq[s] = np.sum((dequantize(p, backend="numpy").astype(np.float64) - x) ** 2)
        v = variance_check(sq, moments(x, scales, lv, d))
        assert v.ok, (label, v.emp, v.expected, v.margin)
        assert v.emp <= bound + v.margin, label


# ------------------------------------------------------------------------------------------------
# nearest rounding, sign, terngrad, scales

@pytest.mark.parametrize("name", FIXED + ADAPTIVE)
def test_nearest_rounding_is_deterministic_and_picks_nearest_level(name):
    bits = default_bits(name)
    cbk = codebook_for(name, bits)
    p0 = quantize(X, name, bits, B, seed=0, rounding="nearest", codebook=cbk, backend="numpy")
    p1 = quantize(X, name, bits, B, seed=987, rounding="nearest", codebook=cbk)
    assert p0.stochastic is False
    assert p0.to_bytes() == p1.to_bytes()
    y = dequantize(p0).astype(np.float64)
    mom = moments(X, p0.scales, levels_for(name, bits), B)
    # |Q(x) - s*r| <= half the local gap times the scale (r = x/s clipped to the codebook's range;
    # only sign's mean-|x| scale lets |x| exceed s, elsewhere s*r == x)
    assert np.all(np.abs(y - mom.s * mom.r) <= mom.gap / 2 + FP_SLACK * mom.s)
    if name != "sign":
        assert np.all(np.abs(y - mom.x) <= mom.gap / 2 + FP_SLACK * mom.s)
    # and it is the nearest level (away from ties, where float32 may pick either neighbour; r = 0 is a
    # tie for codebooks without a zero level, and the zero bucket is all r = 0)
    lv = levels_for(name, bits)
    nearest = lv[np.argmin(np.abs(mom.r[:, None] - lv[None, :]), axis=1)] * mom.s
    clear = np.abs(mom.p - 0.5) > 1e-4
    assert clear.mean() > 0.7
    np.testing.assert_allclose(y[clear], nearest[clear], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qsgd_nearest_error_at_most_half_step(bits):
    m = 2 ** (bits - 1) - 1
    y = dequantize(quantize(X, "qsgd", bits, B, rounding="nearest")).astype(np.float64)
    s = np.repeat(quantize(X, "qsgd", bits, B).scales.astype(np.float64), B)[:X.size]
    assert np.all(np.abs(y - X) <= s / (2 * m) * (1 + 1e-5))


def test_sign_decodes_to_plus_minus_mean_abs():
    g = np.random.default_rng(3)
    x = g.standard_normal(1000).astype(np.float32)
    x[[0, 5, 999]] = 0.0
    x[7] = -0.0
    x[200:300] = 0.0   # bucket 2 (bucket size 100) is all zeros
    bs = 100
    for backend in ("numpy", None):
        p = quantize(x, "sign", 1, bs, seed=11, backend=backend)
        assert p.bits == 1 and p.stochastic is False and p.codes.size == 125
        assert p.to_bytes() == quantize(x, "sign", None, bs, seed=12, backend=backend).to_bytes()
        y = dequantize(p, backend=backend)
        meanabs = np.abs(x.astype(np.float64)).reshape(-1, bs).mean(axis=1)
        np.testing.assert_allclose(p.scales, meanabs, rtol=2e-7)
        s = np.repeat(p.scales, bs)
        expect = np.where(x >= 0, s, -s)           # sign(0) = sign(-0) = +1
        assert np.array_equal(y, expect)
        assert np.all(y[200:300] == 0) and not np.any(np.isnan(y))
    # a short last bucket uses its own length for the mean
    x = np.array([1, -2, 3, -4, 5, -6, 7], dtype=np.float32)
    p = quantize(x, "sign", 1, 4)
    np.testing.assert_allclose(p.scales, [2.5, 6.0], rtol=1e-7)
    assert dequantize(p).tolist() == [2.5, -2.5, 2.5, -2.5, 6, -6, 6]


def test_terngrad_uses_ternary_levels_times_max_abs():
    g = np.random.default_rng(4)
    x = g.standard_normal(515).astype(np.float32)
    x[::10] = 0
    p = quantize(x, "terngrad", 2, 64, seed=3)
    assert p.bits == 2 and p.stochastic and p.codes.size == math.ceil(515 * 2 / 8)
    mx = np.array([np.abs(x[i:i + 64]).max() for i in range(0, 515, 64)], dtype=np.float32)
    assert np.array_equal(p.scales, mx)            # max-abs is exact in float32
    y = dequantize(p)
    s = np.repeat(p.scales, 64)[:515]
    assert np.all((y == 0) | (y == s) | (y == -s))
    nz = y != 0
    assert np.all(np.sign(y[nz]) == np.sign(x[nz]))
    assert np.all(y[x == 0] == 0)
    # the max-abs coordinate of each bucket is a level: it decodes exactly
    for k in range(0, 515, 64):
        i = k + int(np.argmax(np.abs(x[k:k + 64])))
        assert y[i] == x[i]


def test_scales_match_independent_computation():
    g = np.random.default_rng(9)
    x = (g.standard_normal(777) * np.exp(g.standard_normal(777))).astype(np.float32)
    bs = 50
    pad = np.concatenate([x.astype(np.float64), np.zeros(-x.size % bs)]).reshape(-1, bs)
    for name, expect in [("qsgd", np.sqrt((pad ** 2).sum(1))), ("nuq", np.sqrt((pad ** 2).sum(1))),
                         ("qsgdinf", np.abs(pad).max(1)), ("terngrad", np.abs(pad).max(1))]:
        for backend in ("numpy", None):
            p = quantize(x, name, default_bits(name), bs, backend=backend)
            np.testing.assert_allclose(p.scales, expect, rtol=1.2e-7)
            assert p.scales.dtype == np.float32 and p.scales.size == math.ceil(777 / bs)


def test_stochastic_codes_follow_u_less_than_p_rule():
    """code = j + (u < p) with u = rng.uniforms(key, offset + i): the cross-backend contract."""
    x = make_x(1000, 100, seed=77)
    key = rng.stream_key(42, rank=3, step=17, tensor=5)
    off = 123456
    for name, bits in [("qsgd", 4), ("nuq", 3), ("alq", 2), ("terngrad", 2)]:
        for backend in ("numpy", None):
            p = quantize(x, name, bits, 100, key=key, offset=off, codebook=codebook_for(name, bits),
                         backend=backend)
            codes = unpack_codes(p.codes, bits, x.size).astype(np.int64)
            mom = moments(x, p.scales, levels_for(name, bits), 100)
            u = rng.uniforms(key, off, x.size).astype(np.float64)
            expect = mom.j + (u < mom.p)
            clear = (np.abs(u - mom.p) > 1e-5) & (mom.p > 1e-5) & (mom.p < 1 - 1e-5)
            assert clear.mean() > 0.7
            assert np.array_equal(codes[clear], expect[clear]), (name, backend)


# ------------------------------------------------------------------------------------------------
# packing

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 9, 1001])
def test_pack_unpack_round_trip_and_size(bits, n):
    g = np.random.default_rng(bits * 10007 + n)
    codes = g.integers(0, 2 ** bits, n).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == math.ceil(n * bits / 8) == common.packed_nbytes(n, bits)
    assert np.array_equal(unpack_codes(packed, bits, n), codes)
    # LSB-first dense bit stream: code i occupies bits [i*b, (i+1)*b); padding bits are zero
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes))
    assert int.from_bytes(packed.tobytes(), "little") == stream


def test_pack_known_layout_across_byte_boundaries():
    assert pack_codes(np.array([1, 2, 3], np.uint8), 3).tolist() == [0b11010001, 0b0]
    assert pack_codes(np.array([31, 0, 31], np.uint8), 5).tolist() == [0b00011111, 0b01111100]
    assert pack_codes(np.array([127], np.uint8), 7).tolist() == [127]
    assert pack_codes(np.array([0, 127], np.uint8), 7).tolist() == [0b10000000, 0b00111111]
    assert pack_codes(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], np.uint8), 1).tolist() == [1, 1]
    assert pack_codes(np.array([0x35, 0x0A], np.uint8), 6).tolist() == [0b10110101, 0b10]


@pytest.mark.parametrize("name,bits",
                         [("alq", 1)] + [("qsgd", b) for b in range(2, 9)] + [("sign", 1), ("terngrad", 2)])
@pytest.mark.parametrize("n", [1, 7, 9, 1001])
def test_payload_codes_are_densely_packed(name, bits, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    p = quantize(x, name, bits, 64, codebook=codebook_for(name, bits))
    assert p.codes.dtype == np.uint8 and p.codes.size == math.ceil(n * bits / 8)
    assert p.scales.size == math.ceil(n / 64)
    codes = unpack_codes(p.codes, bits, n)
    assert codes.max() < levels_for(name, bits).size


# ------------------------------------------------------------------------------------------------
# zeros and empty input

@pytest.mark.parametrize("name", FIXED + ADAPTIVE)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_zero_buckets_decode_to_exact_zeros(name, rounding):
    bits = default_bits(name)
    cbk = codebook_for(name, bits)
    x = np.random.default_rng(2).standard_normal(300).astype(np.float32)
    x[100:200] = 0
    for backend in ("numpy", None):
        p = quantize(x, name, bits, 100, seed=5, rounding=rounding, codebook=cbk, backend=backend)
        y = dequantize(p, backend=backend)
        assert p.scales[1] == 0 and p.scales[0] > 0 and p.scales[2] > 0
        assert not np.any(np.isnan(y)) and np.all(np.isfinite(y))
        assert np.all(y[100:200] == 0)
        z = dequantize(quantize(np.zeros((4, 50), np.float32), name, bits, 32, seed=5, rounding=rounding,
                                codebook=cbk, backend=backend))
        assert z.shape == (4, 50) and np.all(z == 0) and not np.any(np.isnan(z))
        t = dequantize(quantize(torch.zeros(3, 7, dtype=torch.float16), name, bits, 4, codebook=cbk,
                                rounding=rounding, backend=backend))
        assert t.dtype == torch.float16 and torch.equal(t, torch.zeros(3, 7, dtype=torch.float16))


@pytest.mark.parametrize("name", FIXED + ADAPTIVE + ["none", "fp16"])
@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_input(name, shape):
    bits = default_bits(name) if name not in ("none", "fp16") else None
    cbk = codebook_for(name, bits) if bits else None
    for backend in ("numpy", None):
        p = quantize(np.zeros(shape, np.float32), name, bits, 16, codebook=cbk, backend=backend)
        assert p.numel == 0 and p.codes.size == 0
        y = dequantize(p, backend=backend)
        assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == np.float32
        t = dequantize(quantize(torch.zeros(shape, dtype=torch.bfloat16), name, bits, 16, codebook=cbk,
                                backend=backend))
        assert t.shape == shape and t.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# dtypes and array kinds

TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NUMPY_DTYPES = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("name", ["qsgd", "nuq", "sign", "terngrad", "alq", "none", "fp16"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_dtypes_round_trip_as_torch_and_match_fp32_path(name, dtype):
    bits = default_bits(name) if name not in ("none", "fp16") else None
    cbk = codebook_for(name, bits) if bits else None
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 7, generator=g).to(dtype)
    p = quantize(t, name, bits, 16, seed=9, codebook=cbk)
    out = dequantize(p)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == t.shape
    assert p.orig_dtype == str(dtype).replace("torch.", "")
    ref = quantize(t.to(torch.float32).numpy(), name, bits, 16, seed=9, codebook=cbk, backend="numpy")
    assert np.array_equal(p.codes, ref.codes)
    if ref.scales is not None:
        assert np.array_equal(p.scales, ref.scales)
    expect = torch.from_numpy(dequantize(ref)).to(dtype)
    assert torch.equal(out, expect)
    # like= hands back the kind of another array
    as_np = dequantize(p, like=np.zeros(1))
    assert isinstance(as_np, np.ndarray) and as_np.shape == (3, 5, 7)


@pytest.mark.parametrize("name", ["qsgd", "nuq", "sign", "terngrad", "alq"])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_dtypes_round_trip_as_numpy_and_match_fp32_path(name, dtype):
    bits = default_bits(name)
    cbk = codebook_for(name, bits)
    a = np.random.default_rng(1).standard_normal((4, 33)).astype(dtype)
    p = quantize(a, name, bits, 16, seed=2, codebook=cbk)
    out = dequantize(p)
    assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype) and out.shape == a.shape
    ref = quantize(a.astype(np.float32), name, bits, 16, seed=2, codebook=cbk, backend="numpy")
    assert np.array_equal(p.codes, ref.codes) and np.array_equal(p.scales, ref.scales)
    assert np.array_equal(out, dequantize(ref).astype(dtype))
    t = dequantize(p, like=torch.zeros(1, dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == (4, 33)


def test_torch_non_contiguous_and_requires_grad():
    base = torch.randn(8, 6, requires_grad=True)
    t = base.t()                                  # non-contiguous view
    p = quantize(t, "qsgd", 4, 8, seed=1)
    ref = quantize(t.detach().contiguous().numpy(), "qsgd", 4, 8, seed=1)
    assert p.to_bytes() == ref.to_bytes()
    out = dequantize(p)
    assert out.shape == (6, 8) and not out.requires_grad


# ------------------------------------------------------------------------------------------------
# counter-based RNG and reproducibility

def _hash_uniform(key: int, index: int) -> float:
    """rng's draw written out on Python ints (the definition in its module docstring)."""
    m32 = (1 << 32) - 1
    x = ((index & m32) * 0x9E3779B9 + (key & m32) + (index >> 32) * 0x85EBCA6B) & m32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & m32
    x ^= key >> 32
    x ^= x >> 15
    x = (x * 0xD35A2D97) & m32
    x ^= x >> 15
    return (x >> 8) * 2.0 ** -24


def test_uniforms_match_scalar_definition():
    for key in (0, 1, rng.stream_key(5), rng.MASK64, rng.stream_key(2 ** 63 + 3, 7, 11, 13, rng.DOWNLINK)):
        for off in (0, 1, 999, 2 ** 32 - 9, 2 ** 40 + 5):      # 2^32 - 9: the low half wraps inside
            u = rng.uniforms(key, off, 17)
            for i in range(17):
                assert u[i] == np.float32(_hash_uniform(key, off + i))
    u = rng.uniforms(rng.stream_key(1), 0, 5000)
    assert np.array_equal(rng.uniforms(rng.stream_key(1), 1234, 100), u[1234:1334])
    assert u.dtype == np.float32 and rng.uniforms(3, 10, 0).size == 0


@pytest.mark.parametrize("name,bits,bucket", [("qsgdinf", 4, 128), ("qsgdinf", 8, 64), ("sign", 1, 512),
                                              ("qsgd", 2, 100), ("nuq", 3, 128), ("alq", 5, 128)])
def test_kernel_draws_match_reference_where_the_index_crosses_2_32(name, bits, bucket):
    """The numba loops take the low 32 bits of the element index from a per-run start and carry
    into the high half where it wraps (here inside a bucket): the same draws as the reference."""
    x = make_x(3000, bucket, seed=bits)
    key = rng.stream_key(9, rank=1, step=3, tensor=2)
    cbk = codebook_for(name, bits)
    for off in (2 ** 32 - 1000, 2 ** 33 - 8):
        ref = quantize(x, name, bits, bucket, rounding="stochastic", key=key, offset=off, backend="numpy",
                       codebook=cbk)
        got = quantize(x, name, bits, bucket, rounding="stochastic", key=key, offset=off, codebook=cbk)
        assert np.array_equal(ref.scales, got.scales) and np.array_equal(ref.codes, got.codes), (name, off)


def test_uniforms_are_uniform_and_independent():
    n = 1 << 18
    u = rng.uniforms(rng.stream_key(2024), 0, n).astype(np.float64)
    assert u.min() >= 0 and u.max() < 1
    assert np.all(u * 2 ** 24 == np.floor(u * 2 ** 24))          # exactly on the 2^-24 grid
    # DKW: P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2); eps at delta = 1e-9
    eps = math.sqrt(math.log(2 / 1e-9) / (2 * n))
    ks = scipy.stats.kstest(u, "uniform")
    assert ks.statistic <= eps, (ks.statistic, eps)
    # moments: mean 1/2 (sd sqrt(1/12/n)), E[u^2] = 1/3 (sd sqrt(4/45/n))
    assert abs(u.mean() - 0.5) <= 6 * math.sqrt(1 / 12 / n)
    assert abs(np.mean(u * u) - 1 / 3) <= 6 * math.sqrt(4 / 45 / n)
    # neighbouring counters and neighbouring keys are uncorrelated
    c = u - 0.5
    for lag in (1, 2, 64):
        assert abs(np.mean(c[:-lag] * c[lag:]) * 12) <= 6 / math.sqrt(n)
    v = rng.uniforms(rng.stream_key(2025), 0, n).astype(np.float64) - 0.5
    assert abs(np.mean(c * v) * 12) <= 6 / math.sqrt(n)
    w = rng.uniforms(rng.stream_key(2024, rank=1), 0, n).astype(np.float64) - 0.5
    assert abs(np.mean(c * w) * 12) <= 6 / math.sqrt(n)
    # every one of the 24 bits is fair
    bits = (u * 2 ** 24).astype(np.int64)
    for b in range(24):
        assert abs(((bits >> b) & 1).mean() - 0.5) <= 6 * 0.5 / math.sqrt(n), b


def test_stream_keys_are_distinct_and_deterministic():
    keys = {rng.stream_key(s, r, t, k, d) for s in range(3) for r in range(4) for t in range(5)
            for k in range(3) for d in range(4)}
    assert len(keys) == 3 * 4 * 5 * 3 * 4
    assert rng.stream_key(7, 1, 2, 3, 0) == rng.stream_key(7, 1, 2, 3, 0)
    assert all(0 <= k <= rng.MASK64 for k in keys)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_bytes_different_seed_differs(name):
    bits = default_bits(name)
    cbk = codebook_for(name, bits)
    x = np.random.default_rng(0).standard_normal(2000).astype(np.float32)
    a = quantize(x, name, bits, 256, seed=31, codebook=cbk).to_bytes()
    assert a == quantize(x, name, bits, 256, seed=31, codebook=cbk).to_bytes()
    assert a == quantize(x, name, bits, 256, seed=31, codebook=cbk, backend="numpy").to_bytes()
    assert a == quantize(x, name, bits, 256, key=rng.stream_key(31), codebook=cbk).to_bytes()
    assert a != quantize(x, name, bits, 256, seed=32, codebook=cbk).to_bytes()
    assert a != quantize(x, name, bits, 256, key=rng.stream_key(31, rank=1), codebook=cbk).to_bytes()


@pytest.mark.parametrize("name,bits", [("qsgd", 4), ("qsgd", 3), ("nuq", 5), ("terngrad", 2), ("alq", 3),
                                       ("qsgdinf", 7), ("sign", 1)])
@pytest.mark.parametrize("backend", ["numpy", None])
def test_chunked_quantization_with_offset_equals_whole(name, bits, backend):
    bs = 64
    x = np.random.default_rng(8).standard_normal(10 * bs + 13).astype(np.float32)
    cbk = codebook_for(name, bits)
    key = rng.stream_key(99, rank=2, step=5)
    whole = quantize(x, name, bits, bs, key=key, codebook=cbk, backend=backend)
    wcodes = unpack_codes(whole.codes, bits, x.size)
    bounds = [0, bs, 4 * bs, 9 * bs, x.size]
    ys = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = quantize(x[a:b], name, bits, bs, key=key, offset=a, codebook=cbk, backend=backend)
        assert np.array_equal(unpack_codes(part.codes, bits, b - a), wcodes[a:b])
        assert np.array_equal(part.scales, whole.scales[a // bs: -(-b // bs)])
        ys.append(dequantize(part, backend=backend))
        # seed + offset gives the same stream as key + offset
        assert part.to_bytes() == quantize(x[a:b], name, bits, bs, seed=0, key=key, offset=a, codebook=cbk,
                                           backend=backend).to_bytes()
    assert np.array_equal(np.concatenate(ys), dequantize(whole, backend=backend))
    if whole.stochastic:  # a wrong offset draws different numbers
        bad = quantize(x[bs:4 * bs], name, bits, bs, key=key, offset=0, codebook=cbk, backend=backend)
        assert not np.array_equal(unpack_codes(bad.codes, bits, 3 * bs), wcodes[bs:4 * bs])


@pytest.mark.parametrize("name", FIXED + ADAPTIVE + ["none", "fp16"])
@pytest.mark.parametrize("n", [1, 63, 1000, 20_011])
def test_default_backend_is_bit_identical_to_numpy_reference(name, n):
    g = np.random.default_rng(n)
    x = (g.standard_normal(n) * np.exp(2 * g.standard_normal(n))).astype(np.float32)  # < fp16 max
    if n > 128:
        x[64:128] = 0
    nbits = [None] if name in ("none", "fp16") else (
        [1] if name == "sign" else [2] if name == "terngrad" else [1, 3, 5, 8] if name in ("alq", "alq_n")
        else [2, 3, 6, 8])
    for bits in nbits:
        cbk = codebook_for(name, bits) if bits else None
        for rounding, off in (("stochastic", 777), ("nearest", 0)):
            for bs in ((64, 1000) if n > 64 else (64,)):
                kw = dict(quantizer=name, bits=bits, bucket_size=bs, seed=3, rounding=rounding, codebook=cbk,
                          offset=off)
                a = quantize(x, backend="numpy", **kw)
                b = quantize(x, **kw)
                assert a.to_bytes() == b.to_bytes(), (name, bits, rounding, off)
                assert np.array_equal(dequantize(a, backend="numpy"), dequantize(b))


def test_explicit_numba_backend_matches_reference_when_present():
    pytest.importorskip("hvd_qadam.quant.cpu_numba")
    x = make_x(1000, 100, seed=5)
    for name in FIXED + ADAPTIVE:
        bits = default_bits(name)
        cbk = codebook_for(name, bits)
        a = quantize(x, name, bits, 100, seed=4, codebook=cbk, backend="numpy")
        b = quantize(x, name, bits, 100, seed=4, codebook=cbk, backend="numba")
        assert a.to_bytes() == b.to_bytes(), name
        assert np.array_equal(dequantize(a, backend="numpy"), dequantize(b, backend="numba"))


# ------------------------------------------------------------------------------------------------
# error feedback at the quantizer level

def _sterbenz_exact_cases():
    return [("qsgd", 2), ("qsgd", 4), ("qsgd", 8), ("qsgdinf", 3), ("nuq", 3), ("nuq", 5), ("terngrad", 2)]


@pytest.mark.parametrize("name,bits", _sterbenz_exact_cases())
def test_error_feedback_nearest_rounding_residual_exact_and_bounded(name, bits):
    """With nearest rounding on these grids every nonzero decode q lies in [p/2, 2p], so p - q is exact
    in float32 (Sterbenz) and q + e_new == p holds bit for bit; |e_i| <= half the local gap * s."""
    g = np.random.default_rng(bits)
    bs = 128
    e = np.zeros(1000, np.float32)
    lv = levels_for(name, bits)
    for step in range(30):
        v = (g.standard_normal(1000) * (1 + 10 * (step % 3))).astype(np.float32)
        p = v + e
        pl = quantize(p, name, bits, bs, seed=step, rounding="nearest", backend="numpy")
        q = dequantize(pl, backend="numpy")
        assert q.dtype == np.float32
        e_new = p - q
        assert np.array_equal(q + e_new, p)
        mom = moments(p, pl.scales, lv, bs)
        assert np.all(np.abs(e_new.astype(np.float64)) <= mom.gap / 2 + FP_SLACK * mom.s)
        if name in ("qsgd", "qsgdinf"):
            m = 2 ** (bits - 1) - 1
            s = np.repeat(pl.scales.astype(np.float64), bs)[:1000]
            assert np.all(np.abs(e_new) <= s / (2 * m) * (1 + 1e-5))
        e = e_new


@pytest.mark.parametrize("name,bits,bs", [("qsgd", 2, 100), ("qsgd", 4, 16), ("nuq", 3, 100), ("nuq", 4, 16),
                                          ("terngrad", 2, 100), ("alq", 2, 100)])
def test_error_feedback_stochastic_residual_per_step_bound_and_conservation(name, bits, bs):
    """Per step |e_i| <= one local gap * s; over the loop sum(sent) + e_T == sum(v) up to float32
    rounding. Stochastic rounding is no contraction in general (E||Q(p)-p||^2 can exceed ||p||^2,
    e.g. alq at 2 bits has no zero level), so only the per-step bound is universal; where the
    exact variance bound omega < 1 (qsgd: min(d/m^2, sqrt(d)/m); nuq: 1/4 + 2^-(m-1) sqrt(d)) the
    residual is also bounded: E||e||^2 <= omega E||v||^2 / (1 - sqrt(omega))^2 at the fixed point."""
    g = np.random.default_rng(10 + bits)
    n, steps = 800, 40
    e = np.zeros(n, np.float32)
    sent = np.zeros(n)
    total_v = np.zeros(n)
    rounding_budget = np.zeros(n)
    lv = levels_for(name, bits)
    cbk = codebook_for(name, bits)
    m = 2 ** (bits - 1) - 1
    omega = {"qsgd": min(bs / m ** 2, math.sqrt(bs) / m), "nuq": 0.25 + 2.0 ** -(m - 1) * math.sqrt(bs)}.get(name)
    worst = 0.0
    for step in range(steps):
        v = g.standard_normal(n).astype(np.float32)
        p = v + e
        pl = quantize(p, name, bits, bs, seed=step, codebook=cbk, backend="numpy")
        q = dequantize(pl, backend="numpy")
        e_new = p - q
        mom = moments(p, pl.scales, lv, bs)
        # one stochastic rounding moves a coordinate by at most one local gap
        assert np.all(np.abs(e_new.astype(np.float64)) <= mom.gap + FP_SLACK * mom.s)
        # e_new is the float32 rounding of the exact difference
        exact = p.astype(np.float64) - q.astype(np.float64)
        assert np.all(np.abs(exact - e_new) <= np.abs(e_new.astype(np.float64)) * 2.0 ** -24)
        sent += q
        total_v += v
        rounding_budget += (np.abs(p) + np.abs(e_new)).astype(np.float64) * 2.0 ** -24
        e = e_new
        worst = max(worst, float(np.sum(e.astype(np.float64) ** 2)))
    # telescoping: everything fed in was either sent or is still in the residual
    assert np.all(np.abs(sent + e - total_v) <= rounding_budget * 1.01 + 1e-12)
    if omega is not None and omega < 1:
        fixed_point = omega * n / (1 - math.sqrt(omega)) ** 2
        assert worst <= 3 * fixed_point, (worst, fixed_point)


def test_error_feedback_scaled_sign_residual_identity():
    """Scaled sign with s = mean|p| per bucket: ||p - s sign(p)||^2 = ||p||^2 - ||p||_1^2 / d exactly,
    the EF-signSGD contraction (<= (1 - 1/d) ||p||^2)."""
    g = np.random.default_rng(12)
    bs, n = 64, 64 * 10 + 20
    e = np.zeros(n, np.float32)
    for step in range(20):
        p = (g.standard_normal(n) ** 3).astype(np.float32) + e
        q = dequantize(quantize(p, "sign", 1, bs, backend="numpy"))
        e = p - q
        for k in range(0, n, bs):
            pk = p[k:k + bs].astype(np.float64)
            d = pk.size
            ek = e[k:k + bs].astype(np.float64)
            expect = np.sum(pk ** 2) - np.sum(np.abs(pk)) ** 2 / d
            assert np.sum(ek ** 2) == pytest.approx(expect, rel=1e-4, abs=1e-6 * np.sum(pk ** 2))
            assert np.sum(ek ** 2) <= (1 - 1 / d) * np.sum(pk ** 2) * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------
# bad input

XV = np.linspace(-1, 1, 100, dtype=np.float32)


@pytest.mark.parametrize("name,bits,msg", [
    ("qsgd", 0, r"bits in 2\.\.8; got bits=0"),
    ("qsgd", 9, r"bits in 2\.\.8; got bits=9"),
    ("qsgd", 1, r"'qsgd' supports bits in 2\.\.8; got bits=1"),
    ("qsgdinf", -3, r"bits in 2\.\.8"),
    ("nuq", 9, r"bits in 2\.\.8"),
    ("sign", 2, r"'sign' always uses 1 bit"),
    ("terngrad", 3, r"'terngrad' always uses 2 bit"),
    ("qsgd", 4.0, r"bits must be an integer, got 4\.0"),
    ("qsgd", 3.5, r"bits must be an integer"),
    ("qsgd", "4", r"bits must be an integer, got '4'"),
    ("qsgd", True, r"bits must be an integer, got True"),
])
def test_bad_bits(name, bits, msg):
    with pytest.raises(QuantizerError, match=msg):
        quantize(XV, name, bits)


def test_bad_bits_adaptive():
    with pytest.raises(QuantizerError, match=r"'alq' supports bits in 1\.\.8; got bits=9"):
        quantize(XV, "alq", 9, codebook=codebooks.default_adaptive_codebook(8))
    with pytest.raises(QuantizerError, match=r"'amq' supports bits in 2\.\.8; got bits=1"):
        quantize(XV, "amq", 1, codebook=[-1.0, 1.0])


def test_unknown_quantizer_and_rounding():
    with pytest.raises(QuantizerError, match=r"unknown quantizer 'qsgd2'.*choose one of"):
        quantize(XV, "qsgd2", 4)
    with pytest.raises(QuantizerError, match=r"rounding must be one of .*got 'floor'"):
        quantize(XV, "qsgd", 4, rounding="floor")


@pytest.mark.parametrize("bucket", [0, -1, -512, 2.5, 512.0, "512", True])
def test_bad_bucket_size(bucket):
    with pytest.raises(QuantizerError, match=r"bucket_size must be a positive integer, got " + re.escape(repr(bucket))):
        quantize(XV, "qsgd", 4, bucket)


def test_defaults_are_the_optimizers():
    """bits / bucket_size None: one default per quantizer, the same for quantize(), LinkSpec (what
    DistributedOptimizer sends) and Compression.simulated."""
    from hvd_qadam.config import LinkSpec
    for name, bits, bucket in (("qsgd", 6, 128), ("qsgdinf", 6, 128), ("nuq", 4, 128), ("sign", 1, 512),
                               ("terngrad", 2, 128)):
        p = quantize(XV, name)
        assert (p.bits, p.bucket_size) == (bits, bucket), name
        link = LinkSpec(name)
        assert (link.bits, link.bucket_size) == (bits, bucket), name
        sim = hvd_qadam.Compression.simulated(name)
        a = sim.compress(torch.from_numpy(XV))[0].numpy()
        want = dequantize(quantize(XV, name, bits, bucket, key=rng.stream_key(0, sim._rank, 0)))
        assert np.array_equal(a, want), name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["numpy", "torch", "torch16"])
def test_nan_inf_rejected(bad, kind):
    a = XV.copy()
    a[[3, 50]] = bad
    x = a if kind == "numpy" else torch.from_numpy(a) if kind == "torch" else torch.from_numpy(a).half()
    for name in ("qsgd", "sign", "nuq", "none"):
        with pytest.raises(ValueError, match=r"2 NaN/Inf value"):
            quantize(x, name, default_bits(name) if name != "none" else None)


@pytest.mark.parametrize("x", [np.arange(10), np.arange(10, dtype=np.uint8), np.ones(3, bool),
                               np.ones(3, np.complex64), torch.arange(10), torch.ones(3, dtype=torch.bool),
                               torch.ones(4, dtype=torch.int8)],
                         ids=["np_int64", "np_uint8", "np_bool", "np_complex", "torch_int64", "torch_bool",
                              "torch_int8"])
def test_non_float_inputs_rejected(x):
    with pytest.raises(QuantizerError, match=r"floating-point"):
        quantize(x, "qsgd", 4)


def test_codebook_errors():
    with pytest.raises(QuantizerError, match=r"'qsgd' has a fixed codebook; do not pass one"):
        quantize(XV, "qsgd", 4, codebook=codebooks.default_adaptive_codebook(4))
    with pytest.raises(QuantizerError, match=r"'sign' has a fixed codebook"):
        quantize(XV, "sign", 1, codebook=[-1.0, 1.0])
    with pytest.raises(QuantizerError, match=r"'alq' needs a codebook"):
        quantize(XV, "alq", 3)
    with pytest.raises(QuantizerError, match=r"'amq_n' needs a codebook"):
        quantize(XV, "amq_n", 3)
    with pytest.raises(QuantizerError, match=r"strictly increasing"):
        quantize(XV, "alq", 2, codebook=[-1.0, 0.5, 0.25, 1.0])
    with pytest.raises(QuantizerError, match=r"strictly increasing"):
        quantize(XV, "alq", 2, codebook=[-1.0, 0.0, 0.0, 1.0])
    with pytest.raises(QuantizerError, match=r"finite"):
        quantize(XV, "alq", 2, codebook=[-1.0, np.nan, 1.0])
    with pytest.raises(QuantizerError, match=r"inside \[-1, 1\]"):
        quantize(XV, "alq", 2, codebook=[-1.5, 0.0, 1.0])
    with pytest.raises(QuantizerError, match=r"inside \[-1, 1\]"):
        quantize(XV, "alq", 2, codebook=[-1.0, 0.0, 1.25])
    with pytest.raises(QuantizerError, match=r"codebook has 5 levels; 2 bit\(s\) allow 2\.\.4"):
        quantize(XV, "alq", 2, codebook=[-1.0, -0.5, 0.0, 0.5, 1.0])
    with pytest.raises(QuantizerError, match=r"codebook has 1 levels"):
        quantize(XV, "alq", 2, codebook=[0.5])
    with pytest.raises(QuantizerError, match=r"codebook has 3 levels; 1 bit\(s\) allow 2\.\.2"):
        quantize(XV, "alq", 1, codebook=[-1.0, 0.0, 1.0])


def test_errors_are_value_errors():
    assert issubclass(QuantizerError, ValueError)
    assert hvd_qadam.QuantizerError is QuantizerError


# ------------------------------------------------------------------------------------------------
# regressions of library bugs found by these tests (fixed)

@pytest.mark.parametrize("name", ["qsgd", "nuq"])
def test_regression_l2_scale_overflow_decodes_to_nan(name):
    x = np.full(4, 3e38, dtype=np.float32)
    try:
        with np.errstate(all="ignore"):
            p = quantize(x, name, 4, 4)
    except ValueError:
        return  # refusing with a clear error is also acceptable
    with np.errstate(all="ignore"):
        y = dequantize(p)
    assert np.all(np.isfinite(y)), y


def test_regression_fp16_passthrough_overflow_becomes_inf():
    x = np.array([1.0, 7e4, -1e5], dtype=np.float32)
    try:
        with np.errstate(all="ignore"):
            p = quantize(x, "fp16", None)
    except ValueError:
        return  # refusing with a clear error is also acceptable
    assert np.all(np.isfinite(dequantize(p)))


@pytest.mark.parametrize("name", ["sign", "terngrad", "fp16", "none"])
def test_regression_default_bits_rejects_fixed_width_quantizers(name):
    p = quantize(XV, name)
    assert p.bits == {"sign": 1, "terngrad": 2, "fp16": 16, "none": 32}[name]
