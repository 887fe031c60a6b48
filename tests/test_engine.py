"""The engine and DistributedOptimizer on simulated ranks: topologies, EF, failures, checkpoints."""

import copy
import warnings

import numpy as np
import pytest
import torch

import hvd_qadam
from hvd_qadam.engine import ConsistencyError, NonFiniteGradientError
from hvd_qadam.quant import rng

from harness import digits
from harness.digits import base_optimizer

ALGOS = [("qsgd", "adam", {}), ("efficient_adam", "adam", {"downlink_quantizer": "qsgd", "downlink_bits": 4}),
         ("qadam", "adam", {"downlink_quantizer": "qsgdinf", "downlink_bits": 8}),
         ("qadam_weights", "adam", {"downlink_quantizer": "qsgdinf", "downlink_bits": 8}),
         ("ef_sgd", "sgd", {"quantizer": "sign", "bits": None, "downlink_quantizer": "sign"}),
         ("local_sgd", "sgd", {"sync_every": 2})]


@pytest.mark.parametrize("algorithm,base,kw", ALGOS, ids=[a[0] for a in ALGOS])
def test_sharded_equals_allgather_bit_for_bit(algorithm, base, kw, sim_train, assert_same_params):
    # small buckets so that every rank owns several buckets of every fused buffer; the same
    # downlink on both (sharded's default would quantize one that allgather computes locally)
    kw = dict({"downlink_quantizer": "none"}, **kw, bucket_size=64, min_compress_numel=256)
    a = sim_train(3, 4, base, algorithm=algorithm, topology="allgather", **kw)  # local_sgd syncs at 2, 4
    s = sim_train(3, 4, base, algorithm=algorithm, topology="sharded", **kw)
    for r in range(3):
        assert_same_params(a[0], a[r], f"{algorithm} allgather rank {r}")
        assert_same_params(a[0], s[r], f"{algorithm} sharded rank {r}")
    init = {n: p.detach() for n, p in digits.make_model().named_parameters()}
    assert any(not torch.equal(init[n], a[0][n]) for n in init), "training did not move the weights"


def test_world_of_one_matches_single_process_math(assert_same_params):
    """A compressed world of one: the average is the rank's own decoded payload, so the run equals
    error feedback and quantization done by hand (p = g + e; q = quantize(p), rounded
    stochastically on the stream of (seed, rank 0, step, buffer 0, uplink); e = p - dequantize(q))
    followed by torch Adam on dequantize(q). The weights (1024 elements and more) travel in one
    fused buffer, last layer first; the biases as fp32."""
    x, y, _, _ = digits.load_digits_split()
    batches = [torch.arange(32 * t, 32 * t + 32) for t in range(3)]
    seed, bits, bucket = 5, 4, 128

    def backward(model, i):
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()

    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm,
                                             quantizer="qsgd", bits=bits, bucket_size=bucket, rounding="stochastic",
                                             seed=seed, min_compress_numel=1024)
        for i in batches:
            opt.zero_grad()
            backward(model, i)
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    (engine,) = hvd_qadam.simulate(1, worker)

    def by_hand(compress: bool):
        model = digits.make_model()
        adam = base_optimizer(model)
        params = dict(model.named_parameters())
        fused = ["4.weight", "2.weight", "0.weight"]
        e = torch.zeros(sum(params[n].numel() for n in fused))
        for t, i in enumerate(batches):
            adam.zero_grad()
            backward(model, i)
            if compress:
                p = torch.cat([params[n].grad.reshape(-1) for n in fused]) + e
                q = hvd_qadam.quantize(p, "qsgd", bits, bucket, rounding="stochastic",
                                       key=rng.stream_key(seed, 0, t, 0, rng.UPLINK))
                decoded = hvd_qadam.dequantize(q)
                e = p - decoded
                for n, g in zip(fused, decoded.split([params[n].numel() for n in fused])):
                    params[n].grad.copy_(g.view_as(params[n]))
            adam.step()
        return {n: p.detach().clone() for n, p in params.items()}

    assert_same_params(engine, by_hand(compress=True), "world of one vs quantize/dequantize by hand + torch Adam")
    plain = by_hand(compress=False)
    assert all(not torch.equal(engine[n], plain[n]) for n in ("4.weight", "2.weight", "0.weight")), \
        "the weights must have travelled quantized"


def _one_step_engine(world, nan_rank=None, nonfinite="raise", steps_before=2):
    """Train ``steps_before`` good steps, then one step where ``nan_rank`` has a NaN gradient."""
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm,
                                             nonfinite=nonfinite, min_compress_numel=256)
        x, y, _, _ = digits.load_digits_split()
        for _ in range(steps_before):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            opt.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        resid = {k: v.clone() for k, v in worker_residuals(opt.engine).items()}
        adam_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
        opt.zero_grad()
        # Through the graph, not after backward(): the exchange of a group starts from a backward
        # hook as soon as its gradients are complete (as Horovod's does).
        hook = model[2].weight.register_hook(_poison) if rank == nan_rank else None
        torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        if hook is not None:
            hook.remove()
        err = None
        try:
            opt.step()
        except NonFiniteGradientError as e:
            err = str(e)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        return err, before, after, resid, worker_residuals(opt.engine), adam_state, opt.state, opt.engine
    return hvd_qadam.simulate(world, worker)


def worker_residuals(engine) -> dict:
    """{parameter name: view of its worker error-feedback residual} (the bank's ``g<i>.e``)."""
    out = {}
    for k, v in engine.bank.current.items():
        if k.endswith(".e") and "@" not in k and "#" not in k:
            out.update(engine.layout.groups[int(k[1:-2])].views(v))
    return out


def _poison(grad):
    grad = grad.clone()
    grad[3, 4] = float("nan")
    return grad


def test_nan_gradient_raises_on_every_rank_and_changes_nothing(assert_same_params):
    results = _one_step_engine(3, nan_rank=1)
    for rank, (err, before, after, resid, resid_after, adam, adam_after, eng) in enumerate(results):
        assert err is not None, f"rank {rank} did not raise"
        assert "rank 1" in err and "2.weight" in err and "1 NaN" in err, err
        assert_same_params(before, after, "weights after a failed step")
        assert resid.keys() == resid_after.keys() and len(resid) > 0
        for k in resid:
            assert torch.equal(resid[k], resid_after[k]), f"residual {k} changed on rank {rank}"
        for p in adam:
            for k in adam[p]:
                assert torch.equal(adam[p][k], adam_after[p][k]), "Adam state changed"
        assert eng.step_count == 2


def test_nan_gradient_skip_policy_skips_consistently(assert_same_params):
    results = _one_step_engine(2, nan_rank=0, nonfinite="skip")
    for err, before, after, *_rest, eng in results:
        assert err is None
        assert_same_params(before, after, "weights after a skipped step")
        assert eng.skipped_steps == 1 and eng.step_count == 2


def test_worker_residual_is_exactly_p_minus_decoded_payload():
    """EF invariant on real engine state: e_1 = g_0 - D(Q(g_0)) with the engine's own stream key."""
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, bits=3,
                                             bucket_size=128, min_compress_numel=256, seed=7)
        x, y, _, _ = digits.load_digits_split()
        torch.nn.functional.cross_entropy(model(x[rank::2][:40]), y[rank::2][:40]).backward()
        group = opt.engine.layout.groups[0]
        p = group.flatten({n: q.grad for n, q in model.named_parameters()}).clone()
        opt.step()
        q = hvd_qadam.quantize(p, "qsgdinf", 3, 128, rounding="nearest", key=rng.stream_key(7, rank, 0, 0, rng.UPLINK))
        expected = p - hvd_qadam.dequantize(q)
        got = group.flatten({s.name: worker_residuals(opt.engine)[s.name] for s in group.slots})
        return torch.equal(expected, got), float(expected.norm()), float(p.norm())
    for same, enorm, pnorm in hvd_qadam.simulate(2, worker):
        assert same
        assert 0 < enorm < pnorm   # nearest rounding is contractive


def test_checkpoint_resume_continues_identical_trajectory(tmp_path, sim_resume, assert_same_params):
    kw = dict(algorithm="efficient_adam", downlink_quantizer="qsgd", downlink_bits=4, topology="sharded",
              bucket_size=64, min_compress_numel=256)
    straight = sim_resume(3, tmp_path, 7, None, **kw)
    resumed = sim_resume(3, tmp_path, 7, 4, **kw)
    for r in range(3):
        assert_same_params(straight[r][0], resumed[r][0], f"resumed rank {r}")


def test_checkpoint_on_other_world_size_resets_residuals_with_warning():
    def save(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm)
        x, y, _, _ = digits.load_digits_split()
        torch.nn.functional.cross_entropy(model(x[:20]), y[:20]).backward()
        opt.step()
        return opt.state_dict()
    states = hvd_qadam.simulate(3, save)
    assert any(k.endswith(".e") for k in states[0]["hvd_qadam"]["state"])

    # Loading does not communicate, so the 2-rank world is built in this thread (warnings capture
    # is process-global and not thread-safe).
    from hvd_qadam.comm import SimWorld
    world = SimWorld(2)
    for rank in range(2):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=world.comm(rank))
        with pytest.warns(RuntimeWarning, match="world size 3.*reset"):
            opt.load_state_dict(states[rank])
        assert len(worker_residuals(opt.engine)) == 0


def test_mismatched_parameters_across_ranks_is_a_clear_error():
    def worker(rank, comm):
        model = digits.make_model(hidden=128 if rank == 0 else 64)
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm)
        x, y, _, _ = digits.load_digits_split()
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
    with pytest.raises(ConsistencyError, match=r"parameters differ between rank \d and rank \d.*0\.weight"):
        hvd_qadam.simulate(2, worker, timeout=60)


def test_mismatched_configuration_across_ranks_is_a_clear_error():
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, bits=4 + rank)
        x, y, _, _ = digits.load_digits_split()
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
    with pytest.raises(ConsistencyError, match="configuration differs.*uplink"):
        hvd_qadam.simulate(2, worker, timeout=60)


def test_bytes_counter_counts_real_frame_bytes():
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, bits=4,
                                             bucket_size=512, min_compress_numel=1024, topology="allgather")
        x, y, _, _ = digits.load_digits_split()
        torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        opt.step()
        return opt.communication_stats
    stats = hvd_qadam.simulate(3, worker)[0]
    from hvd_qadam.wire import FRAME_HEADER_SIZE, HEADER_SIZE
    big = 64 * 128 + 128 * 128 + 128 * 10           # fused compressed buffer
    small = 128 + 128 + 10                          # biases, uncompressed fp32
    # the compressed group: one frame, allgathered to each of the 2 peers; the small tensors'
    # group in fp32 through Horovod's allreduce: a ring's 2 (N - 1)/N x 4 bytes per element
    frame = FRAME_HEADER_SIZE + HEADER_SIZE + 8 + 4 * -(-big // 512) + big * 4 // 8
    assert stats.sent_bytes == 2 * frame + 8 * 2 * small // 3
    assert stats.received_bytes == 2 * frame + 8 * 2 * small // 3
    assert stats.group_paths == {0: "qsgdinf:4", 1: "horovod"} or stats.group_paths == {1: "qsgdinf:4", 0: "horovod"}
    assert stats.fp32_bytes == 8 * 2 * big // 3 + 8 * 2 * small // 3     # Horovod's ring: 2 (N - 1)/N x 4 bytes
    assert 4.5 < stats.ratio < 5.5


def test_warmup_steps_send_fp32_then_compress():
    def worker(rank, comm):
        model = digits.make_model()
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=comm, warmup_steps=2)
        x, y, _, _ = digits.load_digits_split()
        sent = []
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
            opt.step()
            sent.append(opt.communication_stats.sent_bytes)
        return sent
    sent = hvd_qadam.simulate(2, worker)[0]
    # fp32 for the warm-up through Horovod's allreduce (N = 2: a ring sends 4 bytes per element),
    # then the default 6-bit codes (6.25 bits per element with bucket 128)
    assert sent[0] == sent[1] == 4 * 26122 and sent[2] < sent[0] / 4.5


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 9}, "bits in 2..8"), ({"bits": 1}, "bits in 2..8"), ({"quantizer": "sign", "bits": 2}, "always uses 1"),
    ({"quantizer": "qsgd7"}, "unknown quantizer"), ({"algorithm": "adamw"}, "unknown algorithm"),
    ({"topology": "ring"}, "unknown topology"), ({"bucket_size": 0}, "bucket_size"),
    ({"nonfinite": "ignore"}, "nonfinite"), ({"backward_passes_per_step": 0}, "backward_passes_per_step"),
    ({"rounding": "up"}, "rounding"), ({"downlink_quantizer": "qsgd", "downlink_bits": 12}, "bits in 2..8"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
    from hvd_qadam.comm import SimWorld
    model = digits.make_model()
    with pytest.raises((ValueError, TypeError), match=match):
        hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=SimWorld(1).comm(0),
                                       **kwargs)


@pytest.mark.parametrize("kwargs,up,down", [
    ({}, 128, None), ({"quantizer": "sign"}, 512, None),
    ({"algorithm": "qadam", "downlink_quantizer": "sign"}, 128, 512),
    ({"algorithm": "qadam", "downlink_quantizer": "qsgdinf", "bucket_size": 64}, 64, 64),
    ({"algorithm": "qadam", "downlink_quantizer": "qsgdinf", "downlink_bucket_size": 32}, 128, 32),
])
def test_default_bucket_sizes(kwargs, up, down):
    """bucket_size=None: 128 elements per scale (512 for the 1-bit sign); the downlink follows
    an explicit uplink size, else its own quantizer's default."""
    from hvd_qadam.comm import SimWorld
    model = digits.make_model()
    opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), comm=SimWorld(1).comm(0),
                                         **kwargs)
    assert opt.config.uplink.bucket_size == up
    if down is not None:
        assert opt.config.downlink.bucket_size == down


def test_named_parameters_must_be_unique_and_complete():
    from hvd_qadam.comm import SimWorld
    model = digits.make_model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="unique"):
        hvd_qadam.DistributedOptimizer(base_optimizer(model), [("w", p) for _, p in named], comm=SimWorld(1).comm(0))
    with pytest.raises(ValueError, match="does not cover"):
        hvd_qadam.DistributedOptimizer(base_optimizer(model), named[:2], comm=SimWorld(1).comm(0))


def _float64_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()


@pytest.mark.parametrize("topology", ["allgather", "sharded"])
def test_float64_is_averaged_exactly_in_float64_when_uncompressed(topology):
    """Horovod averages float64 gradients in float64. Uncompressed (quantizer="none"), so does
    hvd_qadam: float64 buffers, float64 values on the wire, a float64 mean, no warning. The
    averaged gradient is bit-identical to summing the ranks' float64 gradients in rank order and
    dividing, which float32 anywhere on the way would break (the inputs are not float32-exact)."""
    world = 3
    x_all = torch.randn(world, 8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    template = _float64_model()       # built here: torch's global seed is not per thread

    def worker(rank, comm):
        model = copy.deepcopy(template)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(), quantizer="none",
                                                 topology=topology, comm=comm)
        assert {g.dtype for g in opt.engine.layout.groups} == {torch.float64}
        opt.zero_grad()
        model(x_all[rank]).square().mean().backward()
        local = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.synchronize()
        averaged = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        with opt.skip_synchronize():
            opt.step()
        sent = opt.communication_stats.sent_bytes
        return local, averaged, {n: p.detach().clone() for n, p in model.named_parameters()}, sent

    results = hvd_qadam.simulate(world, worker)
    numel = sum(p.numel() for p in _float64_model().parameters())
    for name in results[0][0]:
        exact = results[0][0][name].clone()
        for r in range(1, world):
            exact += results[r][0][name]
        exact /= world
        assert not torch.equal(exact, exact.float().double()), "the test needs values float32 cannot hold"
        for r in range(world):
            assert results[r][1][name].dtype == torch.float64
            assert torch.equal(results[r][1][name], exact), f"rank {r} {name}: not the exact float64 average"
            assert torch.equal(results[r][2][name], results[0][2][name]), "replicas diverged"
    # 8 bytes per element went out (plus headers): float64 travelled as float64
    assert min(r[3] for r in results) >= (8 * numel if topology == "allgather" else 8 * numel * (world - 1) // world)


def test_float64_through_a_quantizer_is_said_at_construction_and_small_tensors_stay_exact():
    """Quantized float64 groups work from float32 (quantizer codes and scales), which the
    optimizer says once at construction, naming a parameter; the small tensors' uncompressed
    group (biases) stays float64. Gradients handed back keep the parameters' dtype."""
    from hvd_qadam.comm import SimWorld
    model = _float64_model()
    with pytest.warns(RuntimeWarning, match=r"1 float64 parameter\(s\) \(e.g. '0.weight'\)"):
        opt = hvd_qadam.DistributedOptimizer(base_optimizer(model), model.named_parameters(),
                                             comm=SimWorld(1).comm(0))
    dtypes = {s.name: g.dtype for g in opt.engine.layout.groups for s in g.slots}
    assert dtypes == {"0.weight": torch.float32, "0.bias": torch.float64, "2.weight": torch.float64,
                      "2.bias": torch.float64}
    x = torch.randn(8, 64, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(x).square().mean().backward()
    exact = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.synchronize()
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float64
        if n != "0.weight":
            assert torch.equal(p.grad, exact[n]), f"{n}: a world of one hands back its exact float64 gradient"
    assert not torch.equal(model[0].weight.grad, exact["0.weight"]), "the large weight travels quantized"
    with opt.skip_synchronize():
        opt.step()
    assert all(not torch.equal(p, b) and p.dtype == torch.float64 for p, b in zip(model.parameters(), before))
    with pytest.warns(RuntimeWarning, match="algorithm 'efficient_adam'"):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                       algorithm="efficient_adam", quantizer="none", comm=SimWorld(1).comm(0))
    model32 = digits.make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # float32 models: no such warning
        hvd_qadam.DistributedOptimizer(base_optimizer(model32), model32.named_parameters(), comm=SimWorld(1).comm(0))


def test_compression_objects_for_plain_horovod():
    t = torch.randn(3000, dtype=torch.float64)
    c, ctx = hvd_qadam.Compression.fp16.compress(t)
    assert c.dtype == torch.float16 and hvd_qadam.Compression.fp16.decompress(c, ctx).dtype == torch.float64
    sim = hvd_qadam.Compression.simulated("qsgd", 4, 512)
    a, ctx = sim.compress(t.float())
    b, _ = sim.compress(t.float())
    assert a.dtype == torch.float32 and a.shape == t.shape
    assert not torch.equal(a, b), "each call must draw a fresh random stream"
    levels = np.unique(np.round((a[:512] / a[:512].abs().max()).numpy(), 5))
    assert len(levels) <= 15
    with pytest.raises(ValueError, match="bits"):
        hvd_qadam.Compression.simulated("qsgd", 12)


@pytest.mark.parametrize("quantizer", ["alq", "amq"])
def test_adaptive_levels_agree_across_ranks_and_topologies(quantizer, assert_same_params):
    """Levels are refit from allgathered statistics at the scheduled steps: every rank and both
    topologies end bit-identical, and the learned codebook differs from the starting grid."""
    kw = dict(quantizer=quantizer, bits=3, bucket_size=128, min_compress_numel=256, level_schedule=(0, 2, 4),
              downlink_quantizer="none")

    def worker(rank, comm, topology):
        def mk(m):
            return hvd_qadam.DistributedOptimizer(base_optimizer(m), m.named_parameters(), comm=comm, topology=topology,
                                                  **kw)
        holder = {}
        model, _ = digits.train(rank, comm.size, mk, epochs=100, max_steps=6,
                                on_step=lambda s, o: holder.setdefault("opt", o))
        lv = holder["opt"].engine.uplink_levels
        return {n: p.detach().clone() for n, p in model.named_parameters()}, lv.codebook.copy(), lv.state_dict()
    a = hvd_qadam.simulate(3, lambda r, c: worker(r, c, "allgather"))
    s = hvd_qadam.simulate(3, lambda r, c: worker(r, c, "sharded"))
    from hvd_qadam.quant.codebooks import default_adaptive_codebook
    for r in range(3):
        assert_same_params(a[0][0], a[r][0], "allgather ranks")
        assert_same_params(a[0][0], s[r][0], "sharded vs allgather")
        assert np.array_equal(a[0][1], a[r][1]) and np.array_equal(a[0][1], s[r][1])
    assert not np.array_equal(a[0][1], default_adaptive_codebook(3)), "levels were never refit"
    for key, value in a[0][2].items():   # the level state (checkpointed) is the same on every rank
        assert np.array_equal(np.asarray(value), np.asarray(a[1][2][key])), key
