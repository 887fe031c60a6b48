"""Shared by the tests: digits training of N simulated ranks with hvd_qadam.DistributedOptimizer."""
from __future__ import annotations

import torch

import hvd_qadam
from hvd_qadam.examples import digits


def make_base(model, base: str = "adam"):
    if base == "adam":
        return torch.optim.Adam(model.parameters(), lr=2e-3)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def sim_train(world_size: int, steps: int, base: str = "adam", **kwargs) -> list:
    """Final {name: tensor} of every simulated rank after ``steps`` steps."""
    def worker(rank, comm):
        mk = lambda m: hvd_qadam.DistributedOptimizer(make_base(m, base), m.named_parameters(), comm=comm, **kwargs)
        model, _ = digits.train(rank, comm.size, mk, epochs=1000, max_steps=steps)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    return hvd_qadam.simulate(world_size, worker)


def assert_same_params(a: dict, b: dict, what: str = ""):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n} differs (max |diff| {float((a[n] - b[n]).abs().max())})"
