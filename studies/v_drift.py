#!/usr/bin/env python3
"""How stale does 1-bit Adam's frozen second moment get? Adam's own v, measured on the LM.

Trains an LM of harness/lm.py in one process with torch's Adam on the mean gradient of the same
per-rank batches that ``train_lm.py`` gives N ranks (so the trajectory is Horovod Adam's), with
the same cosine schedule. At each freeze step F given, it keeps Adam's bias-corrected second
moment v_hat_F; every ``--every`` steps after it, it records, over all coordinates,

    median(v_hat_t / v_hat_F)      (coordinates with v_hat_F > 0)

that is how far the v that ``onebit_adam`` froze at F has drifted from the v Adam uses at t
(below 1: Adam's steps are larger than the frozen-v steps there), and the gradient norm.

    python studies/v_drift.py --size base --steps 1000 --stop-at 400 --batch 4 --freeze 100 200 \
        --json docs/v_drift.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

# The repository's root, for harness/.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import lm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base")
    p.add_argument("--steps", type=int, default=1000, help="the run's length (its learning-rate schedule)")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (default: --steps)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--ranks", type=int, default=3, help="ranks whose batches are averaged")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze", type=int, nargs="+", default=[100, 200])
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    corpus = lm.load_corpus()
    model = lm.make_lm(args.size, seed=args.seed)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    b2 = opt.param_groups[0]["betas"][1]
    samplers = [lm.BatchSampler(corpus.train, model.ctx, args.batch, seed=args.seed, rank=r)
                for r in range(args.ranks)]
    warm = max(1, args.steps // 20)                 # train_lm.py's schedule

    def lr_at(s):
        if s < warm:
            return args.lr * (s + 1) / warm
        frac = (s - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def v_hat(t):
        return torch.cat([opt.state[q]["exp_avg_sq"].reshape(-1) for q in params]) / (1 - b2 ** t)

    frozen, records = {}, []
    t0 = time.perf_counter()
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    for s in tqdm(range(stop), desc="adam", unit="step", file=sys.stderr, disable=None):
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        opt.zero_grad()
        loss = 0.0
        for sampler in samplers:
            x, y = sampler.batch(s)
            part = model.loss(x, y) / len(samplers)
            part.backward()
            loss += part.item()
        gnorm = math.sqrt(sum(float(q.grad.square().sum()) for q in params))
        opt.step()
        t = s + 1
        if t in args.freeze:
            frozen[t] = v_hat(t)
        if t % args.every == 0:
            rec = {"step": t, "train_loss": loss, "grad_norm": gnorm}
            vt = v_hat(t)
            for f, vf in frozen.items():
                if t > f:
                    live = vf > 0
                    rec[f"median_v_over_v{f}"] = float((vt[live] / vf[live]).median())
            records.append(rec)
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}),
                       file=sys.stderr)
    out = {"meta": {**vars(args), "params": lm.count_params(model), "wall_s": time.perf_counter() - t0,
                    "data": corpus.source}, "records": records}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
