"""The registries are the one place that knows algorithm and topology names: the rest of the
package reads the policy off the classes, and a new algorithm is one registered class."""
from __future__ import annotations

import ast
import os

from harness import digits
import pytest
import torch

import hvd_qadam
from hvd_qadam import AlgorithmOptionError
from hvd_qadam.algorithms import ALGORITHMS, OUT_UPDATE, Algorithm, register
from hvd_qadam.comm import SimWorld
from hvd_qadam.topology import TOPOLOGIES

PACKAGE = os.path.dirname(hvd_qadam.__file__)
REGISTRY_MODULES = {"algorithms.py", "topology.py"}
# Other things that share a name with an algorithm or a topology.
HOMONYMS = {("codebooks.py", "qsgd"),      # the quantizer named qsgd, in the quantizers' registry
            ("comm.py", "allgather")}      # Horovod's allgather collective (a handle's kind)


def _name_comparisons(path: str, names: set) -> list:
    """Comparisons (==, !=, in, not in) and dictionary look-ups with a registered name as a
    literal operand: 'x == "ps"', '"local_sgd" != x', 'x in ("qsgd", ...)', 'T["hierarchical"]'."""
    found = []
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        literals = []
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                if isinstance(operand, ast.Constant):
                    literals.append(operand.value)
                elif isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                    literals += [e.value for e in operand.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            literals.append(node.slice.value)
        hits = [v for v in literals if isinstance(v, str) and v in names
                and (os.path.basename(path), v) not in HOMONYMS]
        if hits:
            found.append(f"{os.path.basename(path)}:{node.lineno}: {hits}")
    return found


def test_no_algorithm_or_topology_name_is_compared_outside_its_registry():
    names = set(ALGORITHMS) | set(TOPOLOGIES)
    found = []
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py") and not (dirpath == PACKAGE and f in REGISTRY_MODULES):
                found += _name_comparisons(os.path.join(dirpath, f), names)
    assert found == []


def test_the_name_check_sees_comparisons(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('if a == "ps" or "local_sgd" != b or c in ("qsgd", "x") or T["sharded"]:\n    pass\n'
                   'x = dict(algorithm="qsgd")\n')
    assert len(_name_comparisons(str(src), {"ps", "local_sgd", "qsgd", "sharded"})) == 4


def test_config_names_are_the_registries():
    from hvd_qadam import config
    assert config.ALGORITHMS is ALGORITHMS and config.TOPOLOGIES is TOPOLOGIES


def test_nonfinite_default_is_the_algorithms():
    """Config and DistributedOptimizer resolve nonfinite=None the same way: the algorithm's
    default_nonfinite (propagate for qsgd, as Horovod; raise for the algorithms that step)."""
    from hvd_qadam.config import Config
    for name, cls in ALGORITHMS.items():
        assert Config(algorithm=name).nonfinite == cls.default_nonfinite
    assert Config().nonfinite == "propagate" and Config(algorithm="qadam").nonfinite == "raise"
    p = torch.nn.Parameter(torch.zeros(4))
    for alg, opt in (("qsgd", torch.optim.SGD([p], lr=0.1)), ("qadam", torch.optim.Adam([p]))):
        q = hvd_qadam.DistributedOptimizer(opt, [("p", p)], comm=SimWorld(1).comm(0), algorithm=alg)
        assert q.config.nonfinite == ALGORITHMS[alg].default_nonfinite


# ----------------------------------------------------------------------------- a new algorithm
class ToySGD(Algorithm):
    """Plain SGD as an update-type algorithm: each worker sends its step, the mean is applied.

        u_i = lr g_i;  send Q_w(u_i + e_i);  x = x - Q_s((1/N) sum_i Q_w(u_i + e_i) + e_s)"""
    name = "toy_sgd"
    output = OUT_UPDATE

    def check_optimizer(self, optimizer) -> None:
        for pg in optimizer.param_groups:
            if pg.get("momentum", 0.0) or pg.get("weight_decay", 0.0):
                raise AlgorithmOptionError("toy_sgd is plain SGD: momentum and weight decay are not implemented")

    def worker(self, eng, g, grad, step):
        d = eng.scratch(f"g{g.index}.w", g.numel, grad.device)
        torch.mul(grad, eng.hyper(g.param_group)["lr"], out=d)
        return d


@pytest.fixture
def toy_sgd():
    """ToySGD registered for one test (one class, no other edit anywhere), then forgotten."""
    register(ToySGD)
    yield ToySGD.name
    del ALGORITHMS[ToySGD.name]


def test_a_registered_class_is_an_algorithm_of_the_optimizer(toy_sgd):
    """Oracle: with nothing quantized, two ranks of toy_sgd step as torch's SGD on the mean gradient."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    grads = [[torch.randn(64, 32) for _ in range(2)] for _ in range(4)]

    def worker(rank, comm):
        p = torch.nn.Parameter(w0.clone())
        opt = hvd_qadam.DistributedOptimizer(torch.optim.SGD([p], lr=0.1), [("w", p)], comm=comm,
                                             algorithm=toy_sgd, quantizer="none", min_compress_numel=1)
        assert opt.config.algorithm == toy_sgd and opt.config.nonfinite == "raise"
        for step in range(4):
            p.grad = grads[step][rank].clone()
            opt.step()
        return p.detach().clone()
    got = hvd_qadam.simulate(2, worker)
    q = torch.nn.Parameter(w0.clone())
    ref = torch.optim.SGD([q], lr=0.1)
    for step in range(4):
        q.grad = (grads[step][0] + grads[step][1]) / 2
        ref.step()
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], q.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(AlgorithmOptionError, match="momentum"):
        p = torch.nn.Parameter(w0.clone())
        hvd_qadam.DistributedOptimizer(torch.optim.SGD([p], lr=0.1, momentum=0.9), [("w", p)],
                                       comm=SimWorld(1).comm(0), algorithm=toy_sgd)


def test_a_registered_class_trains_quantized_on_every_topology(toy_sgd):
    """Digits with the default 6-bit uplink and a quantized downlink: the loss falls, replicas stay
    identical, and sharded equals allgather bit for bit (the engine's guarantee holds for it too)."""
    def run(topology):
        def worker(rank, comm):
            def make(m):
                return hvd_qadam.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.3), m.named_parameters(),
                                                      comm=comm, algorithm=toy_sgd, topology=topology,
                                                      downlink_quantizer="qsgdinf", downlink_bits=6)
            model, history = digits.train(rank, comm.size, make, epochs=6)
            return {n: p.detach().clone() for n, p in model.named_parameters()}, history
        return hvd_qadam.simulate(2, worker)
    flat = run("allgather")
    (p0, h0), (p1, _) = flat
    assert h0[-1]["loss"] < 0.5 * h0[0]["loss"], h0
    assert h0[-1]["test_accuracy"] > 0.9, h0
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    sharded = run("sharded")
    assert all(torch.equal(p0[n], sharded[0][0][n]) for n in p0)


def test_register_refuses_what_is_not_a_new_algorithm():
    with pytest.raises(TypeError, match="Algorithm subclass"):
        register(object)
    with pytest.raises(ValueError, match="already registered"):
        register(type("OtherQSGD", (Algorithm,), {"name": "qsgd"}))
    with pytest.raises(ValueError, match="default_nonfinite"):
        register(type("Odd", (Algorithm,), {"name": "odd", "default_nonfinite": "ignore"}))
    assert "odd" not in ALGORITHMS
    with pytest.raises(ValueError, match="unknown algorithm 'toy_sgd'"):
        p = torch.nn.Parameter(torch.zeros(3))
        hvd_qadam.DistributedOptimizer(torch.optim.SGD([p], lr=0.1), [("p", p)], comm=SimWorld(1).comm(0),
                                       algorithm="toy_sgd")


def test_contributing_names_what_exists():
    """CONTRIBUTING.md's map of the code stays true: the files, attributes and hooks it names exist."""
    import re

    from hvd_qadam.quant.codebooks import QuantizerKind
    from hvd_qadam.topology import Transport
    root = os.path.dirname(PACKAGE)
    text = open(os.path.join(root, "CONTRIBUTING.md")).read()
    folders = "hvd_qadam|tests|scripts|bench|studies|examples|harness"
    for path in set(re.findall(rf"`((?:{folders})/[\w/]+\.(?:py|sh))`", text)):
        assert os.path.exists(os.path.join(root, path)), path
    for path in set(re.findall(r"`(quant/\w+\.py)`", text)):
        assert os.path.exists(os.path.join(PACKAGE, path)), path
    algorithm, quantizer, topology = re.split(r"\*\*A quantizer\*\*|\*\*A topology\*\*", text.split("## Running")[0])
    for name in ("server_ef", "overlap", "steps_locally", "default_nonfinite", "keeps_float64", "options", "worker",
                 "server", "finish", "compress_at", "start", "restore", "check_optimizer"):
        assert f"`{name}`" in algorithm and hasattr(Algorithm, name), name
    for name in ("served_ranges", "bytes_per_rank", "overlaps", "downlink_travels", "local_downlink",
                 "dedicated_server", "two_level", "start", "complete", "cancel"):
        assert f"`{name}`" in topology and hasattr(Transport, name), name
    for name in ("default_bits", "default_bucket_size"):
        assert f"`{name}`" in quantizer and hasattr(QuantizerKind, name), name
