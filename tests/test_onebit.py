"""1-bit Adam (algorithm="onebit_adam"): kernels, equivalences, checkpoints and convergence on
simulated ranks (the same code path as MPI ranks), and the ps topology under mpirun."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hvd_qadam
from hvd_qadam import functional as F
from hvd_qadam.algorithms import OnebitAdam
from hvd_qadam.comm import SimWorld
from hvd_qadam.config import DEFAULT_FREEZE_STEP, DEFAULT_V_REFRESH_EVERY, FREEZE_AUTO_NEVER, Config

from harness import digits
from harness.digits import base_optimizer

SIGN = dict(algorithm="onebit_adam", quantizer="sign", downlink_quantizer="sign")


# ---------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("bc,decoupled", [(True, False), (False, False), (True, True)])
def test_frozen_apply_kernel_equals_numpy_and_torch(bc, decoupled, monkeypatch):
    rs = np.random.default_rng(1)
    n = 70_001
    m, x = (rs.standard_normal(n).astype(np.float32) for _ in range(2))
    v = (rs.standard_normal(n).astype(np.float32) ** 2) * np.float32(1e-3)
    v[::7] = 0.0                                                # masked coordinates
    c = F.adam_constants(40, 1e-3, 0.9, 0.999, 1e-8, 0.01 if decoupled else 0.0, decoupled, bc, False)
    ref_m, ref_d = F.frozen_adam_reference(m, v, x, c)
    out = {}
    for path in ("numba", "torch"):
        if path == "torch":
            monkeypatch.setattr(F, "njit", None)                # the CUDA formulas, run on the host
        m_out, d_out = torch.empty(n), torch.empty(n)
        F.frozen_adam_apply(torch.from_numpy(m), torch.from_numpy(v), torch.from_numpy(x), m_out, d_out, c)
        out[path] = (m_out.numpy(), d_out.numpy())
        assert np.array_equal(out[path][0], ref_m), path
        if path == "numba":
            assert np.array_equal(out[path][1], ref_d)
        else:   # torch may divide by a scalar as a multiplication by its reciprocal: an ulp or two
            np.testing.assert_allclose(out[path][1], ref_d, rtol=1e-6, atol=0)
    assert np.all(ref_m[::7] == 0) and np.all(np.isfinite(ref_d))
    assert (ref_d[::7] == 0).all() if not decoupled else np.array_equal(ref_d[::7], (x * c["lr_wd"])[::7])


def test_momentum_kernel_is_adams_first_moment_and_sumsq_is_reproducible():
    rs = np.random.default_rng(2)
    n = 50_000
    g, m, v, x = (torch.from_numpy(rs.standard_normal(n).astype(np.float32)) for _ in range(4))
    c = F.adam_constants(3, 1e-3, 0.9, 0.999, 1e-8, 0.1, False, True, False)
    out, m_ref, v_ref, d_ref = torch.empty(n), torch.empty(n), torch.empty(n), torch.empty(n)
    F.momentum_ema(g, m, x, out, c)
    F.adam_update(g, m, v.abs(), x, m_ref, v_ref, d_ref, c)
    assert torch.equal(out, m_ref)
    a = F.sumsq(g)
    assert a == F.sumsq(g.clone()) and a == pytest.approx(float(g.double().pow(2).sum()), rel=1e-12)


# ---------------------------------------------------------------------------------- configuration
def test_configuration_freeze_step_and_refusals():
    assert Config(algorithm="onebit_adam").warmup_steps == DEFAULT_FREEZE_STEP
    assert Config(algorithm="onebit_adam", freeze_step=7).warmup_steps == 7
    assert Config(algorithm="onebit_adam", freeze_step=7, warmup_steps=7).warmup_steps == 7
    assert Config(algorithm="onebit_adam", freeze_step="auto").warmup_steps == FREEZE_AUTO_NEVER
    assert Config(algorithm="onebit_adam", freeze_step="auto", warmup_steps=50).warmup_steps == 50
    with pytest.raises(ValueError, match="freeze_step must be"):
        Config(algorithm="onebit_adam", freeze_step=0)
    with pytest.raises(ValueError, match="freeze_step must be"):
        Config(algorithm="onebit_adam", freeze_step="sometimes")
    with pytest.raises(ValueError, match="conflicts"):
        Config(algorithm="onebit_adam", freeze_step=10, warmup_steps=5)
    with pytest.raises(ValueError, match="option of algorithm 'onebit_adam'"):
        Config(algorithm="efficient_adam", freeze_step=10)
    assert Config(algorithm="onebit_adam").v_refresh_every == DEFAULT_V_REFRESH_EVERY
    assert Config(algorithm="onebit_adam", v_refresh_every=0).v_refresh_every == 0
    for bad in (-1, 2.5, True, "often"):
        with pytest.raises(ValueError, match="v_refresh_every must be"):
            Config(algorithm="onebit_adam", v_refresh_every=bad)
    with pytest.raises(ValueError, match="v_refresh_every is an option of algorithm 'onebit_adam'"):
        Config(algorithm="qadam", v_refresh_every=50)
    model = digits.make_model()
    with pytest.raises(ValueError, match="amsgrad"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), amsgrad=True), model.named_parameters(),
                                       comm=SimWorld(1).comm(0), algorithm="onebit_adam")
    with pytest.raises(ValueError, match="betas/eps"):
        hvd_qadam.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                       comm=SimWorld(1).comm(0), algorithm="onebit_adam")


# ---------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("down", [dict(downlink_quantizer="sign"), dict(downlink_quantizer="qsgdinf", downlink_bits=4),
                                  dict(downlink_quantizer="none"), dict(downlink_quantizer="sign", v_refresh_every=2)],
                         ids=["sign", "qsgdinf4", "full", "sign-v-refresh"])
def test_sharded_equals_allgather_bit_for_bit(down, sim_train, assert_same_params):
    kw = dict(SIGN, freeze_step=3, bucket_size=64, min_compress_numel=256, **down)
    a = sim_train(3, 7, topology="allgather", **kw)
    s = sim_train(3, 7, topology="sharded", **kw)
    for r in range(3):
        assert_same_params(a[0], a[r], f"allgather rank {r}")
        assert_same_params(a[0], s[r], f"sharded rank {r}")
    # the compressed stage really ran and moved the weights differently from fp32 1-bit Adam
    fp = sim_train(3, 7, algorithm="onebit_adam", quantizer="none", freeze_step=3, min_compress_numel=256)
    assert any(not torch.equal(a[0][n], fp[0][n]) for n in fp[0])


@pytest.mark.parametrize("base,wd", [("adam", 0.0), ("adam", 1e-2), ("adamw", 1e-2)])
def test_uncompressed_before_the_freeze_equals_torch_adam_on_the_mean_gradient(base, wd, assert_same_params):
    steps, world = 12, 3
    cls = torch.optim.AdamW if base == "adamw" else torch.optim.Adam

    def worker(rank, comm):
        mk = lambda m: hvd_qadam.DistributedOptimizer(cls(m.parameters(), lr=2e-3, weight_decay=wd),
                                                      m.named_parameters(), comm=comm, algorithm="onebit_adam",
                                                      quantizer="none", freeze_step=1000)
        model, _ = digits.train(rank, comm.size, mk, epochs=100, max_steps=steps)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    got = hvd_qadam.simulate(world, worker)

    x, y, _, _ = digits.load_digits_split(0)
    model = digits.make_model()
    opt = cls(model.parameters(), lr=2e-3, weight_decay=wd)
    loss_fn = torch.nn.CrossEntropyLoss()
    done = 0
    for epoch in range(100):
        for idx in digits.batches(len(x), 96, epoch, 0):
            grads = []
            for r in range(world):
                i = digits.shard(idx, r, world)
                model.zero_grad()
                loss_fn(model(x[i]), y[i]).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for k, p in enumerate(model.parameters()):
                p.grad = (grads[0][k] + grads[1][k] + grads[2][k]) / 3
            opt.step()
            done += 1
            if done == steps:
                break
        if done == steps:
            break
    for r in range(world):
        assert_same_params(got[0], got[r], f"rank {r}")
    for n, p in model.named_parameters():
        diff = float((got[0][n] - p.detach()).abs().max())
        assert diff <= 2e-6, f"{n}: max |diff| {diff}"


def test_v_refresh_steps_follow_the_written_math():
    """freeze 3, v refreshed every 2 steps: steps 0-2 Adam, 3 frozen, 4 a refresh (v decayed by
    b2^2 for the two steps since its last update), 5 frozen, 6 a refresh, ... With
    quantizer="none" every exchange is exact, so the run must follow this loop on the mean gradient."""
    steps, world, f, k, lr = 10, 3, 3, 2, 2e-3
    b1, b2, eps = 0.9, 0.999, 1e-8

    def worker(rank, comm):
        mk = lambda m: hvd_qadam.DistributedOptimizer(torch.optim.Adam(m.parameters(), lr=lr), m.named_parameters(),
                                                      comm=comm, algorithm="onebit_adam", quantizer="none",
                                                      freeze_step=f, v_refresh_every=k, min_compress_numel=256)
        compressed = []
        model, _ = digits.train(rank, comm.size, mk, epochs=100, max_steps=steps,
                                on_step=lambda s, o: compressed.append(o.communication_stats.compressed))
        return {n: p.detach().clone() for n, p in model.named_parameters()}, compressed
    got = hvd_qadam.simulate(world, worker)
    assert got[0][1] == [False, False, False, True, False, True, False, True, False, True], got[0][1]

    x, y, _, _ = digits.load_digits_split(0)
    model = digits.make_model()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t_v = 0                                       # the step v was last updated at (1-based)
    loss_fn = torch.nn.CrossEntropyLoss()
    idx_iter = (idx for epoch in range(100) for idx in digits.batches(len(x), 96, epoch, 0))
    for s in range(steps):
        idx = next(idx_iter)
        grads = []
        for r in range(world):
            i = digits.shard(idx, r, world)
            model.zero_grad()
            loss_fn(model(x[i]), y[i]).backward()
            grads.append([p.grad.clone() for p in params])
        v_step = s < f or (s + 1 - f) % k == 0     # the warm-up, or a refresh: v moves
        with torch.no_grad():
            for j, p in enumerate(params):
                g = (grads[0][j] + grads[1][j] + grads[2][j]) / 3
                m[j] = b1 * m[j] + (1 - b1) * g
                if v_step:
                    t = s + 1
                    decay = b2 ** (t - t_v)
                    v[j] = decay * v[j] + (1 - decay) * g * g
                    u = (m[j] / (1 - b1 ** t)) / ((v[j] / (1 - b2 ** t)).sqrt() + eps)
                else:                             # frozen: v of its last update, m uncorrected
                    live = v[j] != 0
                    m[j] = torch.where(live, m[j], torch.zeros_like(m[j]))
                    u = torch.where(live, m[j] / ((v[j] / (1 - b2 ** t_v)).sqrt() + eps), torch.zeros_like(m[j]))
                p -= lr * u
        if v_step:
            t_v = s + 1
    for r in range(world):
        for n, p in model.named_parameters():
            diff = float((got[r][0][n] - p.detach()).abs().max())
            assert diff <= 2e-6, f"rank {r}, {n}: max |diff| {diff}"


def test_warmup_is_fp32_then_one_bit_and_momentum_is_replicated():
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, freeze_step=2,
                                             **SIGN)
        sent = []
        digits.train(rank, comm.size, lambda m: opt, epochs=100, max_steps=4,
                     on_step=lambda s, o: sent.append(o.communication_stats.sent_bytes))
        eng = opt.engine
        return sent, {k: v.clone() for k, v in eng.bank.current.items() if k.endswith((".m", ".v"))}, \
            dict(eng.counters["worker_adam_step"])
    res = hvd_qadam.simulate(3, worker)
    sent = res[0][0]
    n = sum(p.numel() for p in digits.make_model().parameters())
    # (sharded at 3 ranks: fp32 both ways, then 1-bit both ways; the 266 bias values stay fp32)
    assert sent[0] == sent[1] > 4 * n and sent[2] == sent[3] < sent[0] / 15, sent
    for _, state, counters in res:
        assert counters == res[0][2] and all(t == 2 for t in counters.values()), counters   # v frozen after 2
        assert state.keys() == res[0][1].keys() and len(state) >= 4
        for k in state:
            assert torch.equal(state[k], res[0][1][k]), f"{k} differs between ranks"


def test_coordinates_without_gradient_do_not_move_after_the_freeze():
    """A parameter that never gets a gradient has v = 0: its 1-bit momentum is +-scale, and lr m / eps
    would fling it; it must stay put (and the step must stay finite)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = digits.make_model()
            self.unused = torch.nn.Parameter(torch.randn(4096, generator=torch.Generator().manual_seed(1)))

        def forward(self, x):
            return self.body(x)

    def worker(rank, comm):
        net = Net()
        before = net.unused.detach().clone()
        opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(net.parameters(), lr=2e-3), net.named_parameters(),
                                             comm=comm, freeze_step=3, bucket_size=256, min_compress_numel=256, **SIGN)
        x, y, _, _ = digits.load_digits_split()
        for s in range(8):
            i = torch.arange(s * 30 + rank * 10, s * 30 + rank * 10 + 10)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i]), y[i]).backward()
            opt.step()
        return torch.equal(net.unused.detach(), before), all(bool(torch.isfinite(p).all()) for p in net.parameters())
    for same, finite in hvd_qadam.simulate(2, worker):
        assert same and finite


# ---------------------------------------------------------------------------------- checkpoints
def _resume_worker(tmp_path, kw, total, split):
    def worker(rank, comm):
        x, y, _, _ = digits.load_digits_split()
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, **kw)

        def run(start, stop):
            for s in range(start, stop):
                i = torch.arange(s * 30 + rank * 10, s * 30 + rank * 10 + 10) % len(x)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
        if split is None:
            run(0, total)
        else:
            run(0, split)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"ck{rank}.pt")
            model = digits.make_model(seed=123)                   # other weights: must be overwritten
            opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, **kw)
            ck = torch.load(tmp_path / f"ck{rank}.pt")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            run(split, total)
        return ({n: p.detach().clone() for n, p in model.named_parameters()},
                opt.engine.counters["worker_adam_step"].get(OnebitAdam.FREEZE_AT), opt.engine.cfg.warmup_steps)
    return worker


@pytest.mark.parametrize("split,refresh", [(2, 0), (6, 0), (6, 2), (7, 2)])
def test_checkpoint_resume_continues_identical_trajectory(tmp_path, split, refresh, assert_same_params):
    # freeze at step 4: split before and after it; with v refreshed every 2 steps (5 and 7 are
    # refreshes), resumed just after one and just before one
    kw = dict(SIGN, freeze_step=4, topology="sharded", bucket_size=64, min_compress_numel=256,
              v_refresh_every=refresh)
    straight = hvd_qadam.simulate(3, _resume_worker(tmp_path, kw, 9, None))
    resumed = hvd_qadam.simulate(3, _resume_worker(tmp_path, kw, 9, split))
    for r in range(3):
        assert_same_params(straight[r][0], resumed[r][0], f"resumed rank {r}")


@pytest.mark.parametrize("split", [3, 8])        # before and after the automatic freeze
def test_auto_freeze_agrees_on_every_rank_and_resumes_identically(tmp_path, split, monkeypatch,
                                                                  assert_same_params):
    # a short window and a loose tolerance, so that the freeze happens within a few steps
    monkeypatch.setattr(OnebitAdam, "AUTO_WINDOW", 2)
    monkeypatch.setattr(OnebitAdam, "AUTO_TOLERANCE", 0.5)
    kw = dict(SIGN, freeze_step="auto", bucket_size=64, min_compress_numel=256)
    straight = hvd_qadam.simulate(3, _resume_worker(tmp_path, kw, 12, None))
    at = straight[0][1]
    assert at is not None and 3 <= at < 8, at                  # decided, between the two splits
    for r in range(3):
        assert straight[r][1] == at and straight[r][2] == at   # every rank, and the engine follows
    resumed = hvd_qadam.simulate(3, _resume_worker(tmp_path, kw, 12, split))
    for r in range(3):
        assert resumed[r][1] == at and resumed[r][2] == at
        assert_same_params(straight[r][0], resumed[r][0], f"resumed rank {r}")
    # the cap: warmup_steps with "auto" is the latest freeze step
    capped = hvd_qadam.simulate(3, _resume_worker(tmp_path, dict(kw, warmup_steps=2), 5, None))
    assert capped[0][1] is None and capped[0][2] == 2


def test_optimizer_engine_and_algorithm_read_one_live_config_after_the_automatic_freeze(monkeypatch):
    """freeze_step="auto" decides the warm-up at run time: the optimizer's ``config`` then says the
    step compression started at, as the engine's steps (``communication_stats``) show it; a reset
    of the state (ranks at different steps) undoes the decision with the state it came from."""
    monkeypatch.setattr(OnebitAdam, "AUTO_WINDOW", 2)
    monkeypatch.setattr(OnebitAdam, "AUTO_TOLERANCE", 0.5)
    kw = dict(SIGN, freeze_step="auto", bucket_size=64, min_compress_numel=256)

    def worker(rank, comm):
        x, y, _, _ = digits.load_digits_split()
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, **kw)
        compressed = []
        for s in range(10):
            i = torch.arange(s * 20 + rank * 10, s * 20 + rank * 10 + 10) % len(x)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            compressed.append(opt.communication_stats.compressed)
        eng = opt.engine
        one = opt.config is eng.cfg and eng.alg.cfg is eng.cfg
        decided = (opt.config.warmup_steps, compressed.index(True) if any(compressed) else None,
                   eng.counters["worker_adam_step"].get(OnebitAdam.FREEZE_AT), eng.alg.agreed_config()["warmup_steps"])
        eng.reset_state(eng.step_count)
        after_reset = (opt.config.warmup_steps, eng.alg.cfg.warmup_steps, eng.alg.compress_at(eng, eng.step_count))
        return one, decided, after_reset, compressed

    for one, (warmup, first, at, agreed), after_reset, compressed in hvd_qadam.simulate(2, worker):
        assert one
        assert at is not None and warmup == first == at, (warmup, first, at)
        assert all(compressed[at:]) and not any(compressed[:at])
        assert agreed == FREEZE_AUTO_NEVER          # the handshake compares the configured cap
        assert after_reset == (FREEZE_AUTO_NEVER, FREEZE_AUTO_NEVER, False)


# ---------------------------------------------------------------------------------- convergence
EPOCHS = 15          # 14 steps per epoch: 210 steps


def _digits(**kw):
    def worker(rank, comm):
        def mk(m):
            return hvd_qadam.DistributedOptimizer(torch.optim.Adam(m.parameters(), lr=2e-3), m.named_parameters(),
                                                  comm=comm, **kw)
        return digits.train(rank, comm.size, mk, epochs=EPOCHS)[1]
    hist = hvd_qadam.simulate(3, worker)[0]
    return hist[-1]["test_accuracy"], hist[-1]["loss"]


@pytest.fixture(scope="module")
def adam_fp32():
    return _digits(quantizer="none")


@pytest.mark.parametrize("name,kw,tolerance", [
    ("onebit_adam 1-bit sign two-way, freeze 30", dict(SIGN, freeze_step=30), 1.5),
    ("onebit_adam 4-bit qsgdinf two-way, freeze 30", dict(algorithm="onebit_adam", freeze_step=30,
                                                           downlink_quantizer="qsgdinf", downlink_bits=4), 1.5),
    ("onebit_adam 1-bit sign, auto freeze", dict(SIGN, freeze_step="auto"), 1.5),
])
def test_converges_on_digits_close_to_adam(adam_fp32, name, kw, tolerance):
    acc, loss = _digits(**kw)
    assert acc >= adam_fp32[0] - tolerance / 100, f"{name}: {acc:.4f} vs fp32 {adam_fp32[0]:.4f}"


def test_onebit_without_error_feedback_is_worse():
    ef = _digits(**SIGN, freeze_step=30)
    no = _digits(**SIGN, freeze_step=30, error_feedback=False, server_error_feedback=False)
    assert no[1] > 1.5 * ef[1], (no, ef)


# ---------------------------------------------------------------------------------- ps under mpirun
@pytest.mark.parametrize("refresh,steps,checkpoint_at", [(0, 6, 4), (2, 6, 5)])   # with v_refresh_every=2, step 4
def test_mpi_parameter_server_equals_simulator_bit_for_bit(tmp_path, run_mpi, sim_train, assert_same_params,
                                                           refresh, steps, checkpoint_at):   # is a refresh
    kwargs = dict(SIGN, freeze_step=3, v_refresh_every=refresh)
    out = tmp_path / "ps.pt"
    run_mpi(4, "train_ps.py", "--out", str(out), "--steps", str(steps), "--checkpoint-at", str(checkpoint_at),
            "--base", "adam", "--kwargs", json.dumps(kwargs))
    res = torch.load(out)
    assert res["size"] == 3 and len(set(res["digests"])) == 1 and res["has_server_state"]
    assert 0 < res["stats"]["sent_bytes"] < res["stats"]["fp32_bytes"] / 20      # 1-bit after the freeze
    assert_same_params(res["params"], sim_train(3, steps, **kwargs)[0], "ps vs simulator")
