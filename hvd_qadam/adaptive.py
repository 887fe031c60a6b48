"""Adaptive quantization levels: ALQ and AMQ (Faghri et al., NeurIPS 2020).

At scheduled steps every rank summarises its gradients per bucket (summable sums of the
normalised coordinates r = x / ||x_bucket||_2), the sums are allreduced, and every rank fits the
same density f on [-1, 1] and the same codebook that minimises the expected quantization variance

    Psi(l) = sum_j int_{l_j}^{l_{j+1}} (l_{j+1} - r)(r - l_j) f(r) dr.

Densities: ``alq_n`` / ``amq_n`` fit one truncated normal to the pooled statistics; ``alq`` /
``amq`` fit a mixture of per-bucket truncated normals over the largest-norm buckets, weighted by
bucket norm (not squared, as in the authors' code). Every integral is in closed form (normal
pdf/cdf), with interval masses taken from the tail that keeps relative precision.

ALQ: coordinate descent over the inner levels (endpoints -1, +1 fixed) with the exact
one-level minimiser, then a Newton polish (Psi's Hessian is tridiagonal); best of quantile /
uniform / exponential / sqrt-density-quantile starts. AMQ: levels +-p^j and
gradient descent on p with the analytic dPsi/dp; best of several starts.

Everything is a deterministic function of the summed statistics (and, for AMQ, the previous p,
which every rank holds too), so ranks agree on the codebook without sending it. That holds for
identical software on identical CPUs; NumPy's vectorised exp/erf may differ in the last bit
between CPU generations, so a mixed cluster should broadcast rank 0's levels
(``LevelAdapter.set_codebook``).
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import solve_banded
from scipy.special import ndtr

from .quant import codebooks as cb

ADAPTIVE_QUANTIZERS = ("alq", "amq", "alq_n", "amq_n")
# Per-bucket sums, stored field-major: [count | sum r | sum r^2 | norm], each num_buckets long.
STAT_FIELDS = ("count", "sum_r", "sum_r2", "norm")
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
_SOLVE_ITERS = 100


# --------------------------------------------------------------------------------------------
# Sufficient statistics

def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):                  # torch tensor, any device
        v = v.detach().reshape(-1).float().cpu().numpy()
    elif hasattr(v, "get") and type(v).__module__.startswith("cupy"):
        v = v.get()
    return np.asarray(v).reshape(-1)


def bucket_statistics(vectors, bucket_size: int) -> np.ndarray:
    """Summable per-bucket sums of r = x / ||x_bucket||_2 over a list of vectors.

    Each vector is split into buckets of ``bucket_size`` (its last bucket may be short). The
    result is float64 of length 4 * total_buckets, laid out as STAT_FIELDS blocks. Buckets whose
    norm is zero or not finite contribute nothing (a zero bucket is sent as zeros at no variance;
    a non-finite one is the caller's overflow and must not poison the fit).
    """
    counts, sums, sumsqs, norms = [], [], [], []
    for v in vectors:
        x = _as_numpy(v).astype(np.float64)
        n = x.size
        nb = -(-n // bucket_size)
        if nb == 0:
            continue
        padded = np.zeros(nb * bucket_size)
        padded[:n] = x
        padded = padded.reshape(nb, bucket_size)
        length = np.full(nb, float(bucket_size))
        length[-1] = n - (nb - 1) * bucket_size
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.sqrt(np.einsum("ij,ij->i", padded, padded))
        usable = np.isfinite(norm) & (norm > 0)
        safe_norm = np.where(usable, norm, 1.0)
        with np.errstate(invalid="ignore"):
            r = np.where(usable[:, None], padded / safe_norm[:, None], 0.0)
        counts.append(np.where(usable, length, 0.0))
        sums.append(r.sum(axis=1))
        sumsqs.append(np.einsum("ij,ij->i", r, r))
        norms.append(np.where(usable, norm, 0.0))
    if not counts:
        return np.zeros(0)
    return np.concatenate([np.concatenate(f) for f in (counts, sums, sumsqs, norms)])


def split_statistics(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Per-bucket count, mean and variance of r, and the summed norm, from (summed) statistics."""
    s = np.asarray(stats, dtype=np.float64).ravel()
    if s.size % len(STAT_FIELDS):
        raise ValueError(f"statistics must have 4 * num_buckets entries, got {s.size}")
    count, sum_r, sum_r2, norm = s.reshape(len(STAT_FIELDS), -1)
    # Buckets summed with a non-finite entry, or with nothing in them, are dropped.
    ok = np.isfinite(count) & np.isfinite(sum_r) & np.isfinite(sum_r2) & np.isfinite(norm) & (count > 0)
    c = np.where(ok, count, 1.0)
    mean = np.where(ok, sum_r / c, 0.0)
    # E[r^2] - mean^2 can dip below zero by rounding (e.g. a constant bucket).
    var = np.where(ok, np.maximum(sum_r2 / c - mean * mean, 0.0), 0.0)
    return {"count": np.where(ok, count, 0.0), "mean": np.clip(mean, -1.0, 1.0), "var": var,
            "norm": np.where(ok, np.maximum(norm, 0.0), 0.0), "usable": ok & (norm > 0)}


# --------------------------------------------------------------------------------------------
# Density: a mixture of normals truncated to [-1, 1]

def _phi(t):
    with np.errstate(under="ignore", over="ignore"):
        return _INV_SQRT_2PI * np.exp(-0.5 * t * t)


def _normal_mass(ta, tb):
    """Phi(tb) - Phi(ta) for ta <= tb, from the tail that keeps relative precision."""
    with np.errstate(under="ignore"):
        return np.where(ta > 0, ndtr(-ta) - ndtr(-tb), ndtr(tb) - ndtr(ta))


class TruncatedNormalMixture:
    """f(r) = sum_c w_c TN(r; mu_c, sigma_c, [-1, 1]), with closed-form partial integrals.

    Interval functions take level arrays a <= b (same shape) and return arrays of that shape.
    """

    def __init__(self, mu, sigma, weight):
        self.mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        self.sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
        w = np.atleast_1d(np.asarray(weight, dtype=np.float64))
        if not (self.mu.shape == self.sigma.shape == w.shape) or self.mu.size == 0:
            raise ValueError("mu, sigma and weight must be non-empty and of one shape")
        if np.any(self.sigma <= 0) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("sigma must be positive and weights non-negative with a positive sum")
        self.weight = w / w.sum()
        # Fold each component's truncation constant into its weight. mu lies in [-1, 1], so
        # alpha <= 0 <= beta and Z >= Phi(1) - 1/2 for sigma <= 1: never tiny.
        z = _normal_mass((-1.0 - self.mu) / self.sigma, (1.0 - self.mu) / self.sigma)
        self._coef = self.weight / z

    def _standardise(self, a, b):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        ta = (a[..., None] - self.mu) / self.sigma
        tb = (b[..., None] - self.mu) / self.sigma
        return ta, tb

    def mass(self, a, b):
        """int_a^b f(r) dr."""
        ta, tb = self._standardise(a, b)
        return (self._coef * _normal_mass(ta, tb)).sum(-1)

    def cdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        return self.mass(np.full_like(x, -1.0), np.clip(x, -1.0, 1.0))

    def pdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        t = (x[..., None] - self.mu) / self.sigma
        inside = (x >= -1.0) & (x <= 1.0)
        return np.where(inside, (self._coef * _phi(t) / self.sigma).sum(-1), 0.0)

    def left_moment(self, a, b):
        """int_a^b (r - a) f(r) dr  (= dPsi/db of the interval [a, b])."""
        ta, tb = self._standardise(a, b)
        m = _phi(ta) - _phi(tb) - ta * _normal_mass(ta, tb)
        return (self._coef * self.sigma * m).sum(-1)

    def right_moment(self, a, b):
        """int_a^b (b - r) f(r) dr  (= -dPsi/da of the interval [a, b])."""
        ta, tb = self._standardise(a, b)
        m = tb * _normal_mass(ta, tb) - _phi(ta) + _phi(tb)
        return (self._coef * self.sigma * m).sum(-1)

    def interval_variance(self, a, b):
        """int_a^b (b - r)(r - a) f(r) dr: the stochastic-rounding variance collected on [a, b].

        In standard units t = (r - mu)/sigma the integral of (tb - t)(t - ta) phi(t) is
        tb phi(ta) - ta phi(tb) - (1 + ta tb)(Phi(tb) - Phi(ta)).
        """
        ta, tb = self._standardise(a, b)
        j = tb * _phi(ta) - ta * _phi(tb) - (1.0 + ta * tb) * _normal_mass(ta, tb)
        # Rounding can leave a tiny negative on a vanishing interval; the true value is >= 0.
        return np.maximum((self._coef * self.sigma ** 2 * j).sum(-1), 0.0)

    def ppf(self, q):
        """F^-1(q), by bisection on the closed-form CDF (from the nearer end, for precision)."""
        q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
        lower = q <= 0.5
        minus_one = np.full_like(q, -1.0)
        plus_one = np.ones_like(q)

        def excess(x):  # increasing in x; zero at the quantile
            return np.where(lower, self.mass(minus_one, x) - q, (1.0 - q) - self.mass(x, plus_one))
        return _solve_increasing(excess, self.pdf, minus_one, plus_one)

    def sqrt_density_quantiles(self, q, grid_points: int = 4097, points_per_component: int = 257):
        """Quantiles of the density proportional to sqrt(f), on a grid refined around each
        component. Many levels minimise Psi when their local density is proportional to
        sqrt(f) (an interval of width w costs about f w^3 / 6), so this is a near-optimal start.
        """
        around = (self.mu[:, None] + self.sigma[:, None] * np.linspace(-8.0, 8.0, points_per_component)).ravel()
        grid = np.unique(np.concatenate([np.linspace(-1.0, 1.0, grid_points), np.clip(around, -1.0, 1.0)]))
        root = np.sqrt(self.pdf(grid))
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (root[1:] + root[:-1]) * np.diff(grid))])
        return np.interp(np.asarray(q, dtype=np.float64) * cum[-1], cum, grid)


def _solve_increasing(fn, dfn, lo, hi, x0=None):
    """Elementwise root of a non-decreasing fn on [lo, hi] (fn(lo) <= 0 <= fn(hi) assumed).

    Newton steps on the derivative ``dfn`` (the density), kept inside a shrinking bracket and
    replaced by bisection whenever they would leave it: bisection's robustness, Newton's speed.
    """
    lo = np.array(lo, dtype=np.float64)
    hi = np.array(hi, dtype=np.float64)
    x = 0.5 * (lo + hi) if x0 is None else np.clip(np.array(x0, dtype=np.float64), lo, hi)
    for _ in range(_SOLVE_ITERS):
        value = fn(x)
        below = value < 0
        lo = np.where(below, x, lo)
        hi = np.where(below, hi, x)
        slope = dfn(x)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            newton = x - value / slope
        ok = (slope > 0) & np.isfinite(newton) & (newton >= lo) & (newton <= hi)
        x_new = np.where(value == 0, x, np.where(ok, newton, 0.5 * (lo + hi)))
        tol = 4e-16 * np.maximum(1.0, np.abs(x_new))
        done = (np.abs(x_new - x) <= tol) | (hi - lo <= tol)
        x = x_new
        if np.all(done):
            break
    return x


def fit_pooled(stats: np.ndarray, min_sigma: float = 1e-6) -> TruncatedNormalMixture | None:
    """One truncated normal matching the mean and variance of all coordinates (alq_n, amq_n).

    The variance is that of all pooled coordinates (spread of the bucket means included), the
    moment match of their marginal; the authors' code pooled only within-bucket variances. For
    normalised gradients the bucket means are near zero and the two agree closely.
    """
    b = split_statistics(stats)
    use = b["usable"]
    n = b["count"][use].sum()
    if n <= 0:
        return None
    s = np.asarray(stats, dtype=np.float64).reshape(len(STAT_FIELDS), -1)
    mean = float(np.clip(s[1][use].sum() / n, -1.0, 1.0))
    var = max(float(s[2][use].sum() / n - mean * mean), 0.0)
    return TruncatedNormalMixture([mean], [max(np.sqrt(var), min_sigma)], [1.0])


def fit_mixture(stats: np.ndarray, num_top_buckets: int = 50,
                min_sigma: float = 1e-6) -> TruncatedNormalMixture | None:
    """Per-bucket truncated normals over the largest-norm buckets, weighted by norm (alq, amq)."""
    b = split_statistics(stats)
    idx = np.flatnonzero(b["usable"])
    if idx.size == 0:
        return None
    # Stable sort: equal norms keep bucket order, so every rank picks the same buckets.
    top = idx[np.argsort(-b["norm"][idx], kind="stable")[:max(1, int(num_top_buckets))]]
    sigma = np.maximum(np.sqrt(b["var"][top]), min_sigma)
    return TruncatedNormalMixture(b["mean"][top], sigma, b["norm"][top])


# --------------------------------------------------------------------------------------------
# The objective and its derivatives

def psi(levels, density: TruncatedNormalMixture) -> float:
    """Expected per-coordinate variance of stochastic rounding to ``levels`` under ``density``."""
    lv = np.asarray(levels, dtype=np.float64)
    return float(density.interval_variance(lv[:-1], lv[1:]).sum())


def psi_gradient(levels, density: TruncatedNormalMixture) -> np.ndarray:
    """dPsi/dl_j for every level (the endpoints' entries included)."""
    lv = np.asarray(levels, dtype=np.float64)
    g = np.zeros_like(lv)
    g[1:] += density.left_moment(lv[:-1], lv[1:])
    g[:-1] -= density.right_moment(lv[:-1], lv[1:])
    return g


def alq_level_update(a, b, current, density: TruncatedNormalMixture) -> np.ndarray:
    """The level in [a, b] that minimises Psi with its neighbours a, b fixed (elementwise).

    Psi restricted to one level is convex (its second derivative is (b - a) f), and its
    stationary point solves  mass(x, b) = int_a^b (r - a) f dr / (b - a),  i.e. the paper's
    x = F^-1(F(b) - int_a^b (r - a) f dr / (b - a)). Where [a, b] holds no mass any x is optimal:
    keep the current level.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    width = np.maximum(b - a, np.finfo(np.float64).tiny)
    target = density.left_moment(a, b) / width
    x = _solve_increasing(lambda x: target - density.mass(x, b), density.pdf, a, b, current)
    empty = density.mass(a, b) <= 1e-300
    return np.where(empty, np.asarray(current, dtype=np.float64), x)


def newton_polish(levels, density: TruncatedNormalMixture, iters: int = 50) -> tuple[np.ndarray, float]:
    """Refine levels by Newton steps on all inner levels at once; returns (levels, Psi).

    Coordinate descent converges linearly, slower the more levels there are (at 8 bits, 30
    sweeps leave Psi tens of percent above its minimum). Psi's Hessian is tridiagonal:
    d2Psi/dl_j^2 = (l_{j+1} - l_{j-1}) f(l_j) and d2Psi/dl_j dl_{j+1} = -mass(l_j, l_{j+1}),
    so a Newton step costs O(K). A step is taken only along a descent direction, halved until
    the levels stay ordered and Psi decreases; otherwise the levels are returned unchanged.
    """
    lv = np.array(levels, dtype=np.float64)
    value = psi(lv, density)
    if lv.size < 3:
        return lv, value
    for _ in range(iters):
        grad = psi_gradient(lv, density)[1:-1]
        diag = (lv[2:] - lv[:-2]) * density.pdf(lv[1:-1])
        off = -density.mass(lv[1:-2], lv[2:-1])
        banded = np.zeros((3, diag.size))
        banded[0, 1:], banded[1], banded[2, :-1] = off, diag, off
        try:
            with np.errstate(all="ignore"):
                step = solve_banded((1, 1), banded, -grad)
        except (np.linalg.LinAlgError, ValueError):
            break
        if not np.all(np.isfinite(step)) or grad @ step >= 0:
            break
        t, accepted = 1.0, False
        while t > 1e-6:
            trial = lv.copy()
            trial[1:-1] += t * step
            if np.all(np.diff(trial) > 0):
                trial_value = psi(trial, density)
                if trial_value < value:
                    accepted = True
                    break
            t *= 0.5
        if not accepted:
            break
        moved = np.max(np.abs(trial - lv))
        lv, value = trial, trial_value
        if moved <= 1e-13:
            break
    return lv, value


def fit_alq(density: TruncatedNormalMixture, bits: int, sweeps: int = 10,
            polish: bool = True) -> tuple[np.ndarray, float]:
    """ALQ levels (float64, K = 2^bits, endpoints -1 and +1) and their Psi.

    From each start: ``sweeps`` coordinate-descent sweeps with the closed-form one-level update,
    then (``polish``) Newton steps; the start that ends lowest wins.
    """
    k = 2 ** bits
    if k == 2:
        lv = np.array([-1.0, 1.0])
        return lv, psi(lv, density)
    inner = np.arange(1, k - 1)
    starts = [
        np.concatenate([[-1.0], density.ppf(inner / (k - 1)), [1.0]]),     # equal-mass quantiles
        np.linspace(-1.0, 1.0, k),                                           # uniform
        cb.default_adaptive_codebook(bits).astype(np.float64),               # exponential, p = 1/2
        np.concatenate([[-1.0], density.sqrt_density_quantiles(inner / (k - 1)), [1.0]]),
    ]
    # Levels of one parity have neighbours only of the other parity, so updating all odd (then
    # all even) inner levels at once is exactly a sequential coordinate sweep in that order.
    colours = [inner[inner % 2 == 1], inner[inner % 2 == 0]]
    best, best_psi = None, np.inf
    for lv in starts:
        lv = np.sort(lv)
        lv[0], lv[-1] = -1.0, 1.0
        for _ in range(sweeps):
            before = lv.copy()
            for idx in colours:
                if idx.size:
                    lv[idx] = alq_level_update(lv[idx - 1], lv[idx + 1], lv[idx], density)
            if np.all(np.abs(lv - before) <= 1e-8 * np.abs(lv)):
                break
        lv, value = newton_polish(lv, density) if polish else (lv, psi(lv, density))
        if value < best_psi:  # strict: ties keep the earlier start, deterministically
            best, best_psi = lv, value
    return best, best_psi


def amq_levels(p: float, bits: int) -> np.ndarray:
    """+-p^j for j = 0 .. 2^(bits-1) - 1, sorted (2^bits levels, float64)."""
    mags = float(p) ** np.arange(2 ** (bits - 1) - 1, -1, -1, dtype=np.float64)
    return np.concatenate([-mags[::-1], mags])


def amq_psi_derivative(p: float, density: TruncatedNormalMixture, bits: int) -> float:
    """dPsi/dp for the levels +-p^j (chain rule through dl/dp = +-j p^(j-1))."""
    j = np.arange(2 ** (bits - 1) - 1, -1, -1, dtype=np.float64)
    dmag = j * float(p) ** np.maximum(j - 1, 0)
    dlevels = np.concatenate([-dmag[::-1], dmag])
    return float(psi_gradient(amq_levels(p, bits), density) @ dlevels)


def amq_p_bounds(bits: int) -> tuple[float, float]:
    """p stays in (0, 1): low enough that p^(2^(b-1)-1) stays a normal float32, high enough
    that neighbouring levels stay distinct in float32."""
    s = 2 ** (bits - 1) - 1
    return max(1e-3, 1e-30 ** (1.0 / max(s, 1))), 1.0 - 1e-6


DEFAULT_AMQ_STARTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fit_amq(density: TruncatedNormalMixture, bits: int, previous_p: float | None = None,
            starts=DEFAULT_AMQ_STARTS, steps: int = 40) -> tuple[float, float]:
    """The multiplier p of AMQ's levels +-p^j and its Psi.

    Gradient descent on p with the analytic derivative from each start (and the previous p).
    The step size adapts (grow 1.5x after a decrease, halve and retry after an increase)
    because Psi's scale varies by orders of magnitude with the density's spread.
    """
    lo, hi = amq_p_bounds(bits)
    candidates = list(starts) + ([previous_p] if previous_p is not None else [])
    best_p, best_psi = None, np.inf
    for p0 in candidates:
        p = float(np.clip(p0, lo, hi))
        value = psi(amq_levels(p, bits), density)
        move = 0.05  # first trial step moves p by this much
        for _ in range(steps):
            g = amq_psi_derivative(p, density, bits)
            if g == 0.0 or not np.isfinite(g):
                break
            lr = move / abs(g)
            improved = False
            for _ in range(30):
                trial = float(np.clip(p - lr * g, lo, hi))
                trial_value = psi(amq_levels(trial, bits), density)
                if trial_value < value:
                    improved = True
                    break
                lr *= 0.5
            if not improved:
                break
            move = 1.5 * abs(trial - p)
            p, value = trial, trial_value
            if move < 1e-12:
                break
        if value < best_psi:
            best_p, best_psi = p, value
    return best_p, best_psi


# --------------------------------------------------------------------------------------------
# float32 codebooks

def to_codebook(levels, bits: int) -> np.ndarray:
    """float32 levels that pass codebooks.validate_codebook: inside [-1, 1], strictly increasing
    after rounding (levels that collide in float32 are nudged apart by single ulps)."""
    lv = np.clip(np.asarray(levels, dtype=np.float64), -1.0, 1.0).astype(np.float32)
    lv = np.sort(lv)
    for i in range(1, lv.size):  # forward: each level above its left neighbour
        if lv[i] <= lv[i - 1]:
            lv[i] = np.nextafter(lv[i - 1], np.float32(2))
    if lv[-1] > 1:
        lv[-1] = np.float32(1)
        for i in range(lv.size - 2, -1, -1):  # backward: each level below its right neighbour
            if lv[i] >= lv[i + 1]:
                lv[i] = np.nextafter(lv[i + 1], np.float32(-2))
    return cb.validate_codebook(lv, bits).copy()


# --------------------------------------------------------------------------------------------
# What the optimizer / simulator calls

class LevelAdapter:
    """Keeps an adaptive codebook and refits it from allreduced gradient statistics.

    Per update step, on every rank::

        if adapter.due(step):
            s = adapter.local_stats(grads)                 # float64, same length on all ranks
            s = allreduce_sum(s)                           # e.g. hvd.allreduce(..., op=hvd.Sum)
            adapter.update(s, world_size, step=step)       # identical codebook everywhere
        payload = hvd_qadam.quantize(g, adapter.quantizer, bits, bucket_size, codebook=adapter.codebook)
    """

    def __init__(self, quantizer: str, bits: int, bucket_size: int = 512, schedule=(0, 100, 2000),
                 every: int = 10000, num_top_buckets: int = 50, *, cd_sweeps: int = 10,
                 amq_steps: int = 40, amq_starts=DEFAULT_AMQ_STARTS, min_sigma: float = 1e-6):
        kind = cb.kind(quantizer)
        if kind.name not in ADAPTIVE_QUANTIZERS:
            raise cb.QuantizerError(f"LevelAdapter needs one of {ADAPTIVE_QUANTIZERS}, got {quantizer!r}")
        self.quantizer = kind.name
        self.bits = kind.check_bits(bits)
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer)) or bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive integer, got {bucket_size!r}")
        self.bucket_size = int(bucket_size)
        self.schedule = tuple(sorted({int(s) for s in schedule}))
        if any(s < 0 for s in self.schedule):
            raise ValueError(f"schedule steps must be >= 0, got {schedule!r}")
        self.every = int(every) if every else 0
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {every!r}")
        self.num_top_buckets = int(num_top_buckets)
        self.cd_sweeps = int(cd_sweeps)
        self.amq_steps = int(amq_steps)
        self.amq_starts = tuple(float(p) for p in amq_starts)
        self.min_sigma = float(min_sigma)
        self.is_amq = self.quantizer.startswith("amq")
        self.pooled = self.quantizer.endswith("_n")
        self.p = 0.5 if self.is_amq else None
        self._codebook = to_codebook(
            amq_levels(0.5, self.bits) if self.is_amq else cb.default_adaptive_codebook(self.bits), self.bits)
        self._codebook.setflags(write=False)
        self.last_update_step: int | None = None
        self.update_count = 0
        self.last_psi: float | None = None
        self._due_step: int | None = None

    # -- schedule -------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """True at the scheduled steps, then every ``every`` steps after the last of them."""
        step = int(step)
        base = self.schedule[-1] if self.schedule else 0
        hit = step in self.schedule or (self.every > 0 and step >= base and (step - base) % self.every == 0)
        if hit:
            self._due_step = step
        return hit

    # -- statistics -----------------------------------------------------------------------
    def local_stats(self, vectors) -> np.ndarray:
        """This rank's summable statistics of ``vectors`` (each split into its own buckets)."""
        if not isinstance(vectors, (list, tuple)):
            vectors = [vectors]
        return bucket_statistics(vectors, self.bucket_size)

    # -- fitting --------------------------------------------------------------------------
    def fit_density(self, summed_stats: np.ndarray) -> TruncatedNormalMixture | None:
        if self.pooled:
            return fit_pooled(summed_stats, self.min_sigma)
        return fit_mixture(summed_stats, self.num_top_buckets, self.min_sigma)

    def update(self, summed_stats: np.ndarray, world_size: int = 1, step: int | None = None) -> np.ndarray:
        """Fit the density to the allreduced statistics and set the new codebook (float32).

        Statistics with no usable bucket (all-zero or non-finite gradients) keep the current
        codebook. ``world_size`` is accepted for the caller's contract; the fit only uses ratios
        of the sums, so an allreduce average gives the same codebook as a sum.
        """
        if int(world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size!r}")
        stats = np.asarray(summed_stats, dtype=np.float64).ravel()
        if stats.size % len(STAT_FIELDS):
            raise ValueError(f"statistics must have 4 * num_buckets entries, got {stats.size}")
        density = self.fit_density(stats)
        if density is not None:
            if self.is_amq:
                p, value = fit_amq(density, self.bits, self.p, self.amq_starts, self.amq_steps)
                levels = amq_levels(p, self.bits)
                self.p = p
            else:
                levels, value = fit_alq(density, self.bits, self.cd_sweeps)
            codebook = to_codebook(levels, self.bits)
            codebook.setflags(write=False)
            self._codebook = codebook
            self.last_psi = float(value)
            self.update_count += 1
        self.last_update_step = int(step) if step is not None else self._due_step
        return self._codebook

    @property
    def codebook(self) -> np.ndarray:
        """The current float32 levels (read-only)."""
        return self._codebook

    def set_codebook(self, levels, p: float | None = None) -> None:
        """Adopt levels computed elsewhere (e.g. broadcast from rank 0)."""
        codebook = to_codebook(levels, self.bits)
        if codebook.size != self._codebook.size:
            raise cb.QuantizerError(f"expected {self._codebook.size} levels, got {codebook.size}")
        codebook.setflags(write=False)
        self._codebook = codebook
        if self.is_amq and p is not None:
            self.p = float(p)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"quantizer": self.quantizer, "bits": self.bits, "bucket_size": self.bucket_size,
                "codebook": np.array(self._codebook, dtype=np.float32), "p": self.p,
                "last_update_step": self.last_update_step, "update_count": self.update_count,
                "last_psi": self.last_psi}

    def load_state_dict(self, d: dict) -> None:
        if d.get("quantizer", self.quantizer) != self.quantizer or int(d.get("bits", self.bits)) != self.bits:
            raise ValueError(f"state is for {d.get('quantizer')!r} at {d.get('bits')} bits; this adapter is "
                             f"{self.quantizer!r} at {self.bits} bits")
        codebook = np.asarray(d["codebook"], dtype=np.float32)
        if codebook.size != self._codebook.size:
            raise ValueError(f"state codebook has {codebook.size} levels; expected {self._codebook.size}")
        codebook = cb.validate_codebook(codebook, self.bits).copy()
        codebook.setflags(write=False)
        self._codebook = codebook
        self.p = None if d.get("p") is None else float(d["p"])
        self.last_update_step = None if d.get("last_update_step") is None else int(d["last_update_step"])
        self.update_count = int(d.get("update_count", 0))
        self.last_psi = None if d.get("last_psi") is None else float(d["last_psi"])
