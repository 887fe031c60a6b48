"""What telemetry costs per step: one process (a one-rank simulated world, so only the optimizer's
own work is timed), an MLP of ``--hidden`` units, Adam under ``hvd_qadam.DistributedOptimizer``
with telemetry off, to a JSON-lines file, or to TensorBoard. Prints the median and the minimum
step time of ``--repeats`` blocks of ``--steps`` steps, as CPU time of the thread (one torch
thread: what a step computes, not what other processes on a shared machine took from it) and
as wall time, the modes interleaved so that drifts hit them alike.

    python bench/bench_telemetry.py --hidden 1024 --modes off,jsonl,tensorboard

``--parts`` times instead, alone, the pieces telemetry adds to a step (the best of repeated
loops, CPU time): the test the optimizer makes when telemetry is off, and when it is on the
residual ratio (two norms over the model) and the writing of one record.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import hvd_qadam
from hvd_qadam.comm import SimWorld


def make(hidden: int, mode: str, folder: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    kw = {}
    if mode == "jsonl":
        kw["telemetry"] = os.path.join(folder, "bench.jsonl")
    elif mode == "tensorboard":
        kw["telemetry"] = os.path.join(folder, "tb")
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model.named_parameters(),
                                         comm=SimWorld(1).comm(0), **kw)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    return model, opt, x, y


def block(model, opt, x, y, steps: int) -> tuple:
    """(CPU, wall) seconds per step over ``steps`` steps (forward, backward, step)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.thread_time() - c0) / steps, (time.perf_counter() - t0) / steps


def best_of(fn, loops: int, repeats: int = 7) -> float:
    """Least CPU seconds per call of ``fn`` over ``repeats`` loops of ``loops`` calls."""
    best = float("inf")
    for _ in range(repeats):
        c0 = time.thread_time()
        for _ in range(loops):
            fn()
        best = min(best, (time.thread_time() - c0) / loops)
    return best


def parts(hidden: int) -> dict:
    from hvd_qadam.telemetry import residual_ratio
    with tempfile.TemporaryDirectory() as folder:
        out = {}
        model, opt, x, y = make(hidden, "off", folder)
        block(model, opt, x, y, 3)
        eng = opt.engine
        # the statement _exchange_and_apply runs when telemetry is off (None)
        out["off_check_ns"] = 1e9 * best_of(
            lambda: opt._telemetry is not None and opt._telemetry.wants(eng.stats.step, eng.rank), 200_000)
        out["residual_ratio_ms"] = 1e3 * best_of(lambda: residual_ratio(eng, opt._grad_bufs), 50)
        for mode in ("jsonl", "tensorboard"):
            model, opt, x, y = make(hidden, mode, folder)
            block(model, opt, x, y, 3)
            rec, stats = opt._telemetry, opt.engine.stats
            out[f"record_{mode}_ms"] = 1e3 * best_of(lambda: rec.record(stats, 0.0, 0.1, 1, opt.config), 200)
            out["step_cpu_ms"] = 1e3 * min(block(model, opt, x, y, 10)[0] for _ in range(3))
    return {k: round(v, 4) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--modes", default="off,jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", action="store_true", help="time the pieces telemetry adds, alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.parts:
        print(json.dumps(dict(hidden=args.hidden, **parts(args.hidden))))
        return 0
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as folder:
        runs = {m: make(args.hidden, m, folder) for m in modes}
        for m in modes:
            block(*runs[m], 10)                         # warm-up: kernels compiled, buffers allocated
        times = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                times[m].append(block(*runs[m], args.steps))
    params = sum(p.numel() for p in runs[modes[0]][0].parameters())
    out = {"parameters": params, "threads": args.threads}
    for i, clock in enumerate(("cpu", "wall")):
        out[f"{clock}_median_step_ms"] = {m: round(1e3 * statistics.median(t[i] for t in v), 3) for m, v in times.items()}
        out[f"{clock}_min_step_ms"] = {m: round(1e3 * min(t[i] for t in v), 3) for m, v in times.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
