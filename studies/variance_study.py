#!/usr/bin/env python3
"""Quantization variance on real gradients: fixed grids against adapted levels (ALQ / AMQ).

Trains the digits MLP single-process with Adam, capturing the flattened network-wide gradient
every few steps. Half of the captured gradients are used to fit the adaptive levels (their
statistics summed, as ranks would allreduce them), the other half to measure, for every bit width
and bucket size, the normalised variance

    E ||Q(g) - g||^2 / ||g||^2

averaged over stochastic-rounding seeds and held-out gradients. Fixed grids: qsgdinf (uniform,
max-abs scale), nuq (NUQSGD, {0, +-2^-j}), terngrad (2 bits), and exp0.5 (+-2^-j without zero:
the adaptive quantizers' starting codebook, i.e. the ALQ paper's "NUQSGD"). Adapted: alq, amq
(norm-weighted mixture over the largest buckets) and alq_n, amq_n (one pooled truncated normal).
Diagnostic column ``oracle``: the same ALQ coordinate descent run on the exact empirical
distribution of the fit gradients' r (each coordinate weighted by its bucket's share of ||g||^2,
which makes Psi exactly the normalised variance): what adapted levels could reach with a perfect
density model, separating "adapting the levels" from "the truncated-normal fit".

    python studies/variance_study.py [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

try:
    import hvd_qadam
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hvd_qadam
from hvd_qadam import adaptive
from hvd_qadam.quant import codebooks as cb

sys.path.append(str(Path(__file__).resolve().parents[1]))  # harness/
from harness import digits  # noqa: E402
from harness.study_output import figure, write_json  # noqa: E402

FIXED = ("qsgdinf", "nuq", "terngrad", "exp0.5")
ADAPTED = ("alq", "amq", "alq_n", "amq_n")
ORACLE = "oracle"


def capture_gradients(epochs: int, every: int, batch: int, lr: float, seed: int) -> list[np.ndarray]:
    """Flattened full-model minibatch gradients captured every ``every`` Adam steps."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits.load_digits_split(seed)
    model = digits.make_model(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    grads, step = [], 0
    for epoch in range(epochs):
        for idx in digits.batches(len(x_train), batch, epoch, seed):
            opt.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            if step % every == 0:
                grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
            opt.step()
            step += 1
    acc = digits.accuracy(model, x_test, y_test)
    print(f"captured {len(grads)} gradients of {grads[0].size} coordinates over {step} Adam steps "
          f"(test accuracy after training {acc:.3f})")
    return grads


def empirical_alq_levels(vectors, bucket: int, starts, sweeps: int = 30) -> np.ndarray:
    """ALQ's coordinate descent on the empirical distribution of r (the ``oracle`` column).

    Each coordinate carries weight s_k^2 (its bucket's squared norm), so the empirical Psi is the
    normalised variance itself. The closed-form step l = F^-1(F(b) - int_a^b (r - a) dF / (b - a))
    holds for any distribution; with a discrete F it lands on a data point.
    """
    rs, ws = [], []
    for g in vectors:
        g = g.astype(np.float64)
        for k in range(0, g.size, bucket):
            x = g[k:k + bucket]
            s = np.linalg.norm(x)
            if s > 0:
                rs.append(x / s)
                ws.append(np.full(x.size, s * s))
    r, w = np.concatenate(rs), np.concatenate(ws)
    order = np.argsort(r, kind="stable")
    r, w = r[order], w[order] / w.sum()
    cum_w = np.concatenate([[0.0], np.cumsum(w)])          # cum_w[i] = weight of r[:i]
    cum_wr = np.concatenate([[0.0], np.cumsum(w * r)])

    def empirical_psi(levels):
        j = np.clip(np.searchsorted(levels, r, side="right") - 1, 0, levels.size - 2)
        return float(np.sum(w * (levels[j + 1] - r) * (r - levels[j])))

    fits = [descend(np.array(s, dtype=np.float64), r, cum_w, cum_wr, sweeps) for s in starts]
    return min(fits, key=empirical_psi)


def descend(levels, r, cum_w, cum_wr, sweeps):
    """Coordinate sweeps over the inner levels on sorted data r with cumulative weights."""
    for _ in range(sweeps):
        before = levels.copy()
        for j in range(1, levels.size - 1):
            a, b = levels[j - 1], levels[j + 1]
            i0, i1 = np.searchsorted(r, [a, b], side="right")
            mass = cum_w[i1] - cum_w[i0]
            if mass <= 0:
                continue
            left_moment = (cum_wr[i1] - cum_wr[i0]) - a * mass
            target = cum_w[i1] - left_moment / (b - a)
            i = min(int(np.searchsorted(cum_w, target, side="left")), r.size)
            levels[j] = np.clip(r[max(i - 1, 0)], a, b)
        if np.array_equal(levels, before):
            break
    return levels


def normalised_variance(g: np.ndarray, quantizer: str, bits: int, bucket: int, seeds, codebook=None,
                        backend=None) -> float:
    """Mean over seeds of ||Q(g) - g||^2 / ||g||^2."""
    g64 = g.astype(np.float64)
    total = float(g64 @ g64)
    if quantizer == "exp0.5":
        name, codebook = "alq", cb.default_adaptive_codebook(bits)
    else:
        name = "alq" if quantizer == ORACLE else quantizer
    extra = {} if codebook is None else {"codebook": codebook}
    out = []
    for s in seeds:
        payload = hvd_qadam.quantize(g, name, bits, bucket, seed=s, backend=backend, **extra)
        q = hvd_qadam.dequantize(payload, backend=backend).astype(np.float64)
        out.append(float(((q - g64) ** 2).sum()) / total)
    return float(np.mean(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--buckets", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--epochs", type=int, default=5, help="Adam epochs while capturing gradients")
    ap.add_argument("--capture-every", type=int, default=10, help="capture a gradient every this many steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-gradients", type=int, default=8, help="held-out gradients measured (at most)")
    ap.add_argument("--seeds", type=int, default=5, help="stochastic-rounding seeds per gradient")
    ap.add_argument("--num-top-buckets", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default=None, choices=["numpy", "numba", "auto"],
                    help="CPU quantizer backend (default: the package's choice); results are identical")
    ap.add_argument("--json", default=None, help="write all numbers and levels here")
    ap.add_argument("--plot", default=None, help="write a figure here (png/pdf)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 avoids oversubscription for this small model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    grads = capture_gradients(args.epochs, args.capture_every, args.batch, args.lr, args.seed)
    fit_set, eval_set = grads[0::2], grads[1::2]
    # Spread the measured gradients over training (early gradients differ from late ones).
    pick = np.unique(np.linspace(0, len(eval_set) - 1, min(args.eval_gradients, len(eval_set))).round().astype(int))
    eval_set = [eval_set[i] for i in pick]
    seeds = list(range(1000, 1000 + args.seeds))

    results, levels = {}, {}
    fit_seconds = []
    configs = [(b, B) for b in args.bits for B in args.buckets]
    for bits, bucket in tqdm(configs, desc="bits x bucket", unit="cfg"):
        row = {}
        for q in FIXED + ADAPTED + (ORACLE,):
            if q == "terngrad" and bits != 2:
                continue
            codebook = None
            if q in ADAPTED:
                adapter = adaptive.LevelAdapter(q, bits, bucket, num_top_buckets=args.num_top_buckets)
                t0 = time.perf_counter()
                stats = sum(adapter.local_stats([g]) for g in fit_set)
                codebook = adapter.update(stats)
                fit_seconds.append(time.perf_counter() - t0)
                levels[f"{q}/{bits}/{bucket}"] = {"levels": [float(v) for v in codebook], "p": adapter.p,
                                                  "psi": adapter.last_psi}
            elif q == ORACLE:
                starts = [levels[f"alq/{bits}/{bucket}"]["levels"], np.linspace(-1, 1, 2 ** bits)]
                codebook = adaptive.to_codebook(empirical_alq_levels(fit_set, bucket, starts), bits)
                levels[f"{q}/{bits}/{bucket}"] = {"levels": [float(v) for v in codebook]}
            row[q] = float(np.mean([normalised_variance(g, q, bits, bucket, seeds, codebook, args.backend)
                                    for g in eval_set]))
        results[f"{bits}/{bucket}"] = row

    cols = list(FIXED + ADAPTED) + [ORACLE]
    print(f"\nNormalised variance E||Q(g)-g||^2/||g||^2 on {len(eval_set)} held-out digits-MLP gradients "
          f"x {len(seeds)} seeds (levels fit on {len(fit_set)} others); lower is better.\n"
          f"gain = (that variance) / (best of alq, amq, alq_n, amq_n): above 1 means adapted levels win")
    header = f"{'bits':>4} {'bucket':>6} " + " ".join(f"{c:>9}" for c in cols) + "   gain: vs nuq  vs best fixed"
    print(header)
    print("-" * len(header))
    for bits in args.bits:
        for bucket in args.buckets:
            row = results[f"{bits}/{bucket}"]
            cells = " ".join(f"{row[c]:>9.4g}" if c in row else f"{'-':>9}" for c in cols)
            best_fixed = min(row[c] for c in FIXED if c in row)
            best_adapted = min(row[c] for c in ADAPTED)
            gains = f"{row['nuq'] / best_adapted:9.2f}x {best_fixed / best_adapted:9.2f}x"
            print(f"{bits:>4} {bucket:>6} {cells}   {gains}")

    print("\nLearned levels (ALQ: all levels; AMQ: multiplier p, levels +-p^j)")
    for bits in args.bits:
        for bucket in args.buckets:
            alq = levels[f"alq/{bits}/{bucket}"]["levels"]
            amq = levels[f"amq/{bits}/{bucket}"]
            print(f"  {bits} bits, bucket {bucket:>5}: ALQ [" + ", ".join(f"{v:.3g}" for v in alq) + "]")
            print(f"  {'':>21}  AMQ p = {amq['p']:.4f}  (NUQSGD-style grid: p = 0.5)")
            print(f"  {'':>21}  oracle [" + ", ".join(f"{v:.3g}" for v in levels[f"oracle/{bits}/{bucket}"]["levels"])
                  + "]")
    print(f"\nlevel fit time: mean {1e3 * np.mean(fit_seconds):.1f} ms, max {1e3 * np.max(fit_seconds):.1f} ms "
          f"(statistics of {len(fit_set)} gradients + fit)")

    if args.json:
        write_json(args.json, {"config": vars(args), "num_fit_gradients": len(fit_set),
                               "num_eval_gradients": len(eval_set), "normalised_variance": results, "levels": levels})
    if args.plot:
        plot(args, results, levels)


def plot(args, results, levels):
    with figure(args.plot, 1, len(args.bits) + 1, figsize=(4.2 * (len(args.bits) + 1), 3.8)) as (fig, axes):
        styles = {"qsgdinf": "C0o--", "nuq": "C1s--", "terngrad": "C2^--", "exp0.5": "C7d--",
                  "alq": "C3o-", "amq": "C4s-", "alq_n": "C5o:", "amq_n": "C6s:", ORACLE: "k*-."}
        for ax, bits in zip(axes, args.bits):
            for q, style in styles.items():
                ys = [results[f"{bits}/{B}"].get(q) for B in args.buckets]
                if ys[0] is not None:
                    ax.plot(args.buckets, ys, style, label=q, ms=4)
            ax.set(xscale="log", yscale="log", title=f"{bits} bits", xlabel="bucket size")
            ax.set_xticks(args.buckets, [str(b) for b in args.buckets])
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("E||Q(g)-g||² / ||g||²")
        axes[0].legend(fontsize=7)
        # The levels at the paper's setting (3 bits, the largest bucket), on a symmetric-log axis.
        bits = 3 if 3 in args.bits else args.bits[0]
        bucket = args.buckets[-1]
        ax = axes[-1]
        rows = [("nuq", cb.codebook("nuq", bits)), ("exp0.5", cb.default_adaptive_codebook(bits)),
                ("amq", levels[f"amq/{bits}/{bucket}"]["levels"]), ("alq", levels[f"alq/{bits}/{bucket}"]["levels"]),
                (ORACLE, levels[f"{ORACLE}/{bits}/{bucket}"]["levels"])]
        for i, (name, lv) in enumerate(rows):
            ax.plot(lv, np.full(len(lv), i), "|", color=re.match(r"C\d|k", styles[name]).group(0), ms=14, mew=2)
        ax.set(xscale="symlog", title=f"levels, {bits} bits, bucket {bucket}", xlim=(-1.05, 1.05))
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows])
        ax.grid(alpha=0.3)


if __name__ == "__main__":
    main()
