"""Single-rank step cost: hvd_qadam's optimizer step against torch's own Adam step.

One process, one compute thread, a 10.5M-parameter MLP (10 x Linear(1024, 1024)); a world of one
simulated rank runs the real code path (hooks, fused kernels, frames, commit). Reported per
configuration, median over the timed steps:

  backward+step  time of loss.backward() plus optimizer.step() (hvd_qadam's worker side runs
                 from backward hooks, so step() alone would hide it)
  step cost      backward+step minus the same model's plain backward() time
  vs Adam        step cost / torch Adam.step() (foreach, the default)

    python bench/bench_step.py [--rounds 5] [--steps 6] [--json results/step.json]

Configurations are timed in interleaved rounds (every configuration once per round) and each
ratio is the median over rounds of the ratio within a round, so a slow spell of a shared
machine does not land on one configuration only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
import torch  # noqa: E402

import hvd_qadam  # noqa: E402
from hvd_qadam.comm import SimWorld  # noqa: E402

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness.study_output import write_json  # noqa: E402

CONFIGS = {
    "defaults (qsgd algorithm, qsgdinf 6-bit + EF)": {},
    "the defaults at 4 bits": dict(bits=4),
    "efficient_adam 4/4-bit": dict(algorithm="efficient_adam", quantizer="qsgdinf", bits=4,
                                   downlink_quantizer="qsgdinf", downlink_bits=4),
    "efficient_adam 1/1-bit sign": dict(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign"),
    "qadam 4/4-bit": dict(algorithm="qadam", quantizer="qsgdinf", bits=4, downlink_quantizer="qsgdinf",
                          downlink_bits=4),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(10)])


def timed(fn, steps, warmup=2, sync=lambda: None):
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
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; every round times every configuration")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU path: CuPy kernels, no host copies)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(32, 1024, device=dev)

    # Every configuration gets its own model and optimizer, built once; the rounds then time
    # them one after the other, so a slow spell of a shared machine hits all of them alike, and
    # each ratio is taken within a round (the reported ratio is the median over rounds).
    def backward_of(model):
        def backward():
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
        return backward

    bare = make_model().to(dev)
    n = sum(p.numel() for p in bare.parameters())
    runs = {"backward": backward_of(bare)}
    for name, kw in (("torch Adam.step (default)", {}), ("torch Adam.step (fused)", {"fused": True})):
        model = make_model().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, **kw)
        backward_of(model)()

        def torch_step(opt=opt):
            opt.step()
        runs[name] = torch_step
    world = SimWorld(1)
    optimizers = {}
    for name, kw in CONFIGS.items():
        model = make_model().to(dev)
        opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4),
                                             model.named_parameters(), comm=world.comm(0), **kw)
        optimizers[name] = opt

        def full(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        runs[name] = full
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: timed(fn, args.steps, sync=sync) for name, fn in runs.items()})

    def median_of(f):
        return statistics.median(f(r) for r in rounds)
    t_bwd = median_of(lambda r: r["backward"])
    adam = median_of(lambda r: r["torch Adam.step (default)"])
    res = {"params": n, "threads": 1, "device": str(dev), "rounds": args.rounds, "steps_per_round": args.steps,
           "backward_s": t_bwd, "torch Adam.step (default)": adam,
           "torch Adam.step (fused)": median_of(lambda r: r["torch Adam.step (fused)"])}
    rows = [("torch Adam.step (default)", t_bwd + adam, adam, 1.0),
            ("torch Adam.step (fused)", t_bwd + res["torch Adam.step (fused)"], res["torch Adam.step (fused)"],
             median_of(lambda r: r["torch Adam.step (fused)"] / r["torch Adam.step (default)"]))]
    for name in CONFIGS:
        # backward() of the bare model is forward + backward of the same architecture
        t_full = median_of(lambda r: r[name])
        cost = median_of(lambda r: r[name] - r["backward"])
        ratio = median_of(lambda r: (r[name] - r["backward"]) / r["torch Adam.step (default)"])
        res[name] = {"backward_plus_step_s": t_full, "step_cost_s": cost, "vs_adam": ratio,
                     "sent_bytes": optimizers[name].communication_stats.sent_bytes}
        rows.append((name, t_full, cost, ratio))
    print(f"{n / 1e6:.1f}M parameters, one thread; forward+backward alone {t_bwd * 1e3:.1f} ms; "
          f"medians over {args.rounds} interleaved rounds\n")
    print("| run | forward+backward+step ms | step cost ms | vs torch Adam.step |")
    print("|---|---|---|---|")
    for name, full, cost, ratio in rows:
        print(f"| {name} | {full * 1e3:.1f} | {cost * 1e3:.1f} | {ratio:.2f}x |")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
