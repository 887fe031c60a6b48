"""The stall rule (hvd_qadam.stall): its numbers on known settings, the optimizer's refusals and
warnings with their reasons and suggestions, and silence for the settings that train well."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from harness import digits
import hvd_qadam
from hvd_qadam import stall
from hvd_qadam.comm import SimWorld


def build(**kwargs):
    model = digits.make_model()
    return hvd_qadam.DistributedOptimizer(digits.base_optimizer(model), model.named_parameters(),
                                          comm=SimWorld(1).comm(0), **kwargs)


def test_numbers_on_known_settings():
    # An L2 grid's step is sqrt(d)/m RMS: QSGD at 4 bits (m = 7) and bucket 512 zeroes every entry
    # below 22.6/14 = 1.62 RMS, P(|z| < 1.62) = 0.895 for a Gaussian.
    e = stall.estimate("qsgd", 4, 512, False)
    assert e.zero_fraction == pytest.approx(0.895, abs=0.01)
    assert 2.0 < e.residual_ratio < 3.0 and e.verdict == stall.MARGINAL
    # ... and at bucket 128 below 0.81 RMS: P = 0.58
    assert stall.estimate("qsgd", 4, 128, False).zero_fraction == pytest.approx(0.58, abs=0.01)
    # sign sends every entry; its one-step error for a Gaussian is 1 - 2/pi = 0.36
    s = stall.estimate("sign", 1, 512, False)
    assert s.zero_fraction == 0 and s.omega == pytest.approx(1 - 2 / math.pi, abs=0.01) and s.verdict == stall.OK
    # an L2 grid at 2 bits (levels 0 and +-||x||) sends nothing: the residual is a random walk
    w = stall.estimate("qsgd", 2, 128, False)
    assert w.zero_fraction == 1.0 and w.omega == pytest.approx(1.0)
    assert w.residual_ratio == pytest.approx(math.sqrt(stall.STEPS * 3 / 4), rel=0.1)   # mean of sqrt(t), t in [32, 64)
    # stochastic rounding: omega is the variance factor; QSGD's bound min(d/s^2, sqrt(d)/s) at
    # s = 7, d = 512 is 3.2, the Gaussian value ~1.6; above 1 EF diverges
    st = stall.estimate("qsgd", 4, 512, True)
    assert 1.3 < st.omega < 3.2 and st.residual_ratio > 100 and st.verdict == stall.STALLS
    # the max-abs grid barely depends on the bucket; the default is far from any threshold
    assert stall.estimate("qsgdinf", 6, 128, False).residual_ratio < 0.05
    assert stall.estimate("qsgdinf", 4, 512, False).residual_ratio < 0.2
    # the same grid under two names: same numbers
    t, q = stall.estimate("terngrad", 2, 128, False), stall.estimate("qsgdinf", 2, 128, False)
    assert (t.zero_fraction, t.omega, t.residual_ratio) == (q.zero_fraction, q.omega, q.residual_ratio)
    assert t.verdict == stall.OK and t.residual_ratio < stall.RESIDUAL_MARGINAL


def test_qsgd_paper_setting_warns_with_reason_and_suggestion():
    with pytest.warns(RuntimeWarning) as caught:
        build(quantizer="qsgd", bits=4, bucket_size=512)
    msgs = [str(w.message) for w in caught if "error feedback" in str(w.message)]
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "uplink is marginal" in msg and "l2 scale" in msg and "bucket_size=512" in msg
    assert "90% of the entries are sent as 0" in msg and "2.52x the gradient" in msg
    assert "use bits=5 or bucket_size=256 or quantizer='qsgdinf'" in msg


@pytest.mark.parametrize("kw", [dict(quantizer="qsgd", bits=3), dict(quantizer="qsgd", bits=2),
                                dict(quantizer="nuq", bits=3, bucket_size=512), dict(quantizer="nuq", bits=2),
                                dict(quantizer="qsgd", bits=4, bucket_size=1024),
                                dict(quantizer="qsgd", bits=4, bucket_size=512, rounding="stochastic"),
                                dict(quantizer="terngrad", rounding="stochastic")],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_stalling_settings_refused(kw):
    with pytest.raises(ValueError, match="stalls under error feedback") as e:
        build(**kw)
    assert "grows without bound" in str(e.value) and "use " in str(e.value)


def test_downlink_judged_with_its_own_option_names():
    with pytest.raises(ValueError, match="downlink stalls") as e:
        build(algorithm="efficient_adam", downlink_quantizer="qsgd", downlink_bits=3)
    assert "downlink_bits=4" in str(e.value) and "downlink_quantizer='qsgdinf'" in str(e.value)
    build(algorithm="efficient_adam", downlink_quantizer="qsgd", downlink_bits=3, server_error_feedback=False)


def test_without_error_feedback_not_judged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(quantizer="qsgd", bits=4, bucket_size=512, error_feedback=False)


@pytest.mark.parametrize("kw", [dict(), dict(bits=4), dict(quantizer="sign"), dict(quantizer="terngrad"),
                                dict(algorithm="onebit_adam"), dict(quantizer="alq", bits=3),
                                dict(quantizer="amq", bits=3), dict(quantizer="qsgdinf", bits=2),
                                dict(quantizer="qsgd"), dict(quantizer="qsgd", bits=4),
                                dict(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign"),
                                dict(algorithm="qadam", downlink_bits=4, topology="sharded"),
                                dict(quantizer="none")],
                         ids=lambda kw: "-".join(str(v) for v in kw.values()) or "defaults")
def test_good_settings_are_silent(kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = build(**kw)
    assert isinstance(opt, torch.optim.Optimizer)


def test_estimate_is_cached_and_deterministic():
    stall.estimate.cache_clear()
    a = stall.estimate("qsgd", 4, 256, False)
    stall.estimate.cache_clear()
    assert stall.estimate("qsgd", 4, 256, False) == a
    with pytest.raises(ValueError, match="not a fixed grid"):
        stall.estimate("alq", 3, 128, False)
