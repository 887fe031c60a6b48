"""ALQ / AMQ adaptive levels: closed forms against numerics, the adapter's contract."""
import warnings

import numpy as np
import pytest
from scipy import integrate, optimize
from scipy.stats import truncnorm

import hvd_qadam
from hvd_qadam import adaptive as ad
from hvd_qadam.quant import codebooks as cb


def _mixture():
    """An asymmetric two-component density: a narrow peak and a wider shoulder."""
    return ad.TruncatedNormalMixture([0.01, -0.03], [0.02, 0.12], [3.0, 1.0])


def _sample(density, n, seed):
    """n draws from a truncated-normal mixture (fixed seed)."""
    rng = np.random.default_rng(seed)
    comp = rng.choice(density.mu.size, size=n, p=density.weight)
    out = np.empty(n)
    for c in range(density.mu.size):
        sel = comp == c
        mu, sd = density.mu[c], density.sigma[c]
        out[sel] = truncnorm.rvs((-1 - mu) / sd, (1 - mu) / sd, loc=mu, scale=sd, size=int(sel.sum()),
                                 random_state=rng)
    return out


def _gradient_like(n, seed, scale=1.0):
    """A heavy-tailed vector whose bucket norms vary, like a real gradient."""
    rng = np.random.default_rng(seed)
    envelope = np.exp(np.linspace(0, 3, n))
    return (scale * envelope * rng.standard_t(4, size=n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The density's closed forms

def test_mixture_cdf_pdf_ppf_match_scipy_truncnorm():
    d = _mixture()
    xs = np.linspace(-1, 1, 41)
    ref_cdf = sum(w * truncnorm.cdf(xs, (-1 - m) / s, (1 - m) / s, loc=m, scale=s)
                  for m, s, w in zip(d.mu, d.sigma, d.weight))
    ref_pdf = sum(w * truncnorm.pdf(xs, (-1 - m) / s, (1 - m) / s, loc=m, scale=s)
                  for m, s, w in zip(d.mu, d.sigma, d.weight))
    np.testing.assert_allclose(d.cdf(xs), ref_cdf, atol=1e-14)
    np.testing.assert_allclose(d.pdf(xs), ref_pdf, rtol=1e-12, atol=1e-14)
    q = np.array([1e-9, 0.01, 0.3, 0.5, 0.77, 0.999, 1 - 1e-9])
    np.testing.assert_allclose(d.cdf(d.ppf(q)), q, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("a,b", [(-1.0, 1.0), (-0.05, 0.2), (0.001, 0.004), (0.3, 0.9), (-1.0, -0.2)])
def test_partial_integrals_match_quadrature(a, b):
    d = _mixture()
    f = d.pdf
    pts = [p for p in (*d.mu, 0.0) if a < p < b]
    quad = lambda g: integrate.quad(g, a, b, points=pts or None, epsabs=1e-15, epsrel=1e-11, limit=200)[0]
    A, B = np.array(a), np.array(b)
    assert d.mass(A, B) == pytest.approx(quad(f), rel=1e-9, abs=1e-15)
    assert d.left_moment(A, B) == pytest.approx(quad(lambda r: (r - a) * f(r)), rel=1e-9, abs=1e-15)
    assert d.right_moment(A, B) == pytest.approx(quad(lambda r: (b - r) * f(r)), rel=1e-9, abs=1e-15)
    assert d.interval_variance(A, B) == pytest.approx(quad(lambda r: (b - r) * (r - a) * f(r)),
                                                      rel=1e-8, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# ALQ / AMQ optimisation steps

@pytest.mark.parametrize("a,b", [(-1.0, 1.0), (-1.0, 0.05), (-0.02, 0.3), (0.005, 1.0), (-0.4, -0.01)])
def test_alq_closed_form_step_is_the_minimiser(a, b):
    d = _mixture()
    x = float(ad.alq_level_update(np.array([a]), np.array([b]), np.array([0.5 * (a + b)]), d)[0])
    numeric = optimize.minimize_scalar(lambda t: ad.psi([a, t, b], d), bounds=(a, b), method="bounded",
                                       options={"xatol": 1e-12})
    assert x == pytest.approx(numeric.x, abs=1e-6)
    assert ad.psi([a, x, b], d) <= numeric.fun * (1 + 1e-12)
    # ... and it is the paper's formula l = F^-1(F(b) - int_a^b (r - a) f dr / (b - a)).
    paper = d.ppf(d.cdf(b) - d.left_moment(np.array(a), np.array(b)) / (b - a))
    assert x == pytest.approx(float(paper), abs=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("p", [0.15, 0.4, 0.7, 0.9])
def test_amq_analytic_gradient_matches_central_difference(bits, p):
    d = _mixture()
    h = 1e-6
    fd = (ad.psi(ad.amq_levels(p + h, bits), d) - ad.psi(ad.amq_levels(p - h, bits), d)) / (2 * h)
    assert ad.amq_psi_derivative(p, d, bits) == pytest.approx(fd, rel=1e-5, abs=1e-11)


def test_psi_gradient_matches_central_difference():
    d = _mixture()
    levels = np.array([-1.0, -0.2, -0.03, 0.0, 0.01, 0.05, 0.4, 1.0])
    g = ad.psi_gradient(levels, d)
    h = 1e-7
    for j in range(levels.size):
        up, down = levels.copy(), levels.copy()
        up[j] += h
        down[j] -= h
        fd = (ad.psi(up, d) - ad.psi(down, d)) / (2 * h)
        assert g[j] == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_psi_matches_monte_carlo_variance_of_the_quantizer():
    """Draw r from the fitted density, quantize at scale 1 with hvd_qadam, compare with Psi."""
    vectors = [_gradient_like(20000, seed) for seed in (1, 2)]
    stats = ad.bucket_statistics(vectors, 512)
    density = ad.fit_mixture(stats, num_top_buckets=20)
    levels, _ = ad.fit_alq(density, 3)
    codebook = ad.to_codebook(levels, 3)
    predicted = ad.psi(codebook, density)

    r = _sample(density, 1_000_000, seed=7)
    # Buckets of m samples plus one pad coordinate that makes each bucket's L2 norm exactly 1,
    # so the quantizer's scale is 1 and its normalised coordinates are the samples themselves.
    m = int(min(4096, 0.5 / np.mean(r ** 2)))
    nb = r.size // m
    body = r[:nb * m].reshape(nb, m)
    pad = np.sqrt(1.0 - (body ** 2).sum(1))
    assert np.all(np.isfinite(pad))
    x = np.concatenate([body, pad[:, None]], axis=1).astype(np.float32)
    errors = []
    for seed in (11, 12, 13):
        payload = hvd_qadam.quantize(x.ravel(), "alq", 3, m + 1, seed=seed, codebook=codebook, backend="numpy")
        y = hvd_qadam.dequantize(payload, backend="numpy")
        errors.append(((y.reshape(nb, m + 1).astype(np.float64) - x)[:, :m] ** 2).ravel())
    # Coordinates are independent draws of r; the seeds re-round the same r, so the i.i.d. unit
    # for the CLT is a coordinate's error averaged over the seeds.
    per_coordinate = np.mean(errors, axis=0)
    bound = 5 * per_coordinate.std() / np.sqrt(per_coordinate.size)
    assert abs(per_coordinate.mean() - predicted) < bound, (per_coordinate.mean(), predicted, bound)
    assert bound < 0.05 * predicted  # the test has teeth


# ---------------------------------------------------------------------------------------------
# The fitted levels

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_adapted_levels_beat_fixed_grids_on_a_peaked_density(bits):
    d = ad.TruncatedNormalMixture([0.002, -0.001, 0.0], [0.01, 0.02, 0.005], [1.0, 0.5, 2.0])
    alq_levels, alq_psi = ad.fit_alq(d, bits)
    p, amq_psi = ad.fit_amq(d, bits)
    uniform = ad.psi(np.linspace(-1, 1, 2 ** bits), d)
    exp_half = ad.psi(cb.default_adaptive_codebook(bits), d)   # NUQSGD-style +-2^-j, no zero
    nuq = ad.psi(cb.codebook("nuq", bits), d)                   # NUQSGD proper, with zero
    qsgd = ad.psi(cb.codebook("qsgd", bits), d)
    for fixed in (uniform, exp_half, nuq, qsgd):
        assert alq_psi < fixed
        assert amq_psi < fixed
    assert alq_psi <= amq_psi * (1 + 1e-9)  # ALQ's family contains AMQ's
    assert alq_psi == pytest.approx(ad.psi(alq_levels, d))
    if bits >= 3:  # the learned inner levels sit much closer to zero than NUQSGD's
        assert p < 0.5
        assert np.max(np.abs(alq_levels[1:-1])) < 0.5 * np.max(np.abs(cb.default_adaptive_codebook(bits)[1:-1]))


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_alq_levels_are_stationary_points_of_psi(bits):
    d = _mixture()
    levels, value = ad.fit_alq(d, bits)
    grad = ad.psi_gradient(levels, d)[1:-1]
    # Zero up to rounding: a level moved by 1e-3 would show a gradient of order 1e-3 * Psi.
    assert np.max(np.abs(grad)) < 1e-6 * value
    # Coordinate descent alone converges slowly with many levels; the Newton polish finishes it.
    _, cd_only = ad.fit_alq(d, bits, sweeps=30, polish=False)
    assert value <= cd_only * (1 + 1e-9)


def _alq_starts(density, bits):
    """fit_alq's starts: equal-mass quantiles, uniform, +-2^-j, sqrt(f) quantiles."""
    k = 2 ** bits
    q = np.arange(1, k - 1) / (k - 1)
    return [np.concatenate([[-1.0], density.ppf(q), [1.0]]), np.linspace(-1.0, 1.0, k),
            cb.default_adaptive_codebook(bits).astype(np.float64),
            np.concatenate([[-1.0], density.sqrt_density_quantiles(q), [1.0]])]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_vectorised_coordinate_descent_is_the_sequential_sweep(bits):
    """fit_alq sweeps all starts at once, reusing each level's normal cdf/pdf; without the
    polish it must end where level-by-level sweeps with alq_level_update end."""
    d = ad.TruncatedNormalMixture([0.3, -0.02, -0.4], [0.02, 0.3, 0.05], [1.0, 5.0, 2.0])
    reference = np.inf
    for lv in _alq_starts(d, bits):
        lv = np.sort(lv)
        for _ in range(10):
            for j in [*range(1, lv.size - 1, 2), *range(2, lv.size - 1, 2)]:
                lv[j] = ad.alq_level_update(lv[j - 1:j], lv[j + 1:j + 2], lv[j:j + 1], d)[0]
        reference = min(reference, ad.psi(lv, d))
    _, value = ad.fit_alq(d, bits, polish=False)
    assert value == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_newton_polish_reaches_a_stationary_point_from_every_start(bits):
    """Levels in a dip of f make Psi's Hessian indefinite; the damped steps still converge."""
    d = ad.TruncatedNormalMixture([0.3, -0.02, -0.4], [0.02, 0.3, 0.05], [1.0, 5.0, 2.0])
    for start in _alq_starts(d, bits):
        if not np.all(np.diff(start) > 0):
            continue
        levels, value = ad.newton_polish(start, d)
        assert value <= ad.psi(start, d) and value == pytest.approx(ad.psi(levels, d), rel=1e-12)
        assert np.all(np.diff(levels) > 0) and levels[0] == -1.0 and levels[-1] == 1.0
        assert np.max(np.abs(ad.psi_gradient(levels, d)[1:-1])) < 1e-5 * value


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("which", ["two components", "gradient buckets"])
def test_amq_beats_a_dense_grid_of_p(bits, which):
    if which == "two components":
        d = _mixture()
    else:
        d = ad.fit_mixture(ad.bucket_statistics([_gradient_like(30000, 5), _gradient_like(5000, 6)], 512))
    lo, hi = ad.amq_p_bounds(bits)
    grid = np.unique(np.concatenate([np.linspace(lo, hi, 1001), np.geomspace(lo, hi, 201)]))
    best_on_grid = min(ad.psi(ad.amq_levels(p, bits), d) for p in grid)
    for previous in (None, 0.5, hi):
        p, value = ad.fit_amq(d, bits, previous)
        assert lo <= p <= hi
        assert value == pytest.approx(ad.psi(ad.amq_levels(p, bits), d), rel=1e-12)
        assert value <= best_on_grid * (1 + 1e-12)


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_amq_puts_a_level_on_point_masses(bits):
    """Constant buckets are point masses (sigma = min_sigma): Psi(p) then has dips far narrower
    than any grid, where a level p^j sits on a mass; the fit must find them."""
    stats = ad.bucket_statistics([np.full(5000, 0.25, np.float32)], 512)  # masses at 512^-1/2, 392^-1/2
    d = ad.fit_mixture(stats)
    lo, hi = ad.amq_p_bounds(bits)
    on_a_mass = [ad.psi(ad.amq_levels(p, bits), d) for r in np.unique(d.mu)
                 for p in r ** (1.0 / np.arange(1, 2 ** (bits - 1))) if lo <= p <= hi]
    p, value = ad.fit_amq(d, bits, 0.5)
    assert value <= min(on_a_mass) * (1 + 1e-12)


def test_fits_are_deterministic():
    d = ad.fit_mixture(ad.bucket_statistics([_gradient_like(30000, 5)], 512))
    for bits in (3, 8):
        a, b = ad.fit_alq(d, bits), ad.fit_alq(d, bits)
        assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
        assert ad.fit_amq(d, bits, 0.5) == ad.fit_amq(d, bits, 0.5)


def test_alq_keeps_endpoints_and_order():
    for bits in (1, 2, 3, 5, 8):
        levels, value = ad.fit_alq(_mixture(), bits)
        assert levels.size == 2 ** bits and levels[0] == -1.0 and levels[-1] == 1.0
        assert np.all(np.diff(levels) > 0) and np.isfinite(value)
        cb.validate_codebook(ad.to_codebook(levels, bits), bits)


def test_to_codebook_separates_levels_that_collide_in_float32():
    levels = np.array([-1.0, 0.1, 0.1 + 1e-12, 0.1 + 2e-12, 1.0, 1.0, 1.0, 1.0])
    out = ad.to_codebook(levels, 3)
    assert out.dtype == np.float32 and np.all(np.diff(out) > 0) and out[0] >= -1 and out[-1] <= 1
    cb.validate_codebook(out, 3)


# ---------------------------------------------------------------------------------------------
# Statistics

def test_summed_rank_stats_equal_stats_of_the_concatenated_data():
    rank_vectors = [[_gradient_like(3000, 10 + r), _gradient_like(700, 20 + r, 1e-3)] for r in range(2)]
    adapter = ad.LevelAdapter("alq_n", 3, bucket_size=256)
    summed = adapter.local_stats(rank_vectors[0]) + adapter.local_stats(rank_vectors[1])
    assert summed.dtype == np.float64 and summed.size == 4 * (12 + 3)

    # Per bucket: the pooled r of both ranks.
    per_bucket = ad.split_statistics(summed)
    k = 0
    for t in range(2):
        n = rank_vectors[0][t].size
        for start in range(0, n, 256):
            rs = [v[t][start:start + 256].astype(np.float64) for v in rank_vectors]
            r = np.concatenate([x / np.linalg.norm(x) for x in rs])
            assert per_bucket["count"][k] == r.size
            assert per_bucket["mean"][k] == pytest.approx(r.mean(), rel=1e-10, abs=1e-15)
            assert per_bucket["var"][k] == pytest.approx(r.var(), rel=1e-9, abs=1e-15)
            assert per_bucket["norm"][k] == pytest.approx(sum(np.linalg.norm(x) for x in rs), rel=1e-12)
            k += 1
    # Pooled over buckets: same as one rank holding both ranks' vectors.
    concatenated = adapter.local_stats(rank_vectors[0] + rank_vectors[1]).reshape(4, -1).sum(1)
    np.testing.assert_allclose(summed.reshape(4, -1).sum(1), concatenated, rtol=1e-12)
    d_sum, d_cat = ad.fit_pooled(summed), ad.fit_pooled(adapter.local_stats(rank_vectors[0] + rank_vectors[1]))
    assert d_sum.mu[0] == pytest.approx(d_cat.mu[0], rel=1e-10, abs=1e-16)
    assert d_sum.sigma[0] == pytest.approx(d_cat.sigma[0], rel=1e-10)


def test_stats_accept_torch_tensors():
    torch = pytest.importorskip("torch")
    v = _gradient_like(1000, 3)
    adapter = ad.LevelAdapter("alq", 3, bucket_size=128)
    np.testing.assert_array_equal(adapter.local_stats([torch.from_numpy(v)]), adapter.local_stats([v]))


# ---------------------------------------------------------------------------------------------
# The adapter

@pytest.mark.parametrize("quantizer", ad.ADAPTIVE_QUANTIZERS)
def test_same_stats_give_identical_codebook_bytes(quantizer):
    stats = ad.bucket_statistics([_gradient_like(30000, 5), _gradient_like(5000, 6)], 512)
    a = ad.LevelAdapter(quantizer, 3)
    b = ad.LevelAdapter(quantizer, 3)
    ca = a.update(stats)
    cb_ = b.update(stats.copy())
    assert ca.tobytes() == cb_.tobytes()
    assert ca.dtype == np.float32 and ca.size == 8
    cb.validate_codebook(ca, 3)
    # The levels work with the quantizer they were made for.
    x = _gradient_like(4000, 9)
    y = hvd_qadam.dequantize(hvd_qadam.quantize(x, quantizer, 3, 512, seed=1, codebook=a.codebook))
    assert y.shape == x.shape and np.all(np.isfinite(y))


def test_initial_codebooks():
    np.testing.assert_array_equal(ad.LevelAdapter("alq", 3).codebook, cb.default_adaptive_codebook(3))
    amq = ad.LevelAdapter("amq", 4)
    assert amq.p == 0.5
    np.testing.assert_array_equal(amq.codebook, ad.amq_levels(0.5, 4).astype(np.float32))
    with pytest.raises(cb.QuantizerError):
        ad.LevelAdapter("qsgd", 3)


def test_state_dict_round_trip():
    stats1 = ad.bucket_statistics([_gradient_like(20000, 1)], 512)
    stats2 = ad.bucket_statistics([_gradient_like(20000, 2, 0.01)], 512)
    for quantizer in ("alq", "amq"):
        a = ad.LevelAdapter(quantizer, 3)
        assert a.due(0)
        a.update(stats1)
        state = a.state_dict()
        b = ad.LevelAdapter(quantizer, 3)
        b.load_state_dict(state)
        assert b.codebook.tobytes() == a.codebook.tobytes()
        assert (b.p, b.last_update_step, b.update_count) == (a.p, 0, 1)
        # Both continue identically (AMQ restarts from the previous p).
        assert a.update(stats2, step=100).tobytes() == b.update(stats2, step=100).tobytes()
        assert a.state_dict()["last_update_step"] == 100 and b.update_count == 2
    with pytest.raises(ValueError):
        ad.LevelAdapter("alq", 4).load_state_dict(ad.LevelAdapter("alq", 3).state_dict())


@pytest.mark.parametrize("quantizer", ad.ADAPTIVE_QUANTIZERS)
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_degenerate_inputs_give_a_valid_codebook_without_warnings(quantizer, bits):
    cases = {
        "zeros": [np.zeros(5000, np.float32)],
        "constant": [np.full(5000, 0.25, np.float32)],
        "negative constant, short tail bucket": [np.full(1025, -3.0, np.float32)],
        "one element": [np.array([2.0], np.float32)],
        "tiny": [np.full(3000, 1e-38, np.float32) * np.arange(3000, dtype=np.float32)],
        "huge": [np.full(3000, 3e38, np.float32)],
        "one hot": [np.eye(1, 4096, 17, dtype=np.float32).ravel()],
        "with inf and nan": [np.array([np.inf, 1.0] * 600, np.float32), np.array([np.nan] * 10, np.float32)],
        "empty list": [],
    }
    for name, vectors in cases.items():
        adapter = ad.LevelAdapter(quantizer, bits, bucket_size=512)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stats = adapter.local_stats(vectors)
            codebook = adapter.update(stats + stats)
        assert np.all(np.isfinite(codebook)), name
        cb.validate_codebook(codebook, bits)
        assert codebook.size == 2 ** bits, name
    # All-zero statistics keep the current codebook.
    adapter = ad.LevelAdapter(quantizer, bits)
    before = adapter.codebook.copy()
    adapter.update(adapter.local_stats([np.zeros(100, np.float32)]))
    np.testing.assert_array_equal(adapter.codebook, before)
    assert adapter.update_count == 0


def test_schedule():
    adapter = ad.LevelAdapter("alq", 3)  # (0, 100, 2000), then every 10000
    due = [s for s in range(0, 50001) if adapter.due(s)]
    assert due == [0, 100, 2000, 12000, 22000, 32000, 42000]
    never_periodic = ad.LevelAdapter("amq", 3, schedule=(0, 5), every=0)
    assert [s for s in range(100) if never_periodic.due(s)] == [0, 5]
    only_periodic = ad.LevelAdapter("amq", 3, schedule=(), every=7)
    assert [s for s in range(22) if only_periodic.due(s)] == [0, 7, 14, 21]
