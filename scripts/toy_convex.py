#!/usr/bin/env python3
"""Efficient-Adam's toy experiment: a stochastic least-squares problem, 4 simulated workers.

Prints the optimality gap f(x_t) - f(x*) for full-precision Adam and Efficient-Adam, and for
quantized Efficient-Adam with and without (two-way) error feedback; writes a plot and JSON.

    python scripts/toy_convex.py [--steps 1500] [--plot toy_convex.png] [--json toy_convex.json]
"""
import argparse
import json

from tqdm import tqdm

from hvd_qadam.examples.toy_convex import run

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
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, r in results.items():
            ax.semilogy(r["steps"], r["gap"], label=name, ls="--" if "no EF" in name else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("f(x_t) - f(x*)")
        ax.set_title("Toy stochastic least squares: error feedback vs none")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
