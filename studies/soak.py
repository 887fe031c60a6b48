"""Soak: many steps of the digits MLP, reporting resident memory and step-time drift.

Runs under mpirun (every rank trains; rank 0 reports) or, without mpirun, as simulated ranks in
one process. A leak shows as RSS growing after the first steps; a slowdown (e.g. caches that
never hit, growing state) as a late median step time above the early one.

    mpirun -np 3 python studies/soak.py --steps 10000 [--json results/soak.json] [optimizer options]
    python studies/soak.py --simulate 3 --steps 2000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import hvd_qadam

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import digits  # noqa: E402
from harness.study_output import write_json  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def soak(rank: int, size: int, comm, args) -> dict:
    torch.manual_seed(0)
    model = digits.make_model()
    kw = json.loads(args.kwargs)
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model.named_parameters(),
                                         comm=comm, **kw)
    x, y, _, _ = digits.load_digits_split()
    x, y = x[rank::size], y[rank::size]
    times, rss = [], []
    every = max(1, args.steps // 20)
    for step in range(args.steps):
        i = (step * 32) % max(1, x.shape[0] - 32)
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if step % every == 0 or step == args.steps - 1:
            rss.append((step, rss_mib()))
    tenth = max(1, args.steps // 10)
    early, late = statistics.median(times[tenth:2 * tenth]), statistics.median(times[-tenth:])
    after_first_tenth = [r for s, r in rss if s >= tenth]
    return {"steps": args.steps, "ranks": size, "options": kw, "rss_mib": rss,
            "rss_growth_after_first_tenth_mib": max(after_first_tenth) - min(after_first_tenth),
            "median_step_ms_early": early * 1e3, "median_step_ms_late": late * 1e3, "drift": late / early}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--simulate", type=int, default=0, help="N simulated ranks in this process (no mpirun)")
    ap.add_argument("--kwargs", default="{}", help="JSON of DistributedOptimizer keyword arguments")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.simulate:
        res = hvd_qadam.simulate(args.simulate, lambda r, c: soak(r, c.size, c, args))[0]
    else:
        from mpi4py import MPI  # noqa: F401 - first, so that Horovod joins mpi4py's MPI
        import horovod.torch as hvd
        hvd.init()
        res = soak(hvd.rank(), hvd.size(), None, args)
        if hvd.rank() != 0:
            return 0
    print(f"{res['steps']} steps, {res['ranks']} ranks: RSS {res['rss_mib'][0][1]:.0f} -> {res['rss_mib'][-1][1]:.0f} MiB "
          f"(growth after the first tenth {res['rss_growth_after_first_tenth_mib']:.1f} MiB); median step "
          f"{res['median_step_ms_early']:.2f} ms early, {res['median_step_ms_late']:.2f} ms late "
          f"(drift {res['drift']:.2f}x)")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
