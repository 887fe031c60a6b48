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
one-level minimiser, then a damped Newton polish (Psi's Hessian is tridiagonal); best of
quantile / uniform / exponential / sqrt-density-quantile starts, run together as rows of one
array. AMQ: levels +-p^j; Psi and its analytic derivatives in p on a grid of p (the starts among
them), then Newton on dPsi/dp = 0 in every bracket of a local minimum.

The fits are vectorised: one NumPy call covers all levels, starts (or grid points of p) and
mixture components, so a refit takes a few milliseconds at 2-4 bits.

Everything is a deterministic function of the summed statistics (and, for AMQ, the previous p,
which every rank holds too), so ranks agree on the codebook without sending it. That holds for
identical software on identical CPUs; NumPy's vectorised exp/erf may differ in the last bit
between CPU generations, so a mixed cluster should broadcast rank 0's adapter state
(``LevelAdapter.state_dict`` / ``load_state_dict``).
"""
from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dgtsv
from scipy.special import ndtr

from .quant import codebooks as cb
from .quant.common import check_bucket_size, to_host

ADAPTIVE_QUANTIZERS = ("alq", "amq", "alq_n", "amq_n")
# Per-bucket sums, stored field-major: [count | sum r | sum r^2 | norm], each num_buckets long.
STAT_FIELDS = ("count", "sum_r", "sum_r2", "norm")
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
_SOLVE_ITERS = 100
_CD_XTOL = 1e-9          # coordinate descent solves each level to this fraction of its bracket
_GRID_POINTS = 513       # uniform part of the grid for the starting quantiles
_AMQ_GRID_STEP = 0.0125  # AMQ's grid of p: this step, and ...
_AMQ_GRID_RATIO = 1.2    # ... this ratio (for small p), between the bounds
# exp(-t^2/2) underflows (and t^2 may overflow) far out in a component's tail: harmless zeros.
_QUIET = {"under": "ignore", "over": "ignore"}


# --------------------------------------------------------------------------------------------
# Sufficient statistics

def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):                  # torch tensor, any device
        v = v.detach().reshape(-1).float().cpu().numpy()
    return np.asarray(to_host(v)).reshape(-1)


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
#
# Every integral over an interval [a, b] comes from three numbers per end point and component:
# t = (x - mu) / sigma, the smaller normal tail s = Phi(-|t|) and phi(t) (TruncatedNormalMixture._at).
# Neighbouring intervals share an end point, so a set of K levels costs K evaluations of ndtr per
# component (ndtr is the costliest call here).

def _phi(t):
    return _INV_SQRT_2PI * np.exp(-0.5 * t * t)


def _interval_terms(a, b):
    """Standard-unit integrals over [ta, tb] per component, from the end points' (t, s, phi):
    mass Phi(tb) - Phi(ta), int (t - ta) phi, int (tb - t) phi and int (tb - t)(t - ta) phi.

    The mass comes from the tail that keeps relative precision: the upper tails when ta > 0
    (then tb > 0 too), else the lower ones.
    """
    ta, sa, pa = a
    tb, sb, pb = b
    mass = np.where(ta > 0, sa - sb, np.where(tb > 0, 1.0 - sb, sb) - sa)
    dphi = pa - pb
    left = dphi - ta * mass
    right = tb * mass - dphi
    variance = tb * pa - ta * pb - (1.0 + ta * tb) * mass
    return mass, left, right, variance


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
        with np.errstate(**_QUIET):
            minus_one = self._at(-1.0)
            z = _interval_terms(minus_one, self._at(1.0))[0]
        self._coef = self.weight / z
        # An integral of f times a degree-n polynomial in r is sigma^n times its standard-unit
        # value: weights of the masses (_coef), first moments and variance integrals; the pdf
        # itself is phi(t) / sigma.
        self._w_moment = self._coef * self.sigma
        self._w_var = self._coef * self.sigma ** 2
        self._w_pdf = self._coef / self.sigma
        t, s, _ = minus_one
        self._lower_minus_one = np.where(t > 0, 1.0 - s, s)  # Phi((-1 - mu) / sigma)

    def _at(self, x):
        """(t, s, phi) of the points x for every component: arrays of shape x.shape + (C,)."""
        t = (np.asarray(x, dtype=np.float64)[..., None] - self.mu) / self.sigma
        return t, ndtr(-np.abs(t)), _phi(t)

    def _terms(self, a, b):
        return _interval_terms(self._at(a), self._at(b))

    def mass(self, a, b):
        """int_a^b f(r) dr."""
        with np.errstate(**_QUIET):
            return self._terms(a, b)[0] @ self._coef

    def cdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        return self.mass(np.full_like(x, -1.0), np.clip(x, -1.0, 1.0))

    def pdf(self, x):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(**_QUIET):
            t = (x[..., None] - self.mu) / self.sigma
            return np.where((x >= -1.0) & (x <= 1.0), _phi(t) @ self._w_pdf, 0.0)

    def left_moment(self, a, b):
        """int_a^b (r - a) f(r) dr  (= dPsi/db of the interval [a, b])."""
        with np.errstate(**_QUIET):
            return self._terms(a, b)[1] @ self._w_moment

    def right_moment(self, a, b):
        """int_a^b (b - r) f(r) dr  (= -dPsi/da of the interval [a, b])."""
        with np.errstate(**_QUIET):
            return self._terms(a, b)[2] @ self._w_moment

    def interval_variance(self, a, b):
        """int_a^b (b - r)(r - a) f(r) dr: the stochastic-rounding variance collected on [a, b].

        In standard units t = (r - mu)/sigma the integral of (tb - t)(t - ta) phi(t) is
        tb phi(ta) - ta phi(tb) - (1 + ta tb)(Phi(tb) - Phi(ta)).
        """
        with np.errstate(**_QUIET):
            # Rounding can leave a tiny negative on a vanishing interval; the true value is >= 0.
            return np.maximum(self._terms(a, b)[3] @ self._w_var, 0.0)

    def ppf(self, q):
        """F^-1(q), by safeguarded Newton on the closed-form CDF (from the nearer end, for precision)."""
        with np.errstate(**_QUIET):
            return self._quantiles(q)

    def _quantiles(self, q, x0=None):
        """ppf(q), the root search starting at x0 (default: 0)."""
        q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
        flat_q = q.ravel()
        minus_one, plus_one = self._at(-1.0), self._at(1.0)

        def excess(x, i):  # increasing in x; zero at the quantile. Returns (excess, its slope f(x)).
            point = self._at(x)
            below = _interval_terms(minus_one, point)[0] @ self._coef
            above = _interval_terms(point, plus_one)[0] @ self._coef
            q_i = flat_q[i]
            return np.where(q_i <= 0.5, below - q_i, (1.0 - q_i) - above), point[2] @ self._w_pdf
        return _solve_increasing(excess, np.full_like(q, -1.0), np.ones_like(q), x0)

    def _grid_integrals(self, grid_points: int = _GRID_POINTS, points_per_component: int = 33):
        """A grid on [-1, 1] refined to sigma/2 within 8 sigma of each component, and the
        cumulative trapezoid integrals of f and of sqrt(f) on it. The refinement is rounded to
        multiples of a quarter of the smallest sigma, so components that nearly coincide (the
        usual case for gradient buckets) share their points."""
        h = 0.25 * self.sigma.min()
        around = self.mu[:, None] + self.sigma[:, None] * np.linspace(-8.0, 8.0, points_per_component)
        grid = np.unique(np.concatenate([np.linspace(-1.0, 1.0, grid_points),
                                         np.clip(np.round(around.ravel() / h) * h, -1.0, 1.0)]))
        f = self.pdf(grid)
        h = 0.5 * np.diff(grid)
        root = np.sqrt(f)
        cum_f = np.concatenate([[0.0], np.cumsum(h * (f[1:] + f[:-1]))])
        cum_root = np.concatenate([[0.0], np.cumsum(h * (root[1:] + root[:-1]))])
        return grid, cum_f, cum_root

    def sqrt_density_quantiles(self, q, grid_points: int = _GRID_POINTS, points_per_component: int = 33):
        """Quantiles of the density proportional to sqrt(f), on a grid refined around each
        component. Many levels minimise Psi when their local density is proportional to
        sqrt(f) (an interval of width w costs about f w^3 / 6), so this is a near-optimal start.
        """
        grid, _, cum = self._grid_integrals(grid_points, points_per_component)
        return np.interp(np.asarray(q, dtype=np.float64) * cum[-1], cum, grid)


def _solve_increasing(fn, lo, hi, x0=None, iters: int = _SOLVE_ITERS, xtol=4e-16):
    """Elementwise root of a non-decreasing function on [lo, hi] (fn(lo) <= 0 <= fn(hi) assumed).

    ``fn(x, i)`` returns the value and the derivative at the points x (1-d) of the elements
    ``i`` (an index into the flattened shape; a slice while all are active). Newton steps are
    kept inside a shrinking bracket and replaced by bisection whenever they would leave it (or
    the derivative is not positive): bisection's robustness, Newton's speed. An element is done
    once its next step would move it by at most ``xtol``, and only the others are evaluated again.
    Returns the last point evaluated for each element (at most ``iters`` evaluations).
    """
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if lo.shape != hi.shape:
        lo, hi = np.broadcast_arrays(lo, hi)
    shape = lo.shape
    if lo.size == 0:
        return np.zeros(shape)
    lo, hi = lo.ravel(), hi.ravel()
    x = 0.5 * (lo + hi) if x0 is None else np.minimum(np.maximum(np.ravel(x0), lo), hi)
    xtol = np.ravel(xtol) if np.ndim(xtol) else np.full(lo.size, float(xtol))
    out = x.copy()
    i = slice(None)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(iters - 1):
            value, slope = fn(x, i)
            out[i] = x
            below = value < 0
            lo = np.where(below, x, lo)
            hi = np.where(below, hi, x)
            x_new = x - value / slope
            ok = (slope > 0) & (x_new >= lo) & (x_new <= hi)  # NaN and inf fail these too
            if not ok.all():
                x_new = np.where(ok, x_new, np.where(value == 0, x, 0.5 * (lo + hi)))
            going = np.abs(x_new - x) > xtol
            if not going.all():
                if not going.any():
                    return out.reshape(shape)
                i = np.arange(out.size)[i][going]
                x_new, lo, hi, xtol = x_new[going], lo[going], hi[going], xtol[going]
            x = x_new
        fn(x, i)
        out[i] = x
    return out.reshape(shape)


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

def _objective(levels: np.ndarray, density: TruncatedNormalMixture):
    """Psi, dPsi/dl, f(l) and the interval masses, for sorted level arrays of shape (..., K).

    Psi's Hessian is tridiagonal: d2Psi/dl_j^2 = (l_{j+1} - l_{j-1}) f(l_j) and
    d2Psi/dl_j dl_{j+1} = -mass(l_j, l_{j+1}).
    """
    t, s, ph = density._at(levels)
    mass, left, right, variance = _interval_terms((t[..., :-1, :], s[..., :-1, :], ph[..., :-1, :]),
                                                  (t[..., 1:, :], s[..., 1:, :], ph[..., 1:, :]))
    # Rounding can leave a tiny negative on a vanishing interval; the true value is >= 0.
    value = np.maximum(variance @ density._w_var, 0.0).sum(-1)
    grad = np.zeros(levels.shape)
    grad[..., 1:] = left @ density._w_moment
    grad[..., :-1] -= right @ density._w_moment
    return value, grad, ph @ density._w_pdf, mass @ density._coef


def psi(levels, density: TruncatedNormalMixture) -> float:
    """Expected per-coordinate variance of stochastic rounding to ``levels`` under ``density``."""
    with np.errstate(**_QUIET):
        return float(_objective(np.asarray(levels, dtype=np.float64), density)[0])


def psi_gradient(levels, density: TruncatedNormalMixture) -> np.ndarray:
    """dPsi/dl_j for every level (the endpoints' entries included)."""
    with np.errstate(**_QUIET):
        return _objective(np.asarray(levels, dtype=np.float64), density)[1]


def alq_level_update(a, b, current, density: TruncatedNormalMixture) -> np.ndarray:
    """The level in [a, b] that minimises Psi with its neighbours a, b fixed (elementwise).

    Psi restricted to one level is convex (its second derivative is (b - a) f), and its
    stationary point solves  mass(x, b) = int_a^b (r - a) f dr / (b - a),  i.e. the paper's
    x = F^-1(F(b) - int_a^b (r - a) f dr / (b - a)). Where [a, b] holds no mass any x is optimal:
    keep the current level.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(**_QUIET):
        return _level_update(a, b, density._at(a), density._at(b), current, density)[0]


def _level_update(a, b, point_a, point_b, current, density: TruncatedNormalMixture, cdf_table=None,
                  xtol=4e-16):
    """alq_level_update given the points (t, s, phi) of a and b; returns x and its point.

    The root search starts from ``current``, or with ``cdf_table`` = (F on a grid, the grid)
    from the table's inverse at the target F(x) = F(b) - int_a^b (r - a) f dr / (b - a).
    """
    current = np.asarray(current, dtype=np.float64)
    (ta, sa, pa), (tb, sb, pb) = point_a, point_b
    lower_b = np.where(tb > 0, 1.0 - sb, sb)  # Phi(tb)
    mass = np.where(ta > 0, sa - sb, lower_b - sa)  # as in _interval_terms
    target = ((pa - pb - ta * mass) @ density._w_moment) / np.maximum(b - a, np.finfo(np.float64).tiny)
    x0 = current
    if cdf_table is not None:
        x0 = np.interp((lower_b - density._lower_minus_one) @ density._coef - target, *cdf_table)
    # Where target - mass(x, b) keeps one sign on [a, b] (rounding on a vanishing interval), the
    # root is an end: starting there closes the bracket at once instead of bisecting to it.
    mass_ab = mass @ density._coef
    x0 = np.where(target <= 0, b, np.where(target >= mass_ab, a, x0))
    c = density.mu.size
    target_i, sb_i, lower_b_i = target.ravel(), sb.reshape(-1, c), lower_b.reshape(-1, c)
    point = [np.empty((target.size, c)) for _ in range(3)]  # of the last x evaluated

    def excess(x, i):  # target - mass(x, b) and its derivative f(x)
        t, s, ph = density._at(x)
        point[0][i], point[1][i], point[2][i] = t, s, ph
        mass_xb = np.where(t > 0, s - sb_i[i], lower_b_i[i] - s) @ density._coef
        return target_i[i] - mass_xb, ph @ density._w_pdf
    x = _solve_increasing(excess, a, b, x0, xtol=xtol)
    point = tuple(p.reshape(target.shape + (c,)) for p in point)
    empty = mass_ab <= 1e-300
    if np.any(empty):
        x = np.where(empty, current, x)
        point = density._at(x)
    return x, point


def newton_polish(levels, density: TruncatedNormalMixture, iters: int = 50) -> tuple[np.ndarray, float]:
    """Refine levels by damped Newton steps on all inner levels at once; returns (levels, Psi).

    Coordinate descent converges linearly, slower the more levels there are (at 8 bits, 30
    sweeps leave Psi tens of percent above its minimum). Psi's Hessian H is tridiagonal (see
    _objective), so a Newton step costs O(K). Where H is not positive definite (levels in a dip
    of f) or the step overshoots, the step solves (H + lam diag(H)) step = -grad instead
    (Levenberg-Marquardt): lam grows tenfold after a failed step, towards scaled gradient
    descent, and shrinks after a success, back to Newton. Only steps that keep the levels
    ordered and decrease Psi are taken. Stops once a Newton step would lower Psi by less than
    1e-13 of it (rounding), or after ``iters`` attempts.
    """
    lv = np.array(levels, dtype=np.float64)
    with np.errstate(**_QUIET):
        value, grad, pdf, mass = _objective(lv, density)
        if lv.size < 3:
            return lv, float(value)
        lam = 0.0
        for _ in range(iters):
            g = grad[1:-1]
            off = -mass[1:-1]
            *_, step, info = dgtsv(off, (1.0 + lam) * (lv[2:] - lv[:-2]) * pdf[1:-1], off, -g)
            decrease = -(g @ step)  # first-order prediction; negative or NaN: no descent direction
            if lam < 1e-3 and 0.0 <= decrease <= 1e-13 * value:
                break  # converged: a (near-)Newton step would not lower Psi beyond its rounding
            accepted = False
            if info == 0 and decrease > 0 and np.all(np.isfinite(step)):
                trial = lv.copy()
                trial[1:-1] += step
                if np.all(trial[1:] > trial[:-1]):
                    evaluation = _objective(trial, density)
                    accepted = evaluation[0] < value
            if accepted:
                lv, (value, grad, pdf, mass) = trial, evaluation
                lam = 0.1 * lam if lam > 1e-6 else 0.0
            else:
                lam = max(10.0 * lam, 1e-4)
                if lam > 1e12:
                    break
    return lv, float(value)


def fit_alq(density: TruncatedNormalMixture, bits: int, sweeps: int = 10,
            polish: bool = True) -> tuple[np.ndarray, float]:
    """ALQ levels (float64, K = 2^bits, endpoints -1 and +1) and their Psi.

    From each start: ``sweeps`` coordinate-descent sweeps with the closed-form one-level update,
    then (``polish``) damped Newton steps; the start that ends lowest wins. The starts sweep
    together, as rows of one array, and each level's root search begins at the inverse of a
    tabulated CDF, which the Newton iteration then corrects.
    """
    k = 2 ** bits
    if k == 2:
        lv = np.array([-1.0, 1.0])
        return lv, psi(lv, density)
    q = np.arange(1, k - 1) / (k - 1)
    with np.errstate(**_QUIET):
        grid, cum_f, cum_root = density._grid_integrals()
        equal_mass = density._quantiles(q, np.interp(q * cum_f[-1], cum_f, grid))  # ppf(q)
        root_quantiles = np.interp(q * cum_root[-1], cum_root, grid)  # sqrt_density_quantiles(q)
        starts = np.array([
            np.concatenate([[-1.0], equal_mass, [1.0]]),                     # equal-mass quantiles
            np.linspace(-1.0, 1.0, k),                                       # uniform
            cb.default_adaptive_codebook(bits).astype(np.float64),           # exponential, p = 1/2
            np.concatenate([[-1.0], root_quantiles, [1.0]]),                 # sqrt(f) quantiles
        ])
        lv = np.sort(starts, axis=1)
        lv[:, 0], lv[:, -1] = -1.0, 1.0
        # Levels of one parity have neighbours only of the other parity, so updating all odd
        # (then all even) inner levels at once is exactly a sequential coordinate sweep in that
        # order. The points (t, s, phi) of every level are kept, so an update evaluates only its own.
        point = density._at(lv)
        table = (cum_f / cum_f[-1], grid)
        for _ in range(sweeps):
            before = lv.copy()
            for first in (1, 2):
                x, a, b = slice(first, k - 1, 2), slice(first - 1, k - 2, 2), slice(first + 1, k, 2)
                lv[:, x], new_point = _level_update(
                    lv[:, a], lv[:, b], [p[:, a] for p in point], [p[:, b] for p in point], lv[:, x], density,
                    table, xtol=_CD_XTOL * (lv[:, b] - lv[:, a]))
                for p, new in zip(point, new_point):
                    p[:, x] = new
            if np.all(np.abs(lv - before) <= 1e-8 * np.abs(lv)):
                break
    best, best_psi = None, np.inf
    for row in lv:
        row, value = newton_polish(row, density) if polish else (row, psi(row, density))
        if value < best_psi:  # strict: ties keep the earlier start, deterministically
            best, best_psi = row, value
    return best, best_psi


def amq_levels(p: float, bits: int) -> np.ndarray:
    """+-p^j for j = 0 .. 2^(bits-1) - 1, sorted (2^bits levels, float64)."""
    mags = float(p) ** np.arange(2 ** (bits - 1) - 1, -1, -1, dtype=np.float64)
    return np.concatenate([-mags[::-1], mags])


def _amq_objective(p, density: TruncatedNormalMixture, bits: int):
    """Psi, dPsi/dp and d2Psi/dp2 of the levels +-p^j, for every p of a 1-d array.

    Chain rule through dl/dp = +-j p^(j-1) and Psi's tridiagonal Hessian in the levels
    (see _objective); the endpoints +-1 do not move.
    """
    j = np.arange(2 ** (bits - 1) - 1, -1, -1, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)[:, None]

    def both_signs(m):
        return np.concatenate([-m[:, ::-1], m], axis=1)
    levels = both_signs(p ** j)
    dl = both_signs(j * p ** np.maximum(j - 1, 0))
    d2l = both_signs(j * (j - 1) * p ** np.maximum(j - 2, 0))
    value, grad, pdf, mass = _objective(levels, density)
    curvature = (levels[:, 2:] - levels[:, :-2]) * pdf[:, 1:-1] * dl[:, 1:-1] ** 2
    hessian = curvature.sum(-1) - 2.0 * (mass * dl[:, :-1] * dl[:, 1:]).sum(-1)
    return value, (grad * dl).sum(-1), hessian + (grad * d2l).sum(-1)


def amq_psi_derivative(p: float, density: TruncatedNormalMixture, bits: int) -> float:
    """dPsi/dp for the levels +-p^j (chain rule through dl/dp = +-j p^(j-1))."""
    with np.errstate(**_QUIET):
        return float(_amq_objective([p], density, bits)[1][0])


def amq_p_bounds(bits: int) -> tuple[float, float]:
    """p stays in (0, 1): low enough that p^(2^(b-1)-1) stays a normal float32, high enough
    that neighbouring levels stay distinct in float32."""
    s = 2 ** (bits - 1) - 1
    return max(1e-3, 1e-30 ** (1.0 / max(s, 1))), 1.0 - 1e-6


DEFAULT_AMQ_STARTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fit_amq(density: TruncatedNormalMixture, bits: int, previous_p: float | None = None,
            starts=DEFAULT_AMQ_STARTS, steps: int = 40) -> tuple[float, float]:
    """The multiplier p of AMQ's levels +-p^j and its Psi.

    Psi and dPsi/dp are evaluated at once on a grid of p: the starts, the previous p, steps of
    _AMQ_GRID_STEP and ratios of _AMQ_GRID_RATIO between the bounds, and the p that put a level
    on a point mass (below). Between neighbouring grid points where dPsi/dp turns from negative
    to positive lies a local minimum; safeguarded Newton on dPsi/dp = 0 (analytic second
    derivative, at most ``steps`` evaluations) finds it, all brackets together. The lowest Psi
    among grid points and minima wins.
    """
    lo, hi = amq_p_bounds(bits)
    points = [*starts, *([previous_p] if previous_p is not None else []),
              *np.linspace(lo, hi, 1 + int(np.ceil((hi - lo) / _AMQ_GRID_STEP))),
              *np.geomspace(lo, hi, 1 + int(np.ceil(np.log(hi / lo) / np.log(_AMQ_GRID_RATIO))))]
    # A component much narrower than its distance from 0 (a constant bucket) is a point mass at
    # |mu|: Psi(p) dips sharply where a level p^j sits on it, too narrowly for the grid. Add
    # those p for the heaviest few such masses.
    narrow = density.sigma < 1e-3 * np.abs(density.mu)
    if narrow.any():
        at, which = np.unique(np.abs(density.mu[narrow]), return_inverse=True)
        heaviest = at[np.argsort(-np.bincount(which, density.weight[narrow]), kind="stable")[:4]]
        points.extend((heaviest[:, None] ** (1.0 / np.arange(1, 2 ** (bits - 1)))).ravel())
    grid = np.unique(np.clip(np.asarray(points, dtype=np.float64), lo, hi))
    with np.errstate(**_QUIET):
        # In blocks of p, to bound the memory of the (p, level, component) arrays.
        block = max(1, 2 ** 18 // (2 ** bits * density.mu.size))
        value, slope = (np.concatenate(v) for v in zip(*(
            _amq_objective(grid[n:n + block], density, bits)[:2] for n in range(0, grid.size, block))))
        i = np.flatnonzero((slope[:-1] < 0) & (slope[1:] > 0))
        if i.size:
            found = np.empty(i.size)  # Psi at the last p evaluated in each bracket

            def derivatives(p, j):
                found[j], first, second = _amq_objective(p, density, bits)
                return first, second
            x0 = np.where(value[i] <= value[i + 1], grid[i], grid[i + 1])
            grid = np.concatenate([grid, _solve_increasing(derivatives, grid[i], grid[i + 1], x0, steps)])
            value = np.concatenate([value, found])
    best = int(np.argmin(value))  # the first of equal values: deterministic
    return float(grid[best]), float(value[best])


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
            adapter.update(s, step=step)                   # identical codebook everywhere
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
        self.bucket_size = check_bucket_size(bucket_size)
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

    def update(self, summed_stats: np.ndarray, *, step: int | None = None) -> np.ndarray:
        """Fit the density to the allreduced statistics and set the new codebook (float32).

        Statistics with no usable bucket (all-zero or non-finite gradients) keep the current
        codebook. The fit only uses ratios of the sums, so an allreduce average gives the same
        codebook as a sum. ``step`` is recorded as ``last_update_step`` (default: the step
        :meth:`due` last said yes to).
        """
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
