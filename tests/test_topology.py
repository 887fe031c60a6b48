"""Topologies: what ``topology="auto"`` picks and why, the two-level exchange's math, and the
bytes a rank sends, counted on the simulator's real frames against each topology's byte model
and against Horovod's ring allreduce."""
import pytest
import torch

import hvd_qadam
from hvd_qadam.comm import SimWorld
from hvd_qadam.config import LinkSpec, NONE_LINK
from hvd_qadam.wire import FRAME_HEADER_SIZE, HEADER_SIZE, Frame
from hvd_qadam.topology import TOPOLOGIES, Hosts, TopologyError, choose, payload_bytes_per_element

from harness import digits
from conftest import assert_same_params, sim_train

UP = LinkSpec("qsgdinf", 6, 128, "nearest")


def _same_as_uplink(cls):
    return UP if cls.downlink_travels else NONE_LINK


@pytest.mark.parametrize("size,local,expected", [
    (1, 1, "allgather"), (2, 1, "allgather"), (3, 1, "sharded"), (16, 1, "sharded"), (256, 1, "sharded"),
    (8, 8, "sharded"),                       # one host: nothing crosses hosts, fewest bytes in all
    (8, 2, "sharded"), (64, 2, "sharded"), (8, 4, "sharded"), (4, 4, "sharded"),
    # several ranks per host: the flat exchange would load a host link more than an fp16 ring
    (12, 4, "hierarchical"), (16, 4, "hierarchical"), (256, 8, "hierarchical"), (15, 3, "hierarchical"),
    (12, 3, "sharded")])
def test_auto_picks_the_fewest_bytes_across_hosts(size, local, expected):
    name, reason = choose(Hosts(size, local), UP, _same_as_uplink)
    assert name == expected, reason
    assert f"{size} ranks" in reason
    if expected == "hierarchical":
        assert "more than Horovod's fp16 ring" in reason, reason
    else:
        assert "allgather" in reason and "sharded" in reason, reason


def test_auto_weighs_the_downlink_the_user_asked_for():
    """With a full-precision downlink (4 bytes per element) sharded pays for it in every step,
    so gathering 6-bit payloads stays cheaper up to N - 1 <= (N - 1)/N (1 + 4/0.78): N <= 6."""
    def fp32_down(cls):
        return NONE_LINK
    picks = {n: choose(Hosts(n, 1), UP, fp32_down)[0] for n in range(2, 10)}
    assert [n for n, t in picks.items() if t == "allgather"] == [2, 3, 4, 5, 6], picks


def test_hierarchical_option():
    assert choose(Hosts(8, 2), UP, _same_as_uplink, hierarchical=True)[0] == "hierarchical"
    assert choose(Hosts(256, 8), UP, _same_as_uplink, hierarchical=False)[0] == "sharded"
    assert choose(Hosts(8, 1), UP, _same_as_uplink, hierarchical=True)[0] == "hierarchical"
    # bytes alone would favour it: 1/L of the flat exchange's across hosts
    up = payload_bytes_per_element(UP)
    flat = TOPOLOGIES["sharded"].bytes_per_rank(1, up, up, Hosts(8, 2))["inter_host"]
    two = TOPOLOGIES["hierarchical"].bytes_per_rank(1, up, up, Hosts(8, 2))["inter_host"]
    assert abs(flat / two - 2.0) < 1e-9     # (N - L)/N against (H - 1)/(H L): L here
    model = digits.make_model()
    with pytest.raises(ValueError, match="hierarchical=True asks for the two-level exchange"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                       topology="sharded", hierarchical=True, comm=SimWorld(1).comm(0))
    with pytest.raises(ValueError, match="hierarchical must be None, True or False"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                       hierarchical="yes", comm=SimWorld(1).comm(0))
    with pytest.raises(ValueError, match="unknown topology 'ring'"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                       topology="ring", comm=SimWorld(1).comm(0))
    with pytest.raises(TopologyError, match="cannot sit 2 per host"):
        Hosts(3, 2)


def _one_step_stats(world, local=1, steps=2, **kw):
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm, **kw)
        x, y, _, _ = digits.load_digits_split()
        for s in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rank::world][:16]), y[rank::world][:16]).backward()
            opt.step()
        st = opt.communication_stats
        return {"sent": st.sent_bytes, "received": st.received_bytes, "fp32": st.fp32_bytes, "ratio": st.ratio,
                "topology": st.topology, "reason": st.topology_reason,
                "numel": sum(g.numel for g in opt.engine.layout.groups if g.compressed),
                "groups": len(opt.engine.layout.groups),
                "small": sum(g.numel for g in opt.engine.layout.groups if not g.compressed),
                "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return hvd_qadam.simulate(world, worker, local_size=local)


@pytest.mark.parametrize("world,local", [(2, 1), (3, 1), (4, 1), (8, 1), (16, 1), (4, 2), (8, 2), (8, 4)])
def test_defaults_bytes_per_rank_match_the_model_and_beat_horovods_ring(world, local):
    """The defaults' frames, counted by the optimizer on every rank: the byte model of the
    topology auto picked (frame headers aside), at most 2 payloads per rank whatever N (a ring
    allreduce's shape), >= 4x fewer than Horovod's fp32 ring and >= 2x fewer than its fp16 ring."""
    res = _one_step_stats(world, local)
    r0 = res[0]
    topo = TOPOLOGIES[r0["topology"]]
    hosts = Hosts(world, local)
    up = payload_bytes_per_element(LinkSpec("qsgdinf", None, 128, "nearest"))
    model = topo.bytes_per_rank(r0["numel"], up, up if topo.downlink_travels else 0.0, hosts)
    small = topo.bytes_per_rank(r0["small"], 4.0, 4.0 if topo.downlink_travels else 0.0, hosts)["total"]
    # frame and payload headers, and partial buckets' scales and code bytes, per message sent
    H, L = hosts.count, hosts.local_size
    msgs = r0["groups"] * (2 * (world - 1) + 2 * (L - 1) * H)
    slack = msgs * (FRAME_HEADER_SIZE + HEADER_SIZE + 16)
    expected = model["total"] + small
    for r in res:
        assert r["topology"] == r0["topology"] and r["reason"] == r0["reason"]
        # chunks are bucket-aligned, so a rank's chunk may exceed the mean by a bucket's elements
        imbalance = r0["groups"] * world * 128 * 2 * up
        assert r["sent"] <= expected + slack + imbalance, (r["sent"], expected, slack)
    mean_sent = sum(r["sent"] for r in res) / world
    assert expected - 0.02 * expected <= mean_sent <= expected + slack, (mean_sent, expected, slack)
    # the optimizer's own ratio: Horovod's fp32 ring bytes over ours
    assert abs(r0["fp32"] - 8 * (world - 1) / world * (r0["numel"] + r0["small"])) <= r0["groups"]
    for r in res:      # Horovod's fp32 ring bytes over ours (frame headers included: ~5 % of this
        assert r["ratio"] == r["fp32"] / r["sent"]          # 26k-parameter model's traffic at N = 16)
    if L == 1:
        assert min(r["ratio"] for r in res) >= 3.6, [r["ratio"] for r in res]
    # Horovod's ring allreduce: 2 (N - 1)/N of the model per rank; across hosts, each host's link
    # carries that much (the ring crosses it once each way), 1/L of it per rank. Ours from the
    # byte model (which the frames above match; their headers are a model-size-independent extra).
    ring = 2 * (world - 1) / world * (r0["numel"] + r0["small"]) / local
    smalls = {t: TOPOLOGIES[t].bytes_per_rank(r0["small"], 4.0, 4.0, hosts)["inter_host"]
              for t in ("sharded", "hierarchical")}
    if local == 1:
        ours = model["total"] + small
        assert 4 * ring / ours >= 4.0 and 2 * ring / ours >= 2.0, (ring, ours)
    else:
        # several ranks per host: every rank of the flat exchange crosses the host's link, so
        # only the two-level exchange keeps the margins over a ring (which crosses it once)
        two = TOPOLOGIES["hierarchical"].bytes_per_rank(r0["numel"], up, up, hosts)["inter_host"] + smalls["hierarchical"]
        assert 4 * ring / two >= 4.0 and 2 * ring / two >= 2.0, (ring, two)
        assert two * local <= model["inter_host"] + smalls["sharded"] + 1e-6
    assert abs(r0["fp32"] - 8 * (world - 1) / world * (r0["numel"] + r0["small"])) <= r0["groups"]
    assert model["inter_host"] <= 2 * up * r0["numel"]


@pytest.mark.parametrize("world", [4, 16, 64, 256])
def test_bytes_per_rank_stay_bounded_out_to_256_ranks(world):
    """By counting (each topology's byte model, checked against real frames above): the
    defaults' bytes per rank never exceed 2 payloads, and stay >= 4x under Horovod's fp32 ring and
    >= 2x under its fp16 ring, flat or with 8 ranks per host."""
    up = payload_bytes_per_element(UP)
    for local in (1, 8):
        if world % local or world == local:
            continue
        hosts = Hosts(world, local)
        name, _ = choose(hosts, UP, _same_as_uplink)
        b = TOPOLOGIES[name].bytes_per_rank(1, up, up, hosts)
        ring32 = 2 * (world - 1) / world * 4.0
        assert b["inter_host"] <= 2 * up
        assert ring32 / b["inter_host"] >= 4.0 and (ring32 / 2) / b["inter_host"] >= 2.0


def test_hierarchical_with_one_rank_per_host_is_the_sharded_exchange(assert_same_params):
    """Hosts of one rank: the host exchange is a rank's own vector, so the two-level exchange
    quantizes, serves and decodes exactly what ``sharded`` does, bit for bit."""
    kw = dict(algorithm="qadam", bucket_size=64, min_compress_numel=256, downlink_bits=4)
    s = sim_train(4, 4, topology="sharded", **kw)
    h = sim_train(4, 4, topology="hierarchical", local_size=1, **kw)
    for r in range(4):
        assert_same_params(s[0], h[r], f"hierarchical 4x1 rank {r} vs sharded")


@pytest.mark.parametrize("local", [2, 4])
def test_hierarchical_full_precision_is_the_mean_gradient(local):
    """With nothing quantized, the two-level exchange averages exactly what allgather averages
    (host means, then the mean of host means: only the summation order differs)."""
    kw = dict(quantizer="none", downlink_quantizer="none", min_compress_numel=256)
    a = sim_train(8, 4, topology="allgather", **kw)
    h = sim_train(8, 4, topology="hierarchical", local_size=local, **kw)
    for r in range(8):
        for n in a[0]:
            assert torch.equal(h[0][n], h[r][n])
            torch.testing.assert_close(h[r][n], a[0][n], rtol=1e-5, atol=1e-6)
    init = {n: p.detach() for n, p in digits.make_model().named_parameters()}
    assert any(not torch.equal(init[n], h[0][n]) for n in init)


def test_hierarchical_defaults_train_like_allgather():
    """The defaults with hierarchical=True on 2 hosts x 4 ranks (quantized both ways, server EF)
    land close to the uncompressed mean-gradient run after 30 steps, and every rank is identical."""
    full = sim_train(8, 30, quantizer="none", downlink_quantizer="none", topology="allgather")
    hier = sim_train(8, 30, local_size=4, hierarchical=True)
    x, y, _, _ = digits.load_digits_split()

    def loss(params):
        model = digits.make_model()
        model.load_state_dict(params)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))
    for r in range(8):
        assert_same_params(hier[0], hier[r], f"rank {r}")
    l_full, l_hier, l_init = loss(full[0]), loss(hier[0]), loss(dict(digits.make_model().named_parameters()))
    assert l_hier < 0.5 * l_init
    assert abs(l_hier - l_full) < 0.05 * l_full, (l_hier, l_full)


def _hierarchical_failing_step(poison):
    """8 simulated ranks, hosts of 4, the hierarchical exchange: one clean step, then one where
    ``poison(rank, model)`` edits the gradients. Per rank: (error message or None, weights before
    and after the step, the state before and after, the step count)."""
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             topology="hierarchical", nonfinite="raise", overlap=False)
        x, y, _, _ = digits.load_digits_split()

        def step(edit):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            if edit:
                poison(rank, model)
            opt.step()
        step(False)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = {k: v.clone() for k, v in opt.engine.bank.current.items()}
        try:
            step(True)
            err = None
        except hvd_qadam.NonFiniteGradientError as e:
            err = str(e)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        return err, before, after, state, dict(opt.engine.bank.current), opt.engine.step_count
    return hvd_qadam.simulate(8, worker, local_size=4, timeout=120)


def test_hierarchical_nan_on_one_rank_fails_every_rank_in_every_host():
    """A NaN on one rank reaches its host peers in the host exchange and the other hosts in the
    uplink: every rank raises and nothing changed (weights, residuals, step)."""
    def poison(rank, model):
        if rank == 5:
            model[0].weight.grad[0, 0] = float("nan")
    for rank, (err, before, after, state, state_after, step) in enumerate(_hierarchical_failing_step(poison)):
        assert err is not None and "rank 5" in err, (rank, err)
        assert_same_params(before, after, f"rank {rank} weights")
        assert state.keys() == state_after.keys() and any(k.endswith(".e") for k in state)
        assert all(torch.equal(state[k], state_after[k]) for k in state), rank
        assert step == 1


def test_hierarchical_host_mean_overflow_on_one_column_fails_every_rank():
    """Finite gradients whose host mean overflows (3e38 on every rank of host 0): only the local
    rank that serves that element finds it, after the host exchange, and only its column hears
    it in the uplink; the error travels on in place of the downlink, so every rank raises
    instead of waiting in an exchange that its peers skipped, and nothing changed."""
    def poison(rank, model):
        if rank < 4:
            model[0].weight.grad[0, 0] = 3e38
    for rank, (err, before, after, state, state_after, step) in enumerate(_hierarchical_failing_step(poison)):
        assert err is not None and "host mean" in err and "overflowed" in err, (rank, err)
        assert_same_params(before, after, f"rank {rank} weights")
        assert all(torch.equal(state[k], state_after[k]) for k in state), rank
        assert step == 1


def test_a_downlink_frame_short_of_a_group_is_a_payload_error_on_every_rank():
    """The sharded downlink is one frame per rank holding every group's chunk. Rank 1 sends a
    well-formed, checksummed frame with the last group's chunk left out (a peer running other
    code, say): every rank raises PayloadError naming rank 1 and the count, instead of decoding
    the wrong chunks or failing with an IndexError, and no weight changed."""
    def worker(rank, comm):
        if rank == 1:
            send = comm.allgather_async

            def allgather_async(data, name):
                if name == "hvd_qadam.down":
                    f = Frame.from_bytes(data)
                    data = Frame(f.rank, f.step, f.layout, f.payloads[:-1]).to_bytes()
                return send(data, name)
            comm.allgather_async = allgather_async
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             topology="sharded", exchange="compressed", overlap=False)
        x, y, _, _ = digits.load_digits_split()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
        try:
            opt.step()
            err = None
        except hvd_qadam.PayloadError as e:
            err = str(e)
        return err, before, {n: p.detach().clone() for n, p in model.named_parameters()}, opt.engine.step_count
    for rank, (err, before, after, step) in enumerate(hvd_qadam.simulate(3, worker, timeout=120)):
        assert err is not None and "downlink frame from rank 1 holds" in err and "expected" in err, (rank, err)
        assert_same_params(before, after, f"rank {rank} weights")
        assert step == 0


def test_ranks_that_disagree_about_hosts_fail_at_the_first_step():
    """One rank believes in hosts of 2 (say, another HVD_QADAM_LOCAL_SIZE): every rank raises a
    ConsistencyError naming ranks_per_host at the first step, instead of exchanging with the
    wrong peers."""
    def worker(rank, comm):
        if rank == 3:
            comm.hosts = Hosts(4, 2)
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                             topology="hierarchical")
        x, y, _, _ = digits.load_digits_split()
        try:       # the handshake runs where the first exchange starts: in backward's hooks
            torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            opt.step()
        except hvd_qadam.ConsistencyError as e:
            return str(e)
        return None
    for rank, err in enumerate(hvd_qadam.simulate(4, worker)):
        assert err is not None and "ranks_per_host" in err, (rank, err)
