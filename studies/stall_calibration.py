"""The measurement behind hvd_qadam's stall rule (hvd_qadam/stall.py, docs/stall_rule.md).

For each quantizer setting: the rule's numbers (zero fraction, one-step error factor, error
feedback's steady-state residual ratio on Gaussian buckets) and a real run: the digits MLP
(harness/digits.py, ~26k parameters) trained with Adam under ``hvd_qadam.DistributedOptimizer``
on N simulated ranks (the real engine and codecs; :func:`hvd_qadam.simulate`), error feedback on,
compared with the same run at full precision (``quantizer="none"``). The rule's own check is
bypassed here so that refused settings can be measured.

    python studies/stall_calibration.py --ranks 3 --steps 280 --out docs/stall_rule.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import hvd_qadam
from hvd_qadam import stall

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import digits  # noqa: E402

# (quantizer, bits, bucket_size, rounding)
SETTINGS = [
    ("qsgdinf", 6, 128, "nearest"), ("qsgdinf", 4, 128, "nearest"), ("qsgdinf", 2, 128, "nearest"),
    ("terngrad", 2, 512, "nearest"), ("sign", 1, 512, "nearest"),
    ("qsgd", 6, 512, "nearest"), ("qsgd", 5, 512, "nearest"), ("qsgd", 4, 128, "nearest"),
    ("qsgd", 4, 256, "nearest"), ("qsgd", 4, 512, "nearest"), ("qsgd", 4, 1024, "nearest"),
    ("qsgd", 3, 32, "nearest"), ("qsgd", 3, 64, "nearest"), ("qsgd", 3, 128, "nearest"),
    ("nuq", 3, 128, "nearest"), ("nuq", 4, 512, "nearest"),
    ("qsgd", 4, 128, "stochastic"), ("qsgd", 4, 512, "stochastic"),
]


def final_loss(ranks: int, steps: int, seed: int, **kwargs) -> tuple:
    """(training cross-entropy over the whole training set, test accuracy) after ``steps`` steps
    (rank 0's model; every rank holds the same weights)."""
    def worker(rank, comm):
        def make(m):
            return hvd_qadam.DistributedOptimizer(digits.base_optimizer(m), m.named_parameters(), comm=comm,
                                                  seed=seed, **kwargs)
        model, _ = digits.train(rank, comm.size, make, epochs=10 ** 6, max_steps=steps, seed=seed)
        return model
    model = hvd_qadam.simulate(ranks, worker)[0]
    x, y, x_test, y_test = digits.load_digits_split(seed)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y)), digits.accuracy(model, x_test, y_test)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=280)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    stall.check = lambda config: None          # measure refused settings too
    rows = []

    def losses(**kw):
        runs = [final_loss(args.ranks, args.steps, s, **kw) for s in range(args.seeds)]
        return [r[0] for r in runs], sum(r[1] for r in runs) / len(runs)
    t0 = time.time()
    base, base_acc = losses(quantizer="none")
    print(f"full precision: loss {sum(base) / len(base):.4f}, test accuracy {base_acc:.2%} "
          f"({time.time() - t0:.0f} s)", flush=True)
    print("| quantizer | bits | bucket | rounding | zero fraction | one-step error | residual ratio | verdict | "
          "final loss | x full precision | test accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for q, b, d, r in SETTINGS:
        est = stall.estimate(q, b, d, r == "stochastic")
        got, acc = losses(quantizer=q, bits=b, bucket_size=d, rounding=r)
        ratio = sum(g / f for g, f in zip(got, base)) / len(got)
        rows.append(dict(quantizer=q, bits=b, bucket_size=d, rounding=r, zero_fraction=est.zero_fraction,
                         omega=est.omega, residual_ratio=est.residual_ratio, verdict=est.verdict,
                         loss=sum(got) / len(got), loss_ratio=ratio, test_accuracy=acc))
        print(f"| {q} | {b} | {d} | {r} | {est.zero_fraction:.2f} | {est.omega:.2f} | {est.residual_ratio:.2f} | "
              f"{est.verdict} | {sum(got) / len(got):.4f} | {ratio:.2f}x | {acc:.2%} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ranks": args.ranks, "steps": args.steps, "seeds": args.seeds,
                       "full_precision_loss": sum(base) / len(base), "full_precision_accuracy": base_acc,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
