"""Single-rank step cost: hvd_qadam's optimizer step against torch's own Adam step.

One process, one compute thread, a 10.5M-parameter MLP (10 x Linear(1024, 1024)); a world of one
simulated rank runs the real code path (hooks, fused kernels, frames, commit). Reported per
configuration, median over the timed steps:

  backward+step  time of loss.backward() plus optimizer.step() (hvd_qadam's worker side runs
                 from backward hooks, so step() alone would hide it)
  step cost      backward+step minus the same model's plain backward() time
  vs Adam        step cost / torch Adam.step() (foreach, the default)

    python scripts/bench_step.py [--steps 20] [--json results/step.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
import torch  # noqa: E402

import hvd_qadam  # noqa: E402
from hvd_qadam.comm import SimWorld  # noqa: E402

CONFIGS = {
    "defaults (qsgd algorithm, qsgdinf 4-bit + EF)": {},
    "efficient_adam 4/4-bit": dict(algorithm="efficient_adam", quantizer="qsgdinf", bits=4,
                                   downlink_quantizer="qsgdinf", downlink_bits=4),
    "efficient_adam 1/1-bit sign": dict(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign"),
    "qadam 4/4-bit": dict(algorithm="qadam", quantizer="qsgdinf", bits=4, downlink_quantizer="qsgdinf",
                          downlink_bits=4),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(10)])


def timed(fn, steps, warmup=3, sync=lambda: None):
    out = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU path: CuPy kernels, no host copies)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(32, 1024, device=dev)
    model = make_model().to(dev)
    n = sum(p.numel() for p in model.parameters())

    def backward():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    t_bwd = timed(backward, args.steps, sync=sync)
    res = {"params": n, "threads": 1, "device": str(dev), "backward_s": t_bwd}
    for name, kw in (("torch Adam.step (default)", {}), ("torch Adam.step (fused)", {"fused": True})):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, **kw)
        backward()
        res[name] = timed(opt.step, args.steps, sync=sync)
    adam = res["torch Adam.step (default)"]
    rows = [("torch Adam.step (default)", adam, adam), ("torch Adam.step (fused)", res["torch Adam.step (fused)"],
                                                         res["torch Adam.step (fused)"])]
    world = SimWorld(1)
    for name, kw in CONFIGS.items():
        model = make_model().to(dev)
        opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4),
                                             model.named_parameters(), comm=world.comm(0), **kw)

        def full():
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()

        t_full = timed(full, args.steps, sync=sync)
        cost = t_full - t_bwd        # backward() above is forward + backward of the same model
        res[name] = {"backward_plus_step_s": t_full, "step_cost_s": cost, "vs_adam": cost / adam,
                     "sent_bytes": opt.communication_stats.sent_bytes}
        rows.append((name, t_full, cost))
    print(f"{n / 1e6:.1f}M parameters, one thread; forward+backward alone {t_bwd * 1e3:.1f} ms\n")
    print("| run | forward+backward+step ms | step cost ms | vs torch Adam.step |")
    print("|---|---|---|---|")
    for name, full, cost in rows:
        print(f"| {name} | {(full + (t_bwd if 'torch' in name else 0)) * 1e3:.1f} | {cost * 1e3:.1f} | "
              f"{cost / adam:.2f}x |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
