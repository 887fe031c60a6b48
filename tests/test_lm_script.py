"""The LM scripts: harness/lm.py (model, corpus, sampling, evaluation), examples/train_lm.py under
mpirun, bench/bench_lab.py's report, and bench/netlab.sh's argument handling."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN_LM = os.path.join(ROOT, "examples", "train_lm.py")

from conftest import load_script  # noqa: E402
from harness import lm  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return lm.load_corpus(budget_bytes=300_000)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_parameter_counts(size):
    assert lm.count_params(lm.make_lm(size)) == lm.EXPECTED_PARAMS[size]


def test_same_seed_same_weights_and_causal():
    a, b = lm.make_lm("tiny", seed=3), lm.make_lm("tiny", seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    x = torch.randint(0, 256, (2, a.ctx))
    y = x.clone()
    y[:, 40:] = (y[:, 40:] + 1) % 256          # change the future only
    with torch.no_grad():
        la, lb = a(x), a(y)
    assert la.shape == (2, a.ctx, 256)
    assert torch.allclose(la[:, :40], lb[:, :40], atol=1e-5)
    assert not torch.allclose(la[:, 40:], lb[:, 40:])
    with pytest.raises(ValueError):
        a(torch.zeros(1, a.ctx + 1, dtype=torch.long))


def test_corpus_is_fixed_and_split(corpus):
    again = lm.load_corpus(budget_bytes=300_000)
    assert corpus.nbytes == 300_000 and again.fingerprint == corpus.fingerprint
    assert corpus.val.numel() == int(300_000 * 0.05)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    files = lm.stdlib_files()
    assert files == sorted(files) and not any("site-packages" in f for f in files)


def test_sampler_deterministic_per_rank_and_step(corpus):
    s0 = lm.BatchSampler(corpus.train, 64, 4, seed=1, rank=0)
    x, y = s0.batch(5)
    x2, y2 = lm.BatchSampler(corpus.train, 64, 4, seed=1, rank=0).batch(5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])                                    # y is x shifted by one
    assert not torch.equal(x, lm.BatchSampler(corpus.train, 64, 4, seed=1, rank=1).batch(5)[0])
    assert not torch.equal(x, s0.batch(6)[0])
    assert x.dtype == torch.long and x.shape == (4, 64) and int(x.max()) < 256


def test_sharded_evaluation_matches_full(corpus):
    model = lm.make_lm("tiny")
    full = lm.evaluate(model, corpus.val, n_windows=24, batch=8)
    parts = [lm.evaluate_sum(model, corpus.val, n_windows=24, batch=8, rank=r, size=3) for r in range(3)]
    assert sum(c for _, c in parts) == 24 * model.ctx
    assert sum(s for s, _ in parts) / sum(c for _, c in parts) == pytest.approx(full, rel=1e-6)
    assert abs(full - math.log(256)) < 0.1                                     # untrained: about uniform


def test_bench_lab_report(tmp_path):
    bl = load_script("bench/bench_lab.py")
    base = {"workload": "LM base", "numel": 10, "ranks": 3, "steps": 5, "wire_tx_bytes": 1e6, "wire_rx_bytes": 1e6,
            "sent_bytes": 4e6, "received_bytes": 4e6}
    rows = []
    for rate, f32, f16, q in (("100mbit", 4.0, 2.0, 1.0), ("1gbit", 1.0, 0.8, 1.6), ("none", 0.5, 0.5, 1.5)):
        rows += [dict(base, rate=rate, config="hvd_fp32", label="Horovod fp32", step_s=f32, measured_bytes=False),
                 dict(base, rate=rate, config="hvd_fp16", label="Horovod fp16", step_s=f16, measured_bytes=False),
                 dict(base, rate=rate, config="qadam_default", label="hvd_qadam defaults", step_s=q, encode_s=0.1,
                      exchange_s=0.2, decode_s=0.3, newfield_s=0.05, stat_keys=["decode_s", "encode_s", "exchange_s",
                                                                               "newfield_s"], measured_bytes=True)]
    table = bl.markdown(rows, [])
    line = next(ln for ln in table.splitlines() if ln.startswith("| 100mbit | hvd_qadam"))
    assert "4.00x" in line and "2.00x" in line and "| 100 | 200 | 300 | 50 |" in line
    assert "newfield_s" in table
    bl.plot(rows, str(tmp_path / "lab.png"))
    assert (tmp_path / "lab.png").stat().st_size > 1000


def test_netlab_arguments():
    script = os.path.join(ROOT, "bench", "netlab.sh")
    subprocess.run(["bash", "-n", script], check=True)
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--rate" in out and "local_size" in out
    bad = subprocess.run(["bash", script, "--ranks", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no command" in bad.stderr


@pytest.mark.timeout(600)
def test_train_lm_under_mpirun(tmp_path):
    if shutil.which("mpirun") is None or importlib.util.find_spec("horovod") is None:
        pytest.skip("needs mpirun and Horovod (scripts/install.sh)")
    out = tmp_path / "lm.json"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-bind-to", "none",
           "-mca", "btl", "self,tcp", "-mca", "btl_tcp_if_include", "lo", "-mca", "oob_tcp_if_include", "lo",
           sys.executable, TRAIN_LM, "--size", "tiny", "--steps", "6", "--batch", "4",
           "--eval-every", "3", "--eval-windows", "8", "--data-bytes", "300000", "--lr", "3e-3",
           "--algorithm", "efficient_adam", "--quantizer", "sign", "--downlink-quantizer", "sign",
           "--topology", "sharded", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HVD_QADAM_THREADS="1", HOROVOD_LOG_LEVEL="warning")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\x1b[" not in proc.stdout and "\r" not in proc.stdout.replace("\r\n", "\n")   # plain lines
    res = json.loads(out.read_text())
    assert res["params"] == lm.EXPECTED_PARAMS["tiny"] and res["ranks"] == 2
    assert [e["step"] for e in res["evals"]] == [0, 3, 6]
    assert res["final_val_loss"] < res["evals"][0]["val_loss"]
    assert res["bytes_per_step"]["measured"] and 0 < res["bytes_per_step"]["sent_mean"] < res["fp32_bytes"] / 10
    assert res["hvd_qadam_kwargs"]["algorithm"] == "efficient_adam" and res["median_step_s"] > 0
