"""A toy stochastic convex problem (as in the Efficient-Adam paper's first experiment).

Least squares f(x) = 1/(2m) ||A x - b||^2 with a planted solution plus noise. Each of N workers
holds its own rows and computes minibatch gradients (noisy, and different per worker). We run
the distributed optimizers in the simulator and report the optimality gap f(x_t) - f(x*).
"""
from __future__ import annotations

import numpy as np
import torch

import hvd_qadam


def make_problem(dim: int = 200, rows: int = 4000, noise: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 10.0, dim)                  # ill-conditioned columns
    a = rng.standard_normal((rows, dim)) * scales / np.sqrt(dim)
    x_true = rng.standard_normal(dim)
    b = a @ x_true + noise * rng.standard_normal(rows)
    x_star, *_ = np.linalg.lstsq(a, b, rcond=None)
    f_star = 0.5 * np.mean((a @ x_star - b) ** 2)
    return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), float(f_star)


def objective(a, b, x) -> float:
    with torch.no_grad():
        r = (a.double() @ x.double()) - b.double()
        return float(0.5 * (r * r).mean())


def run(world_size: int = 4, steps: int = 600, batch: int = 16, lr: float = 0.05, decay: bool = True,
        dim: int = 200, seed: int = 0, record_every: int = 10, **opt_kwargs) -> dict:
    """Train with ``hvd_qadam.DistributedOptimizer(**opt_kwargs)`` (default uncompressed Adam).

    lr follows lr / sqrt(t) when ``decay`` (the schedule of the Efficient-Adam analysis)."""
    a, b, f_star = make_problem(dim, seed=seed)
    shards = np.array_split(np.arange(a.shape[0]), world_size)
    kw = dict(opt_kwargs)
    kw.setdefault("min_compress_numel", 0)
    kw.setdefault("bucket_size", 64)

    def worker(rank, comm):
        x = torch.nn.Parameter(torch.zeros(dim))
        base = torch.optim.Adam([x], lr=lr)
        opt = hvd_qadam.DistributedOptimizer(base, [("x", x)], comm=comm, **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / np.sqrt(t + 1) if decay else 1.0)
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        rows = torch.from_numpy(shards[rank])
        gaps = []
        for t in range(steps):
            i = rows[torch.randint(len(rows), (batch,), generator=gen)]
            opt.zero_grad()
            loss = 0.5 * ((a[i] @ x - b[i]) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
            if rank == 0 and (t % record_every == 0 or t == steps - 1):
                gaps.append((t + 1, objective(a, b, x.detach()) - f_star))
        return gaps

    gaps = hvd_qadam.simulate(world_size, worker)[0]
    return {"steps": [s for s, _ in gaps], "gap": [g for _, g in gaps], "f_star": f_star}
