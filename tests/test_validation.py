"""Bad input gets a clear error: every rounding argument is validated (a typo never means
nearest), and every answer of the parameter server is checked (tested here with the real server
engine in this process, one worker)."""
from __future__ import annotations

import pytest
import torch

import hvd_qadam
from hvd_qadam import CommError, QuantizerError
from hvd_qadam.codec import quantize_ef
from hvd_qadam.comm import SimWorld
from hvd_qadam.config import LinkSpec
from hvd_qadam.ps import ParameterServer, PSWorkerComm


@pytest.mark.parametrize("rounding", ["floor", "Nearest", "", "stochastik"])
def test_every_rounding_argument_is_validated(rounding):
    v, r, out = torch.randn(300), torch.zeros(300), torch.empty(300)
    with pytest.raises(QuantizerError, match="rounding must be one of"):
        quantize_ef(v, r, out, "qsgd", 4, 128, rounding, key=1)
    with pytest.raises(QuantizerError, match="rounding must be one of"):
        hvd_qadam.quantize(v, "qsgd", 4, rounding=rounding)
    with pytest.raises(QuantizerError, match="rounding must be one of"):
        LinkSpec("qsgd", 4, 128, rounding)
    p = torch.nn.Parameter(torch.zeros(2000))
    for kw in ({"rounding": rounding}, {"downlink_rounding": rounding, "downlink_quantizer": "qsgd"},
               {"downlink_rounding": rounding, "downlink_quantizer": "fp16"}):
        with pytest.raises(QuantizerError, match="rounding must be one of"):
            hvd_qadam.DistributedOptimizer(torch.optim.Adam([p]), [("p", p)], comm=SimWorld(1).comm(0),
                                           algorithm="qadam", **kw)


def test_quantize_ef_rounding_is_honoured():
    v = torch.linspace(-1, 1, 1000)
    for rounding in ("nearest", "stochastic"):
        a, _ = quantize_ef(v, torch.zeros(1000), torch.empty(1000), "qsgd", 4, 128, rounding, key=3)
        assert a.stochastic == (rounding == "stochastic")
        b = hvd_qadam.quantize(v, "qsgd", 4, 128, rounding=rounding, key=3)
        assert a.to_bytes() == b.to_bytes()


class LocalPS(PSWorkerComm):
    """One worker's PSWorkerComm whose requests go to a ParameterServer in this process instead of
    over MPI (the server's own request handling and engine, without the message loop)."""

    def __init__(self, fail: dict | None = None):
        self.rank, self.size, self.hosts, self._said_hello = 0, 1, None, False
        self.server = ParameterServer(None, [0])
        self.fail = fail or {}

    def allgather_object(self, obj, name=""):
        return [obj]

    def ps_request(self, message):
        kind = message[0]
        if kind in self.fail:
            return self.fail[kind]
        if kind == "hello":
            err = self.server._setup({0: message[1]})
            return ("error", err) if err else ("ok", None)
        if kind == "step":
            self.server.hyper = message[2]
            with torch.no_grad():
                return self.server.step([message[1]])
        return self.server._checkpoint(kind, message)


def _train(comm, steps=2, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 32)
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model.named_parameters(),
                                         comm=comm, algorithm="qadam", topology="ps", min_compress_numel=1,
                                         downlink_quantizer="qsgd", downlink_bits=8)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
    return model, opt


def test_parameter_server_state_round_trip_and_every_bad_status_raises():
    model, opt = _train(LocalPS())
    sd = opt.state_dict()
    assert sd["hvd_qadam"]["ps_server"]["engine"]["counters"]["step"] == 2
    _, fresh = _train(LocalPS(), steps=1, seed=1)
    fresh.load_state_dict(sd)          # the server takes the checkpoint's state
    assert fresh.engine.step_count == 2 and fresh._comm.server.engine.step_count == 2
    # the server refuses: a clear error on the worker, never a silently missing server state
    _, opt = _train(LocalPS(fail={"state": ("error", "the server is gone")}))
    with pytest.raises(CommError, match="parameter server, its state: error: the server is gone"):
        opt.state_dict()
    _, opt = _train(LocalPS(fail={"state": ("consistency", "workers disagree")}))
    with pytest.raises(CommError, match="workers disagree"):
        opt.state_dict()
    _, opt = _train(LocalPS())
    bad = dict(sd, hvd_qadam=dict(sd["hvd_qadam"], ps_server={"engine": sd["hvd_qadam"]["ps_server"]["engine"],
                                                               "params": {"other.weight": torch.zeros(1)}}))
    with pytest.raises(CommError, match="loading its state: error: the checkpoint's parameters are not this model's"):
        opt.load_state_dict(bad)


def test_parameter_server_answers_errors_before_it_has_a_model():
    server = ParameterServer(None, [0])
    assert server._checkpoint("state", ("state",))[0] == "error"
    assert "no model yet" in server._checkpoint("load", ("load", {}))[1]
