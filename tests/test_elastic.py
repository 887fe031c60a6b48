"""Elastic training: the compression state through commit / restore / sync and resizes.

Simulated ranks check the state rules exactly (a rollback is exact; server shards re-partitioned
over a smaller world continue bit for bit like the unsharded run); real ``horovodrun`` jobs under
Horovod's Gloo controller check the launch modes and a real resize (2 -> 3 -> 2 ranks).
"""
import json
import os
import sys

import pytest
import torch

from harness import digits
import hvd_qadam
from harness import launch
from hvd_qadam import elastic

HERE = os.path.dirname(os.path.abspath(__file__))
GLOBAL_BATCH = 30          # divisible by 2 and 3: the same global batch in every world


def _batch(x, step, rank, size):
    i = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH) % len(x)
    per = GLOBAL_BATCH // size
    return i[rank * per:(rank + 1) * per]


def _train(model, opt, data, start, stop, rank, size):
    x, y = data
    for s in range(start, stop):
        i = _batch(x, s, rank, size)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()


def _build(comm, kwargs):
    model = digits.make_model(seed=0)
    opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm, **kwargs)
    return model, opt


SHARDED = {"algorithm": "qadam", "topology": "sharded", "downlink_quantizer": "qsgdinf", "downlink_bits": 4,
           "bucket_size": 128}


@pytest.mark.parametrize("kwargs", [SHARDED, {"algorithm": "efficient_adam", "topology": "sharded"},
                                    {"algorithm": "qsgd"}], ids=["qadam-sharded", "efficient_adam-sharded", "qsgd"])
def test_elastic_rollback_restores_exactly_the_committed_state(kwargs):
    """commit at step 4, 3 more steps, restore: the bank, counters and weights are the commit's,
    and the run goes on exactly as if the 3 steps never happened."""
    data = digits.load_digits_split()[:2]

    def worker(rank, comm):
        def run(rollback):
            model, opt = _build(comm, kwargs)
            _train(model, opt, data, 0, 4, rank, comm.size)
            saved_model = {k: v.clone() for k, v in model.state_dict().items()}
            saved = elastic.elastic_state_dict(opt)
            committed_bank = {k: v.clone() for k, v in opt.engine.bank.current.items()}
            if rollback:
                _train(model, opt, data, 4, 7, rank, comm.size)
                assert opt.engine.step_count == 7
                model.load_state_dict(saved_model)
                elastic.load_elastic_state_dict(opt, saved)
                assert opt.engine.step_count == 4
                bank = opt.engine.bank.current
                assert bank.keys() == committed_bank.keys()
                for k in bank:
                    assert torch.equal(bank[k], committed_bank[k]), k
            _train(model, opt, data, 4, 9, rank, comm.size)
            return {n: p.detach().clone() for n, p in model.named_parameters()}
        return run(False), run(True)

    for plain, rolled in hvd_qadam.simulate(3, worker):
        for n in plain:
            assert torch.equal(plain[n], rolled[n]), n


def _shrink(kwargs, steps_before=5, steps_after=4):
    """3 simulated ranks train and commit; rank 2 is lost; ranks 0 and 1 restore their commits in a
    2-rank world and go on. Returns (params of rank 0, how the server state was rebuilt, the
    server-state norm committed and installed)."""
    data = digits.load_digits_split()[:2]
    saved = {}

    def first(rank, comm):
        model, opt = _build(comm, kwargs)
        _train(model, opt, data, 0, steps_before, rank, comm.size)
        saved[rank] = ({k: v.clone() for k, v in model.state_dict().items()}, elastic.elastic_state_dict(opt))
        _train(model, opt, data, steps_before, steps_before + 1, rank, comm.size)   # lost with the failure

    hvd_qadam.simulate(3, first)
    how = {}
    original = elastic.reshard

    def recorded(opt, everyone):
        how[opt.engine.rank] = original(opt, everyone)
        return how[opt.engine.rank]

    def second(rank, comm):
        model, opt = _build(comm, kwargs)
        model.load_state_dict(saved[rank][0])
        elastic.load_elastic_state_dict(opt, saved[rank][1])
        _train(model, opt, data, steps_before, steps_before + steps_after, rank, comm.size)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, opt

    elastic.reshard = recorded
    try:
        results = hvd_qadam.simulate(2, second)
    finally:
        elastic.reshard = original
    return results, how, saved


def test_elastic_sharded_server_state_repartitioned_over_a_smaller_world_exactly():
    """A sharded qadam run (server moments and server residuals on 3 ranks) loses rank 2 after a
    commit; ranks 0 and 1 restore and cut their new shards from the committed whole: they go on
    bit for bit like the allgather run (which holds the whole server state on every rank)."""
    sharded, how, saved = _shrink(SHARDED)
    assert how == {0: "committed", 1: "committed"}       # rank 2's shard exists only in the commits
    unsharded, how_all, _ = _shrink(dict(SHARDED, topology="allgather"))
    assert how_all == {0: "live", 1: "live"}             # every rank holds the whole server state
    for (p_sharded, _), (p_all, _) in zip(sharded, unsharded):
        for n in p_all:
            assert torch.equal(p_sharded[n], p_all[n]), n
    # the commit held the whole server state, and each new shard is its slice
    whole = saved[0][1]["hvd_qadam"]["elastic_server"]
    assert whole["complete"] and whole["step"] == 5
    assert {s for _, s in whole["values"]} == {"m", "v", "e"}
    # every rank kept its own worker residual through the restore (rank 1's differs from rank 0's)
    e0 = saved[0][1]["hvd_qadam"]["state"]["g0.e"]
    e1 = saved[1][1]["hvd_qadam"]["state"]["g0.e"]
    assert float(e0.norm()) > 0 and not torch.equal(e0, e1)


def test_elastic_reset_instead_of_repartition_changes_the_run():
    """The comparison the repartition is for: dropping the server state at the resize (the
    behaviour of a plain checkpoint load on another world size) gives another trajectory."""
    kept, _, _ = _shrink(SHARDED)
    original = elastic.reshard

    def drop(opt, everyone):  # noqa: ARG001
        elastic.install(opt._engine, None)
        return "reset"
    elastic.reshard = drop
    try:
        dropped, _, _ = _shrink(SHARDED)
    finally:
        elastic.reshard = original
    assert any(not torch.equal(kept[0][0][n], dropped[0][0][n]) for n in kept[0][0])


# ----------------------------------------------------------------------------- real horovodrun jobs

def _need_horovodrun():
    why = launch.horovodrun_gloo_missing()
    if why:
        pytest.skip(why)


def _result(stdout: str, tag: str) -> dict:
    for line in stdout.splitlines():
        if tag in line:
            return json.loads(line[line.index(tag) + len(tag):])
    raise AssertionError(f"no {tag} line in the output:\n{stdout[-6000:]}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("topology", ["allgather", "sharded"])
def test_gloo_horovodrun_trains_with_identical_replicas(topology):
    """``horovodrun -np 3 --gloo`` (no mpirun): Horovod's Gloo controller runs hvd_qadam's
    collectives; the replicas end identical, the loss decreases; topology="ps" is refused."""
    _need_horovodrun()
    cmd = launch.horovodrun_gloo_command(3, sys.executable, os.path.join(HERE, "mpi", "gloo_train.py"),
                                         "--topology", topology, "--steps", "30")
    proc = launch.run_job(cmd, 200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    res = _result(proc.stdout, "GLOO_RESULT ")
    assert res["size"] == 3 and res["gloo"] and not res["mpi"]
    assert len(set(res["digests"])) == 1, res
    assert res["last_loss"] < 0.7 * res["first_loss"], res
    assert res["ps_refused"] and "needs MPI" in res["ps_refused"], res


def _elastic_run(tmp_path, name: str, *script_args: str, timeout: float = 150) -> list:
    """One ``horovodrun`` elastic job on localhost (2 slots at first; the script resizes it through
    the file the discovery script prints). Returns rank 0's events."""
    _need_horovodrun()
    hosts = launch.ElasticHosts(tmp_path, name)
    events = tmp_path / f"{name}.events"
    # gloo_timeout 10 s: how long Gloo waits for a peer that died before Horovod gives up
    cmd = hosts.command(2, 2, 3, sys.executable, os.path.join(HERE, "mpi", "elastic_train.py"),
                        "--slots-file", hosts.slots, "--events-file", str(events), *script_args, gloo_timeout=10)
    env = launch.job_env({"HVD_QADAM_TIMEOUT": "60", "HVD_QADAM_TIMEOUT_EXIT_GRACE": "2"})
    proc = launch.run_job(cmd, timeout, env=env)
    out = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"elastic job {name} failed ({proc.returncode}):\n{out}"
    assert events.exists(), out
    return [json.loads(line) for line in events.read_text().splitlines()]


@pytest.mark.timeout(480)
def test_elastic_horovodrun_resize_2_3_2_keeps_compression_state(tmp_path):
    """A real elastic job grows from 2 to 3 ranks at step 30 and shrinks back at step 70: with the
    one-line swap it trains through both resizes, every replica is identical after each reset,
    the sharded server state is carried over (live at the growth, from the commit at the
    shrink), and the final loss is within 2 % of hvd.DistributedOptimizer on the same schedule.
    The same job dropping the compression state at each reset is run for comparison."""
    results = {}
    for name, args in [("horovod", ["--impl", "horovod"]), ("keep", ["--impl", "hvd_qadam"]),
                       ("reset", ["--impl", "hvd_qadam", "--state", "reset"])]:
        events = _elastic_run(tmp_path, name, *args)
        steps = [e for e in events if e["event"] != "resets"]
        assert [(e["event"], e["step"], e["size"]) for e in steps if e["event"] == "start"] == \
            [("start", 0, 2), ("start", 30, 3), ("start", 70, 2)], events
        assert all(e["identical"] for e in steps), [e for e in steps if not e["identical"]]
        assert [e["step"] for e in steps if e["event"] == "after_start"] == [1, 2, 31, 32, 71, 72]
        assert steps[-1]["event"] == "end" and steps[-1]["step"] == 100
        results[name] = {"events": events, "final_loss": steps[-1]["loss"]}
    resets = next(e for e in results["keep"]["events"] if e["event"] == "resets")["resets"]
    assert [(r["step"], r["size"], r["server_state"]) for r in resets] == \
        [(0, 2, "none"), (30, 3, "live"), (70, 2, "committed")], resets
    ref = results["horovod"]["final_loss"]
    summary = {k: v["final_loss"] for k, v in results.items()}
    print("ELASTIC_FINAL_LOSS " + json.dumps(summary))
    assert abs(results["keep"]["final_loss"] - ref) <= 0.02 * ref, summary
    # the comparison run also trains through the resizes (it only forgets the compression state)
    assert results["reset"]["final_loss"] < 0.5 * results["reset"]["events"][0]["loss"], summary


@pytest.mark.timeout(360)
def test_elastic_worker_killed_mid_exchange_rolls_back_to_the_commit(tmp_path):
    """The third rank (on a host of its own for Horovod's driver, 127.0.0.1) exits while the others
    wait for its payloads at step 35: they get HorovodInternalError from optimizer.step() within
    Gloo's timeout (10 s here; not hvd_qadam's 300 s deadline), roll back to the commit of step 30
    and go on as 2 ranks, with the server shards cut from that commit. The run then equals, bit for
    bit, the run whose third rank left gracefully at step 30: the rollback restored exactly the
    committed compression state."""
    common = ["--impl", "hvd_qadam", "--steps", "60", "--extra-host", "127.0.0.1"]
    failed = _elastic_run(tmp_path, "failed", *common, "--schedule", "20:3", "--die-at", "35",
                          "--die-marker", str(tmp_path / "died"))
    graceful = _elastic_run(tmp_path, "graceful", *common, "--schedule", "20:3,30:2")
    errors = [e for e in failed if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["type"] == "HorovodInternalError" and errors[0]["step"] == 35, errors
    assert errors[0]["seconds"] < 30, errors
    for events in (failed, graceful):
        steps = [e for e in events if e["event"] not in ("resets", "error")]
        assert all(e["identical"] for e in steps), [e for e in steps if not e["identical"]]
        assert [(e["step"], e["size"]) for e in steps if e["event"] == "start"] == [(0, 2), (20, 3), (30, 2)]
        resets = next(e for e in events if e["event"] == "resets")["resets"]
        assert [(r["step"], r["size"], r["server_state"]) for r in resets] == \
            [(0, 2, "none"), (20, 3, "live"), (30, 2, "committed")], resets
    end_failed = next(e for e in failed if e["event"] == "end")
    end_graceful = next(e for e in graceful if e["event"] == "end")
    assert end_failed["step"] == end_graceful["step"] == 60
    assert end_failed["digest"] == end_graceful["digest"], (end_failed, end_graceful)
