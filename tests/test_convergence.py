"""Convergence on real small tasks, in the simulator (the same code path as MPI ranks).

Digits (449 test images: one image = 0.22 points): every algorithm at its compressed setting
must come close to its uncompressed counterpart; 1-bit without error feedback must be worse.
"""
import pytest

import hvd_qadam

from conftest import load_script
from harness import digits

toy_convex = load_script("studies/toy_convex.py")

EPOCHS = 15


def train(base="adam", **kw):
    def worker(rank, comm):
        def mk(m):
            return hvd_qadam.DistributedOptimizer(digits.base_optimizer(m, base), m.named_parameters(), comm=comm, **kw)
        return digits.train(rank, comm.size, mk, epochs=EPOCHS)[1]
    hist = hvd_qadam.simulate(3, worker)[0]
    return hist[-1]["test_accuracy"], hist[-1]["loss"]


@pytest.fixture(scope="module")
def adam_fp32():
    return train("adam", quantizer="none")


@pytest.fixture(scope="module")
def sgd_fp32():
    return train("sgd", quantizer="none")


@pytest.mark.parametrize("name,kw,tolerance", [
    ("qsgd 4-bit + EF", dict(), 1.5),
    ("efficient_adam 4-bit two-way", dict(algorithm="efficient_adam", downlink_quantizer="qsgd", downlink_bits=4), 1.5),
    ("efficient_adam 1-bit sign two-way EF", dict(algorithm="efficient_adam", quantizer="sign",
                                                  downlink_quantizer="sign"), 3.0),
    ("qadam 4-bit up, 4-bit down", dict(algorithm="qadam", downlink_quantizer="qsgdinf", downlink_bits=4), 1.5),
    ("qadam_weights 8-bit weights", dict(algorithm="qadam_weights", downlink_quantizer="qsgdinf",
                                         downlink_bits=8), 1.5),
])
def test_adam_family_close_to_uncompressed_adam(adam_fp32, name, kw, tolerance):
    acc, loss = train("adam", **kw)
    assert acc >= adam_fp32[0] - tolerance / 100, f"{name}: {acc:.4f} vs fp32 {adam_fp32[0]:.4f}"


@pytest.mark.parametrize("name,kw,tolerance", [
    ("ef_sgd 1-bit sign two-way", dict(algorithm="ef_sgd", quantizer="sign", downlink_quantizer="sign"), 3.0),
    ("local_sgd I=4, 4-bit deltas + EF", dict(algorithm="local_sgd", sync_every=4), 1.5),
])
def test_sgd_family_close_to_uncompressed_sgd(sgd_fp32, name, kw, tolerance):
    acc, loss = train("sgd", **kw)
    assert acc >= sgd_fp32[0] - tolerance / 100, f"{name}: {acc:.4f} vs fp32 {sgd_fp32[0]:.4f}"


def test_error_feedback_matters_at_one_bit():
    kw = dict(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign")
    acc_ef, loss_ef = train("adam", **kw)
    acc_no, loss_no = train("adam", error_feedback=False, server_error_feedback=False, **kw)
    assert loss_no > 2.5 * loss_ef, (loss_no, loss_ef)
    assert acc_no <= acc_ef


def test_toy_convex_ef_reaches_full_precision_and_sign_without_ef_stalls():
    common = dict(steps=600, dim=100, lr=0.2, record_every=50)
    fp32 = toy_convex.run(algorithm="efficient_adam", quantizer="none", **common)["gap"][-1]
    sign_ef = toy_convex.run(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign", **common)
    sign_no = toy_convex.run(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign",
                             error_feedback=False, server_error_feedback=False, **common)
    assert sign_ef["gap"][-1] < 2.0 * fp32, (sign_ef["gap"][-1], fp32)
    assert sign_no["gap"][-1] > 20 * fp32, (sign_no["gap"][-1], fp32)
