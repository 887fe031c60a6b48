"""The registries are the one place that knows algorithm and topology names: the rest of the
package reads the policy off the classes, and a new algorithm is one registered class."""
from __future__ import annotations

import ast
import os

import torch

import hvd_qadam
from hvd_qadam.algorithms import ALGORITHMS
from hvd_qadam.transport import TOPOLOGIES

PACKAGE = os.path.dirname(hvd_qadam.__file__)
REGISTRY_MODULES = {"algorithms.py", "transport.py"}
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
    from hvd_qadam.comm import SimWorld
    from hvd_qadam.config import Config
    for name, cls in ALGORITHMS.items():
        assert Config(algorithm=name).nonfinite == cls.default_nonfinite
    assert Config().nonfinite == "propagate" and Config(algorithm="qadam").nonfinite == "raise"
    p = torch.nn.Parameter(torch.zeros(4))
    for alg, opt in (("qsgd", torch.optim.SGD([p], lr=0.1)), ("qadam", torch.optim.Adam([p]))):
        q = hvd_qadam.DistributedOptimizer(opt, [("p", p)], comm=SimWorld(1).comm(0), algorithm=alg)
        assert q.config.nonfinite == ALGORITHMS[alg].default_nonfinite
