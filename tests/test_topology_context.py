"""The topologies reach the step engine through :class:`hvd_qadam.topology.TopologyContext` only.

Read from the source (so a new member a topology starts to use fails here until it is added to the
interface on purpose), and checked against the engine (every member of the interface exists on a
live engine, of the declared kind)."""
import ast
import inspect
import typing

import torch

import hvd_qadam
from hvd_qadam import topology
from hvd_qadam.comm import SimWorld
from hvd_qadam.topology import TOPOLOGIES, TopologyContext


def _interface() -> set:
    fields = set(typing.get_type_hints(TopologyContext))
    methods = {n for n, v in vars(TopologyContext).items() if inspect.isfunction(v)}
    return fields | methods


def _members_used() -> dict:
    """{member: [line, ...]} of every ``self.ctx.<member>`` and ``ctx.<member>`` in topology.py."""
    tree = ast.parse(inspect.getsource(topology))
    used = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        via_self = (isinstance(base, ast.Attribute) and base.attr == "ctx"
                    and isinstance(base.value, ast.Name) and base.value.id == "self")
        via_local = isinstance(base, ast.Name) and base.id == "ctx"
        if via_self or via_local:
            used.setdefault(node.attr, []).append(node.lineno)
    return used


def test_topologies_use_nothing_of_the_engine_beyond_the_interface():
    used = _members_used()
    assert {"comm", "encode_uplink", "serve", "server_transform", "parse"} <= set(used)   # the reader works
    beyond = {m: lines for m, lines in used.items() if m not in _interface()}
    assert not beyond, f"topology.py uses engine members outside TopologyContext: {beyond}"
    src = inspect.getsource(topology)
    assert "self.eng" not in src and ".alg." not in src and ".bank" not in src and ".cfg" not in src


def test_the_engine_is_a_topology_context():
    """A live engine (every topology class built on it) has every member the interface names."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam([p]), [("w", p)], comm=SimWorld(1).comm(0))
    eng = opt._engine
    hints = typing.get_type_hints(TopologyContext)
    for name in _interface():
        assert hasattr(eng, name), f"Engine lacks TopologyContext.{name}"
        if name in hints and hints[name] is not object:
            assert isinstance(getattr(eng, name), hints[name]), (name, type(getattr(eng, name)))
        elif name not in hints:
            assert callable(getattr(eng, name)), name
    for cls in TOPOLOGIES.values():
        assert cls(eng).ctx is eng
