#!/usr/bin/env python3
"""Efficient-Adam's toy experiment: a stochastic least-squares problem, 4 simulated workers.

Least squares f(x) = 1/(2m) ||A x - b||^2 with a planted solution plus noise. Each of N workers
holds its own rows and computes minibatch gradients (noisy, and different per worker); the
distributed optimizers run in the simulator, and the optimality gap f(x_t) - f(x*) is reported
for full-precision Adam and Efficient-Adam, and for quantized Efficient-Adam with and without
(two-way) error feedback; writes a plot and JSON. The tests import :func:`run`.

    python studies/toy_convex.py [--steps 1500] [--plot toy_convex.png] [--json toy_convex.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import hvd_qadam

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.study_output import figure, write_json  # noqa: E402


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


EA = dict(algorithm="efficient_adam")
NO_EF = dict(error_feedback=False, server_error_feedback=False)
CASES = {
    "Adam (fp32, Adam on the mean gradient)": dict(quantizer="none"),
    "Efficient-Adam fp32": dict(EA, quantizer="none"),
    "Efficient-Adam sign (1 bit) + EF": dict(EA, quantizer="sign", downlink_quantizer="sign"),
    "Efficient-Adam sign (1 bit), no EF": dict(EA, **NO_EF, quantizer="sign", downlink_quantizer="sign"),
    "Efficient-Adam qsgdinf 2 bit + EF": dict(EA, quantizer="qsgdinf", bits=2, downlink_quantizer="qsgdinf",
                                              downlink_bits=2),
    "Efficient-Adam qsgdinf 2 bit, no EF (nearest)": dict(EA, **NO_EF, quantizer="qsgdinf", bits=2, rounding="nearest",
                                                          downlink_quantizer="qsgdinf", downlink_bits=2,
                                                          downlink_rounding="nearest"),
    "Efficient-Adam qsgdinf 2 bit, no EF (stochastic)": dict(EA, **NO_EF, quantizer="qsgdinf", bits=2,
                                                             downlink_quantizer="qsgdinf", downlink_bits=2),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from tqdm import tqdm

    results = {}
    for name, kw in tqdm(CASES.items(), desc="runs"):
        results[name] = run(world_size=args.workers, steps=args.steps, lr=args.lr, dim=args.dim, record_every=10, **kw)
    ref = results["Efficient-Adam fp32"]["gap"][-1]
    print(f"\nleast squares, d={args.dim}, {args.workers} workers, batch 16/worker, lr {args.lr}/sqrt(t), "
          f"{args.steps} steps; gap = f(x_t) - f(x*)")
    print(f"{'run':<52}{'gap@10%':>11}{'gap@50%':>11}{'final gap':>11}{'vs EA fp32':>11}")
    for name, r in results.items():
        g, n = r["gap"], len(r["gap"])
        print(f"{name:<52}{g[n // 10]:>11.2e}{g[n // 2]:>11.2e}{g[-1]:>11.2e}{g[-1] / ref:>10.1f}x")
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})
    if args.plot:
        with figure(args.plot, figsize=(8, 5)) as (fig, ax):
            for name, r in results.items():
                ax.semilogy(r["steps"], r["gap"], label=name, ls="--" if "no EF" in name else "-")
            ax.set_xlabel("step")
            ax.set_ylabel("f(x_t) - f(x*)")
            ax.set_title("Toy stochastic least squares: error feedback vs none")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)


if __name__ == "__main__":
    main()
