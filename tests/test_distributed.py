"""Real MPI ranks (mpirun, oversubscribed): the distributed run equals the simulator bit for bit,
every rank ends identical, and bad input fails everywhere with a clear error instead of hanging."""
import json
import re

import pytest
import torch

from conftest import run_mpi

# Short deadlines so that every fault case ends within seconds (the defaults are minutes).
FAULT_ENV = {"HVD_QADAM_TIMEOUT": "8", "HVD_QADAM_TIMEOUT_EXIT_GRACE": "2"}
# The ps server's deadline also covers the workers' start-up (their first message), which takes
# longer than 8 s on a loaded machine.
PS_FAULT_ENV = {"HVD_QADAM_TIMEOUT": "25", "HVD_QADAM_TIMEOUT_EXIT_GRACE": "2"}
from conftest import assert_same_params, sim_train

CASES = [
    (2, "adam", {}),                                                     # 4-bit QSGD + EF, allgather
    (3, "adam", {}),
    (3, "adam", {"algorithm": "efficient_adam", "topology": "sharded", "bucket_size": 128,
                 "downlink_quantizer": "qsgd", "downlink_bits": 4}),
    (2, "sgd", {"algorithm": "ef_sgd", "topology": "sharded", "quantizer": "sign", "bits": None,
                "downlink_quantizer": "sign"}),
]


@pytest.mark.parametrize("np_,base,kwargs", CASES, ids=["qsgd-np2", "qsgd-np3", "efficient_adam-sharded-np3",
                                                         "ef_sgd-sign-sharded-np2"])
def test_mpi_run_equals_simulator_bit_for_bit(np_, base, kwargs, tmp_path):
    out = tmp_path / "params.pt"
    run_mpi(np_, "train_ranks.py", "--out", str(out), "--steps", "6", "--base", base, "--kwargs", json.dumps(kwargs))
    res = torch.load(out)
    assert res["size"] == np_
    assert len(res["digests"]) == np_ and len(set(res["digests"])) == 1, "ranks ended with different weights"
    sim = sim_train(np_, 6, base, **kwargs)
    assert_same_params(res["params"], sim[0], f"mpirun -np {np_} vs simulator")


def _ranks(stdout: str, what: str) -> dict:
    # Lines of different ranks can arrive interleaved without a newline between them.
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(rf"RANK (\d+) {what}(.*?)(?=RANK \d+ |$)", stdout, re.M)}


# hierarchical:L runs the two-level exchange with hosts of L ranks (HVD_QADAM_LOCAL_SIZE): with
# L = 3 the bad rank's host peers hear of it in the host exchange, with L = 1 in the uplink.
def _topology_env(topology: str, env: dict | None = None) -> tuple:
    name, _, local = topology.partition(":")
    return name, dict(env or {}, **({"HVD_QADAM_LOCAL_SIZE": local} if local else {}))


@pytest.mark.parametrize("topology", ["allgather", "sharded", "hierarchical:3", "hierarchical:1"])
def test_mpi_nonfinite_gradient_fails_on_every_rank_with_state_untouched(topology):
    topology, env = _topology_env(topology)
    proc = run_mpi(3, "failures.py", "nan", "--topology", topology, check=False, timeout=120, env=env)
    errors = _ranks(proc.stdout, "ERROR")
    assert proc.returncode != 0
    assert sorted(errors) == [0, 1, 2], proc.stdout + proc.stderr
    for r, msg in errors.items():
        assert "NonFiniteGradientError" in msg and "rank 1, step 3" in msg and "0.weight (0 NaN, 1 Inf)" in msg, msg
        assert "step_count=3" in msg, msg      # the failed step was not counted
        assert "residual_norm=0 " not in msg   # residuals of the 3 good steps are still there


def test_mpi_mismatched_parameters_fail_fast():
    proc = run_mpi(2, "failures.py", "params", check=False, timeout=120)
    errors = _ranks(proc.stdout, "ERROR")
    assert proc.returncode != 0 and sorted(errors) == [0, 1], proc.stdout + proc.stderr
    assert all("ConsistencyError" in m and "parameters differ" in m for m in errors.values())


def test_mpi_mismatched_configuration_fails_fast():
    proc = run_mpi(2, "failures.py", "config", check=False, timeout=120)
    errors = _ranks(proc.stdout, "ERROR")
    assert proc.returncode != 0 and sorted(errors) == [0, 1], proc.stdout + proc.stderr
    assert all("configuration differs" in m and "bits" in m for m in errors.values())


@pytest.mark.parametrize("topology", ["allgather", "sharded", "ps"])
def test_mpi_dead_rank_ends_the_job_in_bounded_time(topology):
    import time
    t0 = time.time()
    proc = run_mpi(3, "failures.py", "dead", "--topology", topology, check=False, timeout=120,
                   env=PS_FAULT_ENV if topology == "ps" else FAULT_ENV)
    took = time.time() - t0
    assert "RANK 1 DYING" in proc.stdout and "FINISHED" not in proc.stdout
    assert proc.returncode == 17, (proc.returncode, proc.stderr[-2000:])      # the dying rank's own code
    assert re.search(r"Exit code:\s+17", proc.stderr), proc.stderr[-2000:]
    assert took < 60, took


PS_CASES = [
    ("adam", {"algorithm": "qadam", "downlink_quantizer": "qsgd", "downlink_bits": 8}),
    ("adam", {"algorithm": "efficient_adam", "downlink_quantizer": "qsgd", "downlink_bits": 4}),
    ("adam", {"algorithm": "qadam_weights", "downlink_quantizer": "qsgdinf", "downlink_bits": 8}),
    # the server runs local SGD's finish too (its anchors start from the weights the workers send)
    ("sgd", {"algorithm": "local_sgd", "sync_every": 2}),
]


@pytest.mark.parametrize("base,kwargs", PS_CASES, ids=[c[1]["algorithm"] for c in PS_CASES])
def test_mpi_parameter_server_equals_simulator_bit_for_bit(base, kwargs, tmp_path):
    """3 workers + 1 server rank (mpirun -np 4); state_dict() also fetches the server's state."""
    out = tmp_path / "ps.pt"
    run_mpi(4, "train_ps.py", "--out", str(out), "--steps", "6", "--checkpoint-at", "3", "--base", base,
            "--kwargs", json.dumps(kwargs))
    res = torch.load(out)
    assert res["size"] == 3 and len(set(res["digests"])) == 1
    assert res["has_server_state"]
    stats = res["stats"]
    assert 0 < stats["sent_bytes"] < stats["fp32_bytes"] / 4.5    # the default 6-bit uplink
    sim = sim_train(3, 6, base, **kwargs)
    assert_same_params(res["params"], sim[0], "ps vs simulator")


# Four ranks and more: every group compressed (min_compress_numel=0), since full-precision groups
# go through Horovod's allreduce, whose summation order is MPI's (from 4 ranks it is not rank
# order); test_mpi_allreduce_path_matches_the_simulator_to_rounding covers those.
ALL_COMPRESSED = {"min_compress_numel": 0}


@pytest.mark.parametrize("local_size,kwargs", [
    (2, {"hierarchical": True, **ALL_COMPRESSED}),                      # the defaults, two levels
    (2, {"algorithm": "qadam", "topology": "hierarchical", "bucket_size": 64, "downlink_bits": 4, **ALL_COMPRESSED}),
    (4, {"algorithm": "efficient_adam", "topology": "hierarchical", "quantizer": "sign", **ALL_COMPRESSED}),
], ids=["defaults-2x2", "qadam-2x2", "efficient_adam-sign-1x4"])
def test_mpi_hierarchical_four_ranks_equals_simulator(local_size, kwargs, tmp_path):
    """Four real ranks as hosts of ``local_size`` (HVD_QADAM_LOCAL_SIZE): the two-level exchange
    equals the simulator's hosts bit for bit, and every rank ends identical."""
    out = tmp_path / "params.pt"
    run_mpi(4, "train_ranks.py", "--out", str(out), "--steps", "4", "--kwargs", json.dumps(kwargs),
            env={"HVD_QADAM_LOCAL_SIZE": str(local_size)})
    res = torch.load(out)
    assert len(set(res["digests"])) == 1
    assert_same_params(res["params"], sim_train(4, 4, local_size=local_size, **kwargs)[0],
                       f"hierarchical {4 // local_size}x{local_size} vs simulator")


def test_mpi_sharded_four_ranks_equals_simulator(tmp_path):
    kwargs = {"algorithm": "qadam", "topology": "sharded", "bucket_size": 64, "downlink_quantizer": "qsgd",
              "downlink_bits": 4, **ALL_COMPRESSED}
    out = tmp_path / "params.pt"
    run_mpi(4, "train_ranks.py", "--out", str(out), "--steps", "4", "--kwargs", json.dumps(kwargs))
    res = torch.load(out)
    assert len(set(res["digests"])) == 1
    assert_same_params(res["params"], sim_train(4, 4, **kwargs)[0], "sharded np4 vs simulator")


@pytest.mark.parametrize("kwargs", [{"exchange": "horovod", "topology": "sharded"},
                                    {"warmup_steps": 2, "algorithm": "efficient_adam", "topology": "sharded"}],
                         ids=["exchange-horovod", "efficient_adam-warmup"])
def test_mpi_allreduce_path_matches_the_simulator_to_rounding(kwargs, tmp_path):
    """Full precision through Horovod's allreduce under mpirun -np 4: every rank ends identical
    (the allreduce gives every rank the same sum), and the trajectory is the simulator's up to
    the rounding of MPI's summation order."""
    out = tmp_path / "params.pt"
    run_mpi(4, "train_ranks.py", "--out", str(out), "--steps", "4", "--kwargs", json.dumps(kwargs))
    res = torch.load(out)
    assert len(set(res["digests"])) == 1, "ranks ended with different weights"
    sim = sim_train(4, 4, **kwargs)[0]
    for n, p in res["params"].items():
        assert torch.allclose(p, sim[n], rtol=0, atol=1e-5), f"{n}: max |diff| {float((p - sim[n]).abs().max())}"


@pytest.mark.parametrize("topology", ["allgather", "ps"])
def test_mpi_float64_uncompressed_is_averaged_in_float64_like_the_simulator(topology, tmp_path):
    """A float64 model with quantizer="none" under real Horovod (and the ps server): float64 values
    on the wire, the simulator's float64 trajectory (whose average is the exact float64 mean,
    tests/test_engine.py; bit for bit under ps), identical replicas."""
    out = tmp_path / "params.pt"
    kwargs = {"quantizer": "none"}
    if topology == "ps":
        run_mpi(4, "train_ps.py", "--out", str(out), "--steps", "4", "--float64", "--kwargs", json.dumps(kwargs))
        size = 3
    else:
        run_mpi(3, "train_ranks.py", "--out", str(out), "--steps", "4", "--float64", "--kwargs", json.dumps(kwargs))
        size = 3
    res = torch.load(out)
    assert res["size"] == size and len(set(res["digests"])) == 1, "ranks ended with different weights"
    assert all(p.dtype == torch.float64 for p in res["params"].values())
    sim = sim_train(size, 4, dtype=torch.float64, topology=topology if topology != "ps" else "allgather", **kwargs)
    if topology == "ps":
        assert_same_params(res["params"], sim[0], f"{topology} float64 vs simulator")
        return
    # Through Horovod's allreduce, in float64: MPI sums in its own order, so the trajectory is the
    # simulator's to float64 rounding (1e-12 here; a float32 average would differ by ~1e-8).
    for n, p in res["params"].items():
        assert float((p - sim[0][n]).abs().max()) < 1e-12, n


def test_ps_without_mpi_launch_refuses_clearly():
    import subprocess
    import sys
    code = "import hvd_qadam; hvd_qadam.ps_init()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, "HOROVOD_CONTROLLER": "gloo"})
    assert proc.returncode != 0
    assert "topology='ps' needs at least 2 MPI processes" in proc.stderr and "Gloo" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the fault suite: every case ends


@pytest.mark.parametrize("topology", ["allgather", "sharded", "ps", "hierarchical:3"])
def test_mpi_hung_peer_ends_the_job_within_the_deadline(topology):
    import time
    t0 = time.time()
    topology, env = _topology_env(topology, PS_FAULT_ENV if topology == "ps" else FAULT_ENV)
    proc = run_mpi(3, "failures.py", "hang", "--topology", topology, check=False, timeout=120, env=env)
    took = time.time() - t0
    assert "RANK 1 HANGING" in proc.stdout
    assert proc.returncode != 0 and "FINISHED" not in proc.stdout
    errors = _ranks(proc.stdout, "ERROR")
    if topology == "ps":
        # 2 workers + the server (rank 2): the live worker gives up waiting for the server's
        # answer, the server for the hung worker's step; both name what they waited for
        assert sorted(errors) == [0], proc.stdout + proc.stderr[-3000:]
        assert "CommError" in errors[0] and "parameter server" in errors[0], errors[0]
    else:
        assert sorted(errors) == [0, 2], proc.stdout + proc.stderr[-3000:]
        for msg in errors.values():
            assert "CollectiveTimeout" in msg and re.search(r"step \d", msg) and "collective 'hvd_qadam." in msg, msg
            assert "did not answer: 1" in msg, msg
    # deadline (8 s; 25 s for ps) + probe 2 s + exit grace 2 s + start-up; below the launch limit
    assert took < (90 if topology == "ps" else 60), took


@pytest.mark.parametrize("topology", ["allgather", "sharded", "hierarchical:3"])
def test_mpi_step_mismatch_is_a_consistency_error_not_a_hang(topology):
    topology, env = _topology_env(topology, FAULT_ENV)
    proc = run_mpi(3, "failures.py", "mismatch", "--topology", topology, check=False, timeout=90, env=env)
    errors = _ranks(proc.stdout, "ERROR")
    assert proc.returncode != 0 and sorted(errors) == [0, 1, 2], proc.stdout + proc.stderr[-3000:]
    for msg in errors.values():
        assert "ConsistencyError" in msg and "step" in msg and "disagree" in msg, msg


def test_mpi_ps_worker_clean_exit_ends_server_and_workers():
    import time
    t0 = time.time()
    proc = run_mpi(3, "failures.py", "exit", "--topology", "ps", check=False, timeout=90, env=PS_FAULT_ENV)
    assert "RANK 1 EXITING" in proc.stdout
    errors = _ranks(proc.stdout, "ERROR")
    assert 0 in errors and "exited" in errors[0], proc.stdout + proc.stderr[-3000:]
    assert proc.returncode != 0
    assert time.time() - t0 < 60


# ---------------------------------------------------------------- bf16 / fp16 models

LOW_PRECISION_CASES = [("bfloat16", "adam", {}), ("bfloat16", "adam", {"quantizer": "none"}),
                       ("float16", "sgd", {}), ("float16", "sgd", {"quantizer": "none"})]
_horovod_losses = {}


def _horovod_fp32_loss(base: str, steps: int, tmp_path) -> float:
    """The last epoch's loss of Horovod's own DistributedOptimizer on the float32 model (one
    run per base optimizer per pytest process)."""
    if base not in _horovod_losses:
        out = tmp_path / f"horovod-{base}.pt"
        run_mpi(3, "train_ranks.py", "--out", str(out), "--steps", str(steps), "--base", base, "--horovod")
        _horovod_losses[base] = torch.load(out)["loss"]
    return _horovod_losses[base]


@pytest.mark.parametrize("dtype,base,kwargs", LOW_PRECISION_CASES,
                         ids=["bf16-defaults", "bf16-none", "fp16-defaults", "fp16-none"])
def test_mpi_low_precision_model_keeps_its_dtype_and_sends_two_bytes(dtype, base, kwargs, tmp_path):
    """A bf16 (fp16) model under mpirun -np 3: every rank ends identical, in its dtype, equal bit
    for bit to the simulator (fp16: to rounding, its pass-throughs are summed by Horovod's
    allreduce), with a loss close to Horovod's in fp32, and the pass-through
    payloads (small tensors; everything with quantizer="none") at 2 bytes per element, read off
    each rank's communication_stats. fp16 trains with SGD (torch's Adam divides by
    sqrt(v) + 1e-8, and 1e-8 is 0 in float16)."""
    steps = 28
    out = tmp_path / "params.pt"
    run_mpi(3, "train_ranks.py", "--out", str(out), "--steps", str(steps), "--base", base, "--dtype", dtype,
            "--kwargs", json.dumps(kwargs))
    res = torch.load(out)
    assert res["size"] == 3 and len(set(res["digests"])) == 1, "ranks ended with different weights"
    assert all(p.dtype == getattr(torch, dtype) for p in res["params"].values())
    sim = sim_train(3, steps, base, dtype=getattr(torch, dtype), **kwargs)[0]
    if dtype == "bfloat16":
        assert_same_params(res["params"], sim, f"{dtype} mpirun -np 3 vs simulator")
    else:
        # fp16 pass-throughs go through Horovod's allreduce, summed in fp16 in MPI's order: the
        # simulator's trajectory to fp16 rounding (a few ulps of 2^-11 after 28 steps)
        for n, p in res["params"].items():
            assert float((p.float() - sim[n].float()).abs().max()) < 4e-3, n
    ref = _horovod_fp32_loss(base, steps, tmp_path)
    assert abs(res["loss"] - ref) < 0.02 + 0.05 * ref, (res["loss"], ref)
    for rank, stats in enumerate(res["stats"]):
        assert stats["passthrough_bytes_per_element"] == 2.0, (rank, stats)
