"""Telemetry (hvd_qadam.telemetry): what rank 0 writes per step, checked against the optimizer's
own communication_stats, on simulated ranks and on real MPI ranks; the TensorBoard sink; the
plot script; and that nothing runs when it is off."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from harness import digits
import hvd_qadam
from hvd_qadam import stall, telemetry
from hvd_qadam.engine import StepStats

PLOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "plot_telemetry.py")


def train(world_size: int, steps: int, **kwargs) -> list:
    """Digits training on simulated ranks; per rank, the communication_stats seen after each step."""
    def worker(rank, comm):
        seen = []

        def make(m):
            return hvd_qadam.DistributedOptimizer(digits.base_optimizer(m), m.named_parameters(), comm=comm, **kwargs)

        def on_step(step, opt):
            s = opt.communication_stats
            seen.append({"step": s.step, "sent_bytes": s.sent_bytes, "received_bytes": s.received_bytes,
                         "fp32_bytes": s.fp32_bytes, "totals": dict(s.totals)})
        digits.train(rank, comm.size, make, epochs=100, max_steps=steps, on_step=on_step)
        return seen
    return hvd_qadam.simulate(world_size, worker)


def read_log(path) -> tuple[dict, list]:
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    assert lines and "config" in lines[0], "the log starts with its configuration header"
    return lines[0], [r for r in lines[1:] if "step" in r]


def check_against_stats(recs: list, seen: list, world_size: int) -> None:
    """The log holds exactly the exchanges rank 0's optimizer reported, with its byte counts."""
    assert [r["step"] for r in recs] == [s["step"] for s in seen], "one record per step, in order, no duplicates"
    for r, s in zip(recs, seen):
        assert r["rank"] == 0 and r["world_size"] == world_size
        for k in ("sent_bytes", "received_bytes", "fp32_bytes"):
            assert r[k] == s[k] > 0, (k, r[k], s[k])
        assert r["ratio"] == pytest.approx(s["fp32_bytes"] / s["sent_bytes"])
        assert r["total_sent_bytes"] == s["totals"]["sent_bytes"]
    assert sum(r["sent_bytes"] for r in recs) == seen[-1]["totals"]["sent_bytes"]
    assert sum(r["received_bytes"] for r in recs) == seen[-1]["totals"]["received_bytes"]


def test_jsonl_on_simulated_ranks_matches_communication_stats(tmp_path):
    log = tmp_path / "run.jsonl"
    seen = train(3, 12, telemetry=str(log))
    header, recs = read_log(log)
    assert header["config"]["uplink"]["quantizer"] == "qsgdinf" and header["sink"] == "jsonl"
    check_against_stats(recs, seen[0], 3)
    for r in recs:
        assert r["compressed"] is True and r["topology"] == "sharded"
        assert r["ratio"] > 3, "6-bit payloads against fp32: several times fewer bytes"
        for k in ("encode_s", "exchange_s", "decode_s", "apply_s"):
            assert 0 <= r[k] < 30, (k, r[k])
        assert r["encode_s"] > 0 and r["decode_s"] > 0 and r["apply_s"] > 0
        assert math.isfinite(r["residual_ratio"]) and 0 < r["residual_ratio"] < 0.5, r["residual_ratio"]
    assert not [p for p in os.listdir(tmp_path) if p != "run.jsonl"], "only one file, written by rank 0"


def test_env_variable_and_every(tmp_path, monkeypatch):
    log = tmp_path / "env.jsonl"
    monkeypatch.setenv(telemetry.ENV, str(log))
    seen = train(2, 11, telemetry_every=5)
    _, recs = read_log(log)
    assert [r["step"] for r in recs] == [0, 5, 10]
    by_step = {s["step"]: s for s in seen[0]}
    for r in recs:
        assert r["sent_bytes"] == by_step[r["step"]]["sent_bytes"]
        assert r["topology"] == "allgather"


def test_off_by_default_runs_nothing(monkeypatch):
    monkeypatch.delenv(telemetry.ENV, raising=False)

    def boom(*a, **k):
        raise AssertionError("telemetry work while telemetry is off")
    monkeypatch.setattr(telemetry.Telemetry, "record", boom)
    monkeypatch.setattr(telemetry.Telemetry, "wants", boom)
    monkeypatch.setattr("hvd_qadam.optimizer.residual_ratio", boom)
    model = digits.make_model()
    opt = hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(),
                                         comm=hvd_qadam.comm.SimWorld(1).comm(0))
    assert opt._telemetry is None
    x, y, _, _ = digits.load_digits_split()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()


def test_bad_options_refused():
    model = digits.make_model()
    comm = hvd_qadam.comm.SimWorld(1).comm(0)
    with pytest.raises(ValueError, match="telemetry_every"):
        hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                       telemetry="x.jsonl", telemetry_every=0)
    with pytest.raises(ValueError, match="telemetry must be"):
        hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(), comm=comm,
                                       telemetry=3)


def test_residual_ratio_tracks_a_stalling_setting(tmp_path, monkeypatch):
    """The compression-error signal separates a setting that keeps up from one the stall rule
    refuses (QSGD's L2 grid at 4 bits, bucket 512), as the rule's model predicts."""
    monkeypatch.setattr(stall, "check", lambda config: None)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    train(2, 40, telemetry=str(good))
    train(2, 40, telemetry=str(bad), quantizer="qsgd", bits=4, bucket_size=512)
    late = [read_log(p)[1][-10:] for p in (good, bad)]
    good_r, bad_r = (sum(r["residual_ratio"] for r in recs) / len(recs) for recs in late)
    assert good_r < 0.2, good_r
    assert bad_r > 1.0 and bad_r > 10 * good_r, (good_r, bad_r)
    assert stall.estimate("qsgd", 4, 512, False).residual_ratio > 1.0 > stall.estimate("qsgdinf", 6, 128, False).residual_ratio


def test_group_paths_recorded_when_present(tmp_path):
    rec = telemetry.Telemetry(str(tmp_path / "p.jsonl"))
    stats = StepStats(step=3, sent_bytes=10, received_bytes=20, fp32_bytes=80, topology="allgather")
    rec.record(stats, 0.001, None, 2)                    # no group_paths: no key
    stats = StepStats(step=4, sent_bytes=10, received_bytes=20, fp32_bytes=80, topology="allgather")
    stats.group_paths = {0: "horovod", 1: "qsgdinf:6"}
    rec.record(stats, 0.001, 0.1, 2)
    rec.close()
    _, recs = read_log(tmp_path / "p.jsonl")
    assert "group_paths" not in recs[0] and recs[0]["residual_ratio"] is None
    assert recs[1]["group_paths"] == {"0": "horovod", "1": "qsgdinf:6"} and recs[1]["ratio"] == 8.0
    assert telemetry.path_bits("qsgdinf:6") == 6 and telemetry.path_bits("horovod") == 32
    assert telemetry.path_bits("horovod:fp16") == 16


def test_directory_without_tensorboard_gets_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry, "tensorboard_available", lambda: False)
    train(2, 3, telemetry=str(tmp_path / "logs"))
    _, recs = read_log(tmp_path / "logs" / telemetry.JSONL_NAME)
    assert [r["step"] for r in recs] == [0, 1, 2]


def test_tensorboard_event_files(tmp_path):
    if not telemetry.tensorboard_available():
        pytest.skip("tensorboard is not installed (pip install tensorboard): the directory sink writes JSON lines")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = tmp_path / "tb"
    seen = train(2, 6, telemetry=str(logdir))
    events = [p for p in os.listdir(logdir) if p.startswith("events.out.tfevents")]
    assert len(events) == 1, events
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    sent = acc.Scalars("bytes/sent_bytes")
    assert [e.step for e in sent] == list(range(6))
    assert [int(e.value) for e in sent] == [s["sent_bytes"] for s in seen[0]]
    ratio = acc.Scalars("bytes/ratio_to_fp32")
    assert all(e.value > 3 for e in ratio)
    assert len(acc.Scalars("error/residual_ratio")) == 6 and len(acc.Scalars("time/apply_s")) == 6


def test_plot_script_on_a_produced_log(tmp_path):
    log = tmp_path / "run.jsonl"
    train(2, 8, telemetry=str(log))
    with open(log, "a") as f:                  # and a record with group paths, as the engine may report
        rec = read_log(log)[1][-1]
        rec.update(step=8, group_paths={"0": "horovod", "1": "qsgdinf:6"})
        f.write(json.dumps(rec) + "\n")
    out = tmp_path / "run.png"
    proc = subprocess.run([sys.executable, PLOT, str(log), "-o", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "9 steps" in proc.stdout
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 20_000


def test_mpirun_two_ranks_only_rank0_writes(tmp_path, run_mpi):
    log, out = tmp_path / "mpi.jsonl", tmp_path / "stats"
    run_mpi(2, "telemetry_train.py", "--log", str(log), "--out", str(out), "--steps", "15", timeout=240)
    header, recs = read_log(log)
    with open(f"{out}.0.json") as f:
        seen0 = json.load(f)
    with open(f"{out}.1.json") as f:
        seen1 = json.load(f)
    check_against_stats(recs, seen0, 2)
    assert len(recs) == 15 and sum(1 for line in open(log) if "config" in line) == 1, "rank 1 wrote nothing"
    for r in recs:
        assert r["ratio"] > 3 and r["compressed"] and r["topology"] == "allgather"
        assert math.isfinite(r["residual_ratio"]) and 0 < r["residual_ratio"] < 0.5
    # rank 1 moved as many bytes as rank 0 (allgather is symmetric): the log is rank 0's, not a sum
    assert [s["sent_bytes"] for s in seen1] == [r["sent_bytes"] for r in recs]
