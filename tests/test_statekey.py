"""State keys (:mod:`hvd_qadam.statekey`): the names of the engine's state in ``state_dict()``
are the checkpoint format, so they must not change, and every one of them must parse back."""
import warnings

import pytest
import torch

import hvd_qadam
from hvd_qadam.algorithms import OnebitAdam
from hvd_qadam.memory import StateBank
from hvd_qadam.statekey import ANCHOR, RESIDUAL, StateKey

from harness import digits

# Runs of 8 steps of digits training: (world size, ranks per host, base optimizer, options).
RUNS = {
    "qsgd-allgather": (3, 1, "adam", dict(min_compress_numel=256)),
    "qadam-sharded": (3, 1, "adam", dict(algorithm="qadam", topology="sharded", downlink_quantizer="qsgd",
                                         downlink_bits=8, min_compress_numel=256, bucket_size=128)),
    "qadam_weights-allgather": (2, 1, "adam", dict(algorithm="qadam_weights", downlink_quantizer="qsgdinf",
                                                   downlink_bits=8, min_compress_numel=256)),
    "efficient_adam-hierarchical": (4, 2, "adam", dict(algorithm="efficient_adam", topology="hierarchical",
                                                       downlink_quantizer="qsgd", downlink_bits=4,
                                                       min_compress_numel=256, bucket_size=128)),
    "ef_sgd-sharded": (2, 1, "sgd", dict(algorithm="ef_sgd", topology="sharded", quantizer="sign", bits=None,
                                         downlink_quantizer="sign", min_compress_numel=256)),
    "local_sgd-allgather": (2, 1, "sgd", dict(algorithm="local_sgd", sync_every=2, min_compress_numel=256)),
    "onebit_adam-auto-sharded": (3, 1, "adam", dict(algorithm="onebit_adam", freeze_step="auto", quantizer="sign",
                                                    bits=None, downlink_quantizer="sign", topology="sharded",
                                                    bucket_size=64, min_compress_numel=256)),
}

# What these runs wrote into state_dict()["hvd_qadam"] per rank before the keys were typed
# (state, counters["worker_adam_step"], counters["server_adam_step"]): the checkpoint format.
BEFORE = {
    "qsgd-allgather": [
        (["g0.e", "g0@0.e"],
         [], []),
        (["g0.e", "g0@8704.e"],
         [], []),
        (["g0.e", "g0@17408.e"],
         [], []),
    ],
    "qadam-sharded": [
        (["g0.e", "g0@0.e", "g0@0.m", "g0@0.v", "g1@0.m", "g1@0.v"],
         [], ["g0@0", "g1@0"]),
        (["g0.e", "g0@8704.e", "g0@8704.m", "g0@8704.v", "g1@128.m", "g1@128.v"],
         [], ["g0@8704", "g1@128"]),
        (["g0.e", "g0@17408.e", "g0@17408.m", "g0@17408.v", "g1@256.m", "g1@256.v"],
         [], ["g0@17408", "g1@256"]),
    ],
    "qadam_weights-allgather": [
        (["g0.e", "g0@0.m", "g0@0.v", "g0@0.x", "g1@0.m", "g1@0.v", "g1@0.x"],
         [], ["g0@0", "g1@0"]),
        (["g0.e", "g0@0.m", "g0@0.v", "g0@0.x", "g1@0.m", "g1@0.v", "g1@0.x"],
         [], ["g0@0", "g1@0"]),
    ],
    "efficient_adam-hierarchical": [
        (["g0#0.e", "g0.m", "g0.v", "g0@0.e", "g1.m", "g1.v"],
         ["g0", "g1"], []),
        (["g0#13056.e", "g0.m", "g0.v", "g0@13056.e", "g1.m", "g1.v"],
         ["g0", "g1"], []),
        (["g0#0.e", "g0.m", "g0.v", "g0@6528.e", "g1.m", "g1.v"],
         ["g0", "g1"], []),
        (["g0#13056.e", "g0.m", "g0.v", "g0@19584.e", "g1.m", "g1.v"],
         ["g0", "g1"], []),
    ],
    "ef_sgd-sharded": [
        (["g0.buf", "g0.e", "g0@0.e", "g1.buf"],
         [], []),
        (["g0.buf", "g0.e", "g0@13312.e", "g1.buf"],
         [], []),
    ],
    "local_sgd-allgather": [
        (["g0.anchor", "g0.e", "g1.anchor"],
         [], []),
        (["g0.anchor", "g0.e", "g1.anchor"],
         [], []),
    ],
    "onebit_adam-auto-sharded": [
        (["g0.e", "g0.m", "g0.v", "g0@0.e", "g1.m", "g1.v", "onebit.vnorm"],
         ["g0", "g1", "onebit.freeze_at"], []),
        (["g0.e", "g0.m", "g0.v", "g0@8640.e", "g1.m", "g1.v", "onebit.vnorm"],
         ["g0", "g1", "onebit.freeze_at"], []),
        (["g0.e", "g0.m", "g0.v", "g0@17280.e", "g1.m", "g1.v", "onebit.vnorm"],
         ["g0", "g1", "onebit.freeze_at"], []),
    ],
}


def _keys_of_run(name, monkeypatch):
    n, local, base, kw = RUNS[name]
    monkeypatch.setattr(OnebitAdam, "AUTO_WINDOW", 2)          # freeze within the 8 steps
    monkeypatch.setattr(OnebitAdam, "AUTO_TOLERANCE", 0.5)

    def worker(rank, comm):
        holder = {}

        def make(m):
            return hvd_qadam.DistributedOptimizer(digits.base_optimizer(m, base), m.named_parameters(), comm=comm,
                                                  **kw)
        digits.train(rank, comm.size, make, epochs=1000, max_steps=8, on_step=lambda s, opt: holder.update(opt=opt))
        sd = holder["opt"].state_dict()["hvd_qadam"]
        return (sorted(sd["state"]), sorted(sd["counters"]["worker_adam_step"]),
                sorted(sd["counters"]["server_adam_step"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return hvd_qadam.simulate(n, worker, local_size=local)


def test_every_key_written_before_round_trips():
    kinds = set()
    for runs in BEFORE.values():
        for state, worker_steps, server_steps in runs:
            for name in state + worker_steps + server_steps:
                key = StateKey.parse(name)
                assert key.name == name and str(key) == name and StateKey.parse(key.name) == key
                kinds.add(key.kind)
    # the runs hold every kind of state the algorithms keep
    assert {"e", "m", "v", "x", "buf", "anchor", "vnorm", "freeze_at", None} <= kinds


@pytest.mark.parametrize("name", list(RUNS))
def test_runs_write_the_same_keys_as_before_and_they_parse(name, monkeypatch):
    runs = _keys_of_run(name, monkeypatch)
    assert [tuple(r) for r in runs] == [tuple(r) for r in BEFORE[name]]
    for state, worker_steps, server_steps in runs:
        for n in state + worker_steps + server_steps:
            assert StateKey.parse(n).name == n


def test_what_a_key_is():
    e, he, se = StateKey.worker(0, RESIDUAL), StateKey.host(0, 256, RESIDUAL), StateKey.server(0, 512, RESIDUAL)
    assert (e.name, he.name, se.name) == ("g0.e", "g0#256.e", "g0@512.e")
    assert e.is_residual and he.is_residual and se.is_residual
    assert e.is_worker_residual and he.is_worker_residual and not se.is_worker_residual
    assert he.is_host_residual and not e.is_host_residual and not se.is_host_residual
    assert se.is_server_state and not e.is_server_state and not he.is_server_state
    m = StateKey.server(3, 512).of("m")
    assert m.name == "g3@512.m" and m.is_server_state and not m.is_residual and m.owner.name == "g3@512"
    assert StateKey.worker(2, ANCHOR).is_anchor and not StateKey.worker(2, "m").is_anchor
    assert StateKey.scoped("onebit", "vnorm").name == "onebit.vnorm"
    assert StateKey.parse("onebit.vnorm") == StateKey.scoped("onebit", "vnorm")


@pytest.mark.parametrize("bad", ["", "g", "g0.", "g01.e", "g0@01.e", "g0@1#2.e", "g-1.e", "g0@x.e", "g0.e.f",
                                 "0.e", "g0 .e", "onebit", "g0@512.m "])
def test_names_that_are_not_keys_are_refused(bad):
    with pytest.raises(ValueError, match="not an hvd_qadam state key"):
        StateKey.parse(bad)


def test_invalid_keys_cannot_be_built():
    with pytest.raises(ValueError):
        StateKey.server(0, 0, "e").__class__(0, "e", shard=0, host_chunk=0)
    with pytest.raises(ValueError):
        StateKey.worker(-1, "e")
    with pytest.raises(ValueError):
        StateKey.scoped("g3", "m")                  # would read back as group 3's
    with pytest.raises(ValueError):
        StateKey.worker(0, "a.b")


def test_bank_takes_typed_keys_and_refuses_unknown_names_in_a_checkpoint():
    bank = StateBank()
    bank.set(StateKey.worker(0, RESIDUAL), torch.ones(3))
    bank.set(StateKey.server(0, 4, "m"), torch.ones(2))
    assert sorted(bank.current) == ["g0.e", "g0@4.m"]
    assert bank.get("g0.e") is bank.get(StateKey.worker(0, RESIDUAL))      # a name is read as its key
    with pytest.raises(ValueError, match="not an hvd_qadam state key"):
        bank.set("g0:e", torch.ones(3))
    bank.clear(lambda k: k.is_server_state)
    assert list(bank.current) == ["g0.e"]
    with pytest.raises(ValueError, match="'g0:e' is not an hvd_qadam state key"):
        bank.load_state_dict({"g0.e": torch.zeros(3), "g0:e": torch.zeros(3)})
    assert list(bank.current) == ["g0.e"]           # nothing was loaded
