"""The exchange path: full precision through Horovod's allreduce, and ``exchange="auto"``'s
measured choice between it and the compressed exchange (hvd_qadam/exchange.py)."""
import pytest
import torch

from harness import digits
import hvd_qadam
from conftest import assert_same_params, sim_train
from hvd_qadam import exchange
from hvd_qadam.comm import SimWorld
from hvd_qadam.engine import NonFiniteGradientError


# ----------------------------------------------------------------------------- full precision
@pytest.mark.parametrize("topology", ["allgather", "sharded", "hierarchical"])
def test_horovod_path_is_the_exact_mean_on_every_topology(topology):
    """exchange="horovod" with qsgd is Horovod's averaging: the same trajectory as a full-precision
    uplink through the topology (the simulator's allreduce sums in rank order, as the topology's
    mean does), identical on every rank."""
    local = 2 if topology == "hierarchical" else 1
    horovod = sim_train(4, 4, exchange="horovod", local_size=local, topology=topology)
    full = sim_train(4, 4, quantizer="none", local_size=local, topology=topology)
    for r in range(4):
        assert_same_params(horovod[r], horovod[0], f"rank {r} vs rank 0")
    assert_same_params(horovod[0], full[0], f"{topology}: exchange='horovod' vs quantizer='none'")


class _RecordingComm:
    """A simulated rank's comm that notes each allreduce's name and the phase it started in."""

    def __init__(self, comm, phase):
        self._comm, self._phase, self.started = comm, phase, []

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def allreduce_async(self, tensor, name):
        self.started.append((name, self._phase[0]))
        return self._comm.allreduce_async(tensor, name)

    def allreduce_inplace_async(self, tensor, name):
        self.started.append((name, self._phase[0]))
        return self._comm.allreduce_inplace_async(tensor, name)


def _train(world, steps, record, **kwargs):
    """Train the digits model on ``world`` simulated ranks; per rank: [record(optimizer, comm)
    after each step], and the optimizer. The comm notes each allreduce and its phase."""
    def worker(rank, comm):
        phase = ["backward"]
        comm = _RecordingComm(comm, phase)
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             **kwargs)
        x, y, _, _ = digits.load_digits_split()
        out = []
        for s in range(steps):
            opt.zero_grad()
            comm.started.clear()
            phase[0] = "backward"
            i = torch.arange(s * 16 + rank * 8, s * 16 + rank * 8 + 8) % len(x)
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            phase[0] = "step"
            opt.step()
            out.append(record(opt, comm))
        return out, opt
    return hvd_qadam.simulate(world, worker)


def _paths(world, steps, **kwargs):
    """Each step's communication_stats (exchange, group paths, bytes) on rank 0."""
    def record(opt, comm):
        st = opt.communication_stats
        return st.exchange, dict(st.group_paths), st.sent_bytes, st.exchange_reason
    return _train(world, steps, record, **kwargs)


def _allreduces(steps=2, **kwargs):
    """Per step, rank 0's allreduces: (name, 'backward' or 'step'), and the layout."""
    per_step, opt = _train(2, steps, lambda opt, comm: [(n, ph) for n, ph in comm.started
                                                         if n.startswith("hvd_qadam.fp.")], **kwargs)[0]
    return per_step, opt._layout


def test_horovod_path_starts_each_tensor_from_its_backward_hook():
    """Where the uplink is the gradient itself (qsgd; onebit_adam's warm-up), Horovod's allreduce
    carries a group tensor by tensor, each started by its own backward hook as
    hvd.DistributedOptimizer's hooks start theirs, not once the whole group is ready."""
    for kwargs in (dict(exchange="horovod"), dict(algorithm="onebit_adam", freeze_step=10, topology="allgather")):
        per_step, layout = _allreduces(**kwargs)
        every_tensor = {f"hvd_qadam.fp.{g.index}.{i}" for g in layout.groups for i in range(len(g.slots))}
        for started in per_step:
            assert sorted(n for n, _ in started) == sorted(every_tensor), kwargs
            assert {ph for _, ph in started} == {"backward"}, (kwargs, started)


def test_compressed_steps_and_transformed_uplinks_allreduce_what_they_must():
    """A compressed step allreduces only the small tensors' group (tensor by tensor); an algorithm
    whose worker transforms the gradient (efficient_adam's local Adam step) allreduces whole groups."""
    per_step, layout = _allreduces(topology="sharded")
    small = [g for g in layout.groups if not g.compressed]
    assert small and len(small) < len(layout.groups)
    for started in per_step:
        assert sorted(n for n, _ in started) == sorted(f"hvd_qadam.fp.{g.index}.{i}" for g in small
                                                       for i in range(len(g.slots)))
    per_step, layout = _allreduces(algorithm="efficient_adam", topology="allgather", exchange="horovod")
    for started in per_step:
        assert sorted(n for n, _ in started) == sorted(f"hvd_qadam.fp.{g.index}" for g in layout.groups)


def test_warmup_and_small_tensors_go_through_horovod_compressed_groups_do_not():
    (stats, opt), _ = _paths(2, 3, warmup_steps=1, topology="sharded")
    compressed = {g.index for g in opt._layout.groups if g.compressed}
    assert compressed and len(compressed) < len(opt._layout.groups)
    assert set(stats[0][1].values()) == {"horovod"}                 # the warm-up step: every group
    for _, paths, _, _ in stats[1:]:
        assert {g for g, p in paths.items() if p == "horovod"} == set(paths) - compressed
        assert all(paths[g] == "qsgdinf:6" for g in compressed)


def test_horovod_path_refused_where_the_server_state_is_sharded():
    model = digits.make_model()
    comm = SimWorld(2).comm(0)
    with pytest.raises(ValueError, match="exchange='horovod'.*server state is sharded"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(), comm=comm,
                                       algorithm="qadam", topology="sharded", exchange="horovod")
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(), comm=comm,
                                         algorithm="qadam", topology="sharded", exchange="auto")
    assert "compresses every step" in opt.communication_stats.exchange_reason
    assert opt.engine.allreduce is None


def test_qadam_under_allgather_uses_the_allreduce_for_its_warmup():
    """Every rank holds the whole server state under allgather, so the allreduce can carry qadam's
    full-precision steps; the result equals the topology's own full-precision path."""
    a = sim_train(3, 3, algorithm="qadam", topology="allgather", exchange="horovod")
    b = sim_train(3, 3, algorithm="qadam", topology="allgather", quantizer="none")
    assert_same_params(a[0], b[0], "qadam: exchange='horovod' vs quantizer='none'")


def test_nan_through_the_allreduce_fails_every_rank_and_changes_nothing():
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             exchange="horovod", nonfinite="raise")
        x, y, _, _ = digits.load_digits_split()
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step = opt.engine.step_count
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[:8]), y[:8])
        (loss * (float("nan") if rank == 1 else 1.0)).backward()
        with pytest.raises(NonFiniteGradientError, match=r"rank 1, step 1: non-finite gradient in .*0\.weight"):
            opt.step()
        assert opt.engine.step_count == step
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        return True
    assert hvd_qadam.simulate(3, worker) == [True] * 3


# ----------------------------------------------------------------------------- switching
def test_switching_paths_keeps_every_residual_and_replicas_identical(monkeypatch):
    """A scripted sequence of paths: a step through Horovod leaves every worker and server residual
    as it was (bit for bit), the next compressed step carries them, and every rank ends identical."""
    script = [False, False, True, False, True, True, False, False]
    monkeypatch.setattr(exchange.Auto, "full_precision_at", lambda self: script[self.step])
    monkeypatch.setattr(exchange.Auto, "observe", lambda self, comm, full: setattr(self, "step", self.step + 1))

    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             algorithm="efficient_adam", topology="sharded", exchange="auto",
                                             bits=4)
        x, y, _, _ = digits.load_digits_split()
        seen = []
        for s, full in enumerate(script):
            before = {k: v.clone() for k, v in opt.engine.bank.current.items() if k.endswith(".e")}
            opt.zero_grad()
            i = torch.arange(s * 24 + rank * 8, s * 24 + rank * 8 + 8) % len(x)
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            after = {k: v for k, v in opt.engine.bank.current.items() if k.endswith(".e")}
            assert opt.communication_stats.exchange == ("horovod" if full else "compressed")
            if full:
                assert before.keys() == after.keys() and before
                for k in before:
                    assert torch.equal(before[k], after[k]), f"step {s}: residual {k} changed on a Horovod step"
            elif before:
                assert any(not torch.equal(before[k], after[k]) for k in before)
            seen.append(sorted(after))
        return {n: p.detach().clone() for n, p in model.named_parameters()}, seen
    out = hvd_qadam.simulate(3, worker)
    for r in range(3):
        assert_same_params(out[r][0], out[0][0], f"rank {r} vs rank 0")
    assert any("@" in k for k in out[0][1][-1]), "server residuals expected (sharded, quantized downlink)"


# ----------------------------------------------------------------------------- the auto policy
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Comm:
    """allgather_object over ``ranks`` ranks where the other ranks report ``factor`` x this one."""
    def __init__(self, ranks=3, factor=1.0):
        self.ranks, self.factor, self.calls = ranks, factor, 0

    def allgather_object(self, obj, name=""):
        self.calls += 1
        scale = (lambda v: [x * self.factor for x in v]) if isinstance(obj, list) else (lambda v: v * self.factor)
        return [obj] + [scale(obj)] * (self.ranks - 1)


def _run(policy, clock, comm, cost, steps):
    """Drive ``policy`` for ``steps`` compressed steps whose wall time is ``cost(step, full)``;
    returns the path taken at each step."""
    taken = []
    for s in range(steps):
        full = policy.full_precision_at()
        taken.append(full)
        clock.now += cost(s, full)
        policy.observe(comm, full)
    return taken


@pytest.fixture
def auto(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(exchange.time, "monotonic", clock)
    return exchange.Auto(), clock


def test_auto_warms_up_compressed_then_probes_both_paths_alternately(auto):
    policy, clock = auto
    taken = _run(policy, clock, _Comm(), lambda s, full: 1.0 if full else 0.5, exchange.Auto.SETTLE + 6)
    S = exchange.Auto.SETTLE
    assert taken[:S] == [False] * S
    assert taken[S:] == [True, False] * exchange.Auto.ROUNDS
    assert policy.full_precision_at() is False                     # compressed: twice as fast
    assert "compressed" in policy.reason and "1 s through Horovod" in policy.reason


def test_auto_prefers_horovod_on_a_tie_and_needs_the_hysteresis_margin(auto):
    policy, clock = auto
    _run(policy, clock, _Comm(), lambda s, full: 1.0 if full else 0.97, 20)   # 3 % faster: not enough
    assert policy.full_precision_at() is True
    assert policy.decisions[-1][1] is True
    assert "Horovod's allreduce" in policy.reason


def test_auto_counts_the_slowest_rank(auto):
    """Rank 0 sees compression 2x faster, but another rank is 3x slower on every path: the
    decision uses the max over ranks, taken identically everywhere."""
    policy, clock = auto
    comm = _Comm(factor=3.0)
    _run(policy, clock, comm, lambda s, full: 1.0 if full else 0.5, exchange.Auto.SETTLE + 6)
    step, full, seen = policy.decisions[-1]
    assert seen == {"horovod": 3.0, "compressed": 1.5} and full is False


def test_auto_follows_a_change_of_conditions_within_its_check_period(auto):
    """Compression wins; then the step on the chosen path gets 2x slower (a busier network, or
    the codec's CPU taken by something else) while Horovod's is now faster: a new probe starts
    within CHECK_EVERY steps of the change and the policy switches to Horovod."""
    policy, clock = auto
    A = exchange.Auto
    switch_at = A.SETTLE + 2 * A.ROUNDS + 5

    def cost(s, full):
        if s < switch_at:
            return 1.0 if full else 0.5
        return 0.8 if full else 1.0
    taken = _run(policy, clock, _Comm(), cost, switch_at + A.CHECK_EVERY + 2 * A.ROUNDS + 2)
    assert taken[switch_at - 1] is False
    assert taken.index(True, switch_at) - switch_at <= A.CHECK_EVERY + 1, "no probe soon after the change"
    assert policy.full_precision_at() is True
    assert len(policy.decisions) == 2 and policy.decisions[-1][1] is True


def test_auto_revisits_periodically_when_nothing_changes(auto, monkeypatch):
    monkeypatch.setattr(exchange.Auto, "REVISIT", 40)
    policy, clock = auto
    _run(policy, clock, _Comm(), lambda s, full: 1.0 if full else 0.5, 120)
    assert len(policy.decisions) >= 2
    assert all(d[1] is False for d in policy.decisions)


def test_auto_in_training_takes_the_same_decision_on_every_rank():
    """Real measurements in the simulator (threads of one process): whatever is chosen, every
    rank chose it at the same step, and the replicas are identical."""
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             exchange="auto")
        x, y, _, _ = digits.load_digits_split()
        paths = []
        for s in range(exchange.Auto.SETTLE + 2 * exchange.Auto.ROUNDS + 4):
            opt.zero_grad()
            i = torch.arange(s * 16 + rank * 8, s * 16 + rank * 8 + 8) % len(x)
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
            paths.append(opt.communication_stats.exchange)
        return paths, opt.engine.exchange.decisions, {n: p.detach().clone() for n, p in model.named_parameters()}
    out = hvd_qadam.simulate(2, worker)
    assert out[0][0] == out[1][0]
    assert len(out[0][1]) == 1 and out[0][1] == out[1][1]
    assert_same_params(out[0][2], out[1][2], "rank 1 vs rank 0")


def test_the_default_is_auto_and_the_environment_overrides_it(monkeypatch):
    """exchange=None: HVD_QADAM_EXCHANGE if set (the suite sets it, conftest.py), else "auto",
    for the optimizer and a Config alike."""
    from hvd_qadam.config import Config
    model = digits.make_model()

    def built():
        return hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                              comm=SimWorld(1).comm(0))
    monkeypatch.delenv(exchange.ENV)
    assert exchange.DEFAULT == exchange.AUTO and exchange.default() == "auto" and Config().exchange == "auto"
    opt = built()
    assert opt.config.exchange == "auto" and opt.engine.exchange.name == "auto"
    assert opt.communication_stats.exchange_reason.startswith("measuring"), opt.communication_stats.exchange_reason
    monkeypatch.setenv(exchange.ENV, "compressed")
    assert Config().exchange == "compressed" and built().engine.exchange.name == "compressed"


def test_exchange_option_is_validated():
    model = digits.make_model()
    with pytest.raises(ValueError, match="unknown exchange 'fast'"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                       comm=SimWorld(1).comm(0), exchange="fast")


def test_fp16_uplink_goes_through_the_allreduce_in_fp16():
    """compression=hvd.Compression.fp16 (Horovod's own): every group is summed in fp16 by the
    allreduce, 2 bytes per element on a ring, like Horovod's fp16 compression."""
    (stats, opt), _ = _paths(2, 2, compression=hvd_qadam.Compression.fp16)
    numel = sum(g.numel for g in opt._layout.groups)      # the small tensors' group in fp16 too
    for exch, paths, sent, _ in stats:
        assert set(paths.values()) == {"horovod"}
        assert sent == 2 * numel                      # N = 2: a ring sends (N - 1)/N x 2 x 2 bytes
    assert "already full precision" in stats[0][3] or stats[0][0] == "compressed"


# ----------------------------------------------------------------------------- the shaped lab
def _can_run_netlab() -> bool:
    import os
    import shutil
    import subprocess
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "mpirun")):
        return False
    probe = subprocess.run(["ip", "netns", "add", "hqprobe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "hqprobe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.timeout(900)
def test_auto_follows_a_link_shaped_down_mid_run_in_the_lab(tmp_path):
    """Three ranks in their own network namespaces (bench/netlab.sh); after 40 unshaped steps
    tc shapes every link to 100 Mbit/s. ``exchange="auto"`` ends the run compressed (the faster
    path on that link), every rank ends identical, and the loss follows Horovod Adam's."""
    import json
    import os
    import subprocess
    import sys
    if not _can_run_netlab():
        pytest.skip("the shaped lab needs root, ip, tc, mpirun and network namespaces")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    out = tmp_path / "switch.json"
    proc = subprocess.run([sys.executable, os.path.join(bench, "lab_switch.py"), "--ranks", "3", "--size", "tiny",
                           "--phases", "none", "100mbit", "--steps", "40", "--json", str(out)],
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["replicas_identical"]
    assert res["rate_changes"] == [{"after_step": 39, "rate": "100mbit"}]
    assert all(r["path"] == "compressed" for r in rows[-8:]), [r["path"] for r in rows[40:]]
    assert res["decisions"], "no decision taken"
    auto, ref, comp = (sum(r["loss"] for r in runs[-10:]) / 10
                       for runs in (rows, res["reference"], res["compressed"]))
    # switching paths does not disturb the loss: it stays between (or near) compressing throughout
    # and Horovod Adam's
    assert min(ref, comp) - 0.02 * ref <= auto <= max(ref, comp) + 0.02 * ref, (auto, ref, comp)


def test_a_topology_change_re_decides_what_horovods_allreduce_may_carry():
    """topology="auto" re-chooses the topology at an elastic resize (Engine.set_topology): qadam's
    full-precision steps may take the allreduce under allgather (every rank holds the whole server
    state), not under sharded (its server moments are sharded), and back."""
    model = digits.make_model()
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                         comm=SimWorld(2).comm(0), algorithm="qadam", topology="allgather",
                                         exchange="auto")
    eng = opt.engine
    assert eng.allreduce is not None and eng.exchange.name == "auto"
    eng.set_topology("sharded", eng.cfg.downlink)
    assert eng.allreduce is None and "compresses every step" in eng.exchange.reason
    eng.set_topology("allgather", eng.cfg.downlink)
    assert eng.allreduce is not None and eng.exchange.name == "auto"
