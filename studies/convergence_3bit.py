#!/usr/bin/env python3
"""3-bit convergence on digits: fixed grids (qsgdinf, nuq) against adapted levels (alq, amq).

A single-process simulation of data parallelism, as the ALQ paper ran it: N workers each take
their shard of the global batch, compute a gradient at the shared weights, quantize it
independently (hvd_qadam.quantize, a counter-based stream per (seed, worker, step)); the
dequantized gradients are averaged and plain SGD with momentum consumes the average. No error
feedback (the quantizers are unbiased). ALQ/AMQ refit their levels on the schedule from the
workers' summed statistics, exactly as ranks would allreduce them. ``full`` is the uncompressed
average (the paper's "SuperSGD").

Reports final test accuracy (mean, std, min..max over seeds), final training loss, the measured
quantization variance during training, and the level-update overhead as a fraction of training
time.

The default setting (lr 0.1, 10 epochs, 16 samples per worker, bucket 8192) is one where the
uncompressed run converges but quantization noise can still hurt; at lr 0.05 / 30 epochs every
method, nuq included, reaches the same accuracy on this easy task.

    python studies/convergence_3bit.py [--seeds 10] [--epochs 10] [--json out.json] [--plot out.png]
"""
from __future__ import annotations

import argparse
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
from hvd_qadam.quant import rng

sys.path.append(str(Path(__file__).resolve().parents[1]))  # harness/
from harness import digits  # noqa: E402
from harness.study_output import figure, write_json  # noqa: E402

METHODS = ("full", "qsgdinf", "nuq", "alq", "amq")


def run(method: str, seed: int, args) -> dict:
    """Train once; return per-epoch history and timings."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits.load_digits_split(0)  # one data split; seeds vary the rest
    model = digits.make_model(seed=seed)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    global_batch = args.workers * args.batch_per_worker
    steps_per_epoch = len(x_train) // global_batch
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.5 * total_steps), int(0.75 * total_steps)], 0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    adapter = None
    if method in adaptive.ADAPTIVE_QUANTIZERS:
        adapter = adaptive.LevelAdapter(method, args.bits, args.bucket_size, schedule=args.schedule,
                                        every=args.every, num_top_buckets=args.num_top_buckets)

    history, step, diverged = [], 0, False
    level_seconds, level_updates, variances = 0.0, [], []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        losses = []
        for idx in digits.batches(len(x_train), global_batch, epoch, seed):
            worker_grads = []
            for w in range(args.workers):
                i = digits.shard(idx, w, args.workers)
                opt.zero_grad()
                loss = loss_fn(model(x_train[i]), y_train[i])
                loss.backward()
                losses.append(loss.item())
                worker_grads.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy())
            if not all(np.isfinite(g).all() for g in worker_grads):
                diverged = True  # recorded, not raised: a diverging method is a result
                break
            if method == "full":
                mean_grad = np.mean(worker_grads, axis=0)
            else:
                codebook = None
                if adapter is not None:
                    if adapter.due(step):
                        t0 = time.perf_counter()
                        summed = sum(adapter.local_stats([g]) for g in worker_grads)  # = allreduce(Sum)
                        adapter.update(summed, step=step)
                        level_seconds += time.perf_counter() - t0
                        level_updates.append({"step": step, "levels": [float(v) for v in adapter.codebook],
                                              "p": adapter.p})
                    codebook = adapter.codebook
                decoded = []
                for w, g in enumerate(worker_grads):
                    key = rng.stream_key(seed, rank=w, step=step)
                    payload = hvd_qadam.quantize(g, method, args.bits, args.bucket_size, key=key,
                                                 codebook=codebook, backend=args.backend)
                    decoded.append(hvd_qadam.dequantize(payload, backend=args.backend))
                    if step % 10 == 0:
                        variances.append(float(np.sum((decoded[-1].astype(np.float64) - g) ** 2) /
                                               max(float(np.sum(g.astype(np.float64) ** 2)), 1e-300)))
                mean_grad = np.mean(decoded, axis=0)
            flat = torch.from_numpy(np.ascontiguousarray(mean_grad, dtype=np.float32))
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            opt.step()
            sched.step()
            step += 1
        if diverged:
            history += [{"epoch": e + 1, "train_loss": float("nan"), "test_accuracy": 0.0}
                        for e in range(epoch, args.epochs)]
            break
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                        "test_accuracy": digits.accuracy(model, x_test, y_test)})
    total_seconds = time.perf_counter() - start
    return {"history": history, "seconds": total_seconds, "level_seconds": level_seconds,
            "level_updates": level_updates, "steps": step, "diverged": diverged,
            "quantization_variance": float(np.mean(variances)) if variances else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="full and any of qsgdinf, nuq, qsgd, alq, amq, alq_n, amq_n")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-per-worker", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--bucket-size", type=int, default=8192, help="the ALQ paper's CIFAR-10 setting")
    ap.add_argument("--schedule", type=lambda s: tuple(int(v) for v in s.split(",") if v), default=(0, 100, 2000),
                    help="level-update steps, comma separated")
    ap.add_argument("--every", type=int, default=10000, help="then update every this many steps")
    ap.add_argument("--num-top-buckets", type=int, default=50)
    ap.add_argument("--backend", default=None, choices=["numpy", "numba", "auto"],
                    help="CPU quantizer backend (default: the package's choice); results are identical")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 avoids oversubscription for this small model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {m: [] for m in args.methods}
    jobs = [(m, s) for s in range(args.seeds) for m in args.methods]
    for method, seed in tqdm(jobs, desc="runs", unit="run"):
        results[method].append(run(method, seed, args))

    steps = results[args.methods[0]][0]["steps"]
    print(f"\n{args.bits}-bit quantized SGD (momentum {args.momentum}) on digits: {args.workers} simulated workers x "
          f"batch {args.batch_per_worker}, bucket {args.bucket_size}, {args.epochs} epochs = {steps} steps, "
          f"{args.seeds} seeds; levels refit at steps {sorted(u['step'] for u in _updates(results))}")
    header = (f"{'method':>8} {'test acc % (mean +- std)':>25} {'min..max':>13} {'diverged':>8} "
              f"{'final train loss':>17} {'E||Q(g)-g||^2/||g||^2':>22}")
    print(header)
    print("-" * len(header))
    summary = {}
    for m in args.methods:
        runs = results[m]
        acc = np.array([r["history"][-1]["test_accuracy"] for r in runs]) * 100  # a diverged run scores 0
        ok = [r for r in runs if not r["diverged"]]
        loss = np.array([r["history"][-1]["train_loss"] for r in ok]) if ok else np.array([np.nan])
        var = np.mean([r["quantization_variance"] for r in runs])
        summary[m] = {"test_accuracy_mean": float(acc.mean()),
                      "test_accuracy_std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
                      "test_accuracy_min": float(acc.min()), "test_accuracy_max": float(acc.max()),
                      "diverged": len(runs) - len(ok), "runs": len(runs),
                      "train_loss_mean_converged": float(loss.mean()), "train_loss_std_converged": float(loss.std()),
                      "quantization_variance": float(var)}
        if len(ok) < len(runs):
            ok_acc = np.array([r["history"][-1]["test_accuracy"] for r in ok]) * 100
            summary[m]["test_accuracy_mean_converged"] = float(ok_acc.mean()) if ok else None
        s = summary[m]
        print(f"{m:>8} {s['test_accuracy_mean']:>15.2f} +- {s['test_accuracy_std']:<5.2f} "
              f"{s['test_accuracy_min']:>6.2f}..{s['test_accuracy_max']:<6.2f} {s['diverged']:>4}/{s['runs']:<3} "
              f"{s['train_loss_mean_converged']:>10.4f} +- {s['train_loss_std_converged']:<5.3f} {var:>15.4g}")
    for m, s in summary.items():
        if s["diverged"]:
            print(f"  {m}: {s['diverged']} of {s['runs']} runs diverged (scored 0%); the other runs average "
                  f"{s['test_accuracy_mean_converged']:.2f}%; train loss is over converged runs only")

    print("\nLevel-update overhead (statistics of the workers' gradients + allreduce-equivalent sum + fit):")
    for m in args.methods:
        runs = results[m]
        if not runs[0]["level_updates"]:
            continue
        lvl = sum(r["level_seconds"] for r in runs)
        tot = sum(r["seconds"] for r in runs)
        n = sum(len(r["level_updates"]) for r in runs)
        summary[m]["level_update_fraction"] = lvl / tot
        summary[m]["level_update_ms"] = 1e3 * lvl / n
        step_ms = 1e3 * (tot - lvl) / sum(r["steps"] for r in runs)
        summary[m]["step_ms"] = step_ms
        print(f"  {m:>5}: {100 * lvl / tot:.2f}% of training time: {1e3 * lvl / n:.0f} ms per update, "
              f"{n // len(runs)} updates per run of {runs[0]['steps']} steps at {step_ms:.1f} ms per step")
        last = runs[0]["level_updates"][-1]
        shown = ", ".join(f"{v:.3g}" for v in last["levels"])
        print(f"         levels at step {last['step']} (seed 0): [{shown}]"
              + (f"  p = {last['p']:.3f}" if last["p"] is not None else ""))

    if args.json:
        write_json(args.json, {"config": vars(args), "summary": summary, "runs": results})
    if args.plot:
        plot(args, results)


def _updates(results):
    for runs in results.values():
        if runs and runs[0]["level_updates"]:
            return runs[0]["level_updates"]
    return []


def plot(args, results):
    with figure(args.plot, 1, 2, figsize=(11, 4)) as (fig, (ax_acc, ax_loss)):
        for i, (m, all_runs) in enumerate(results.items()):
            runs = [r for r in all_runs if not r["diverged"]]
            if not runs:
                continue
            label = m if len(runs) == len(all_runs) else f"{m} ({len(all_runs) - len(runs)} diverged, not shown)"
            epochs = [h["epoch"] for h in runs[0]["history"]]
            acc = np.array([[h["test_accuracy"] * 100 for h in r["history"]] for r in runs])
            loss = np.array([[h["train_loss"] for h in r["history"]] for r in runs])
            for ax, y in ((ax_acc, acc), (ax_loss, loss)):
                ax.plot(epochs, y.mean(0), color=f"C{i}", label=label)
                ax.fill_between(epochs, y.min(0), y.max(0), color=f"C{i}", alpha=0.15)
        ax_acc.set(xlabel="epoch", ylabel="test accuracy % (mean, min..max band)", ylim=(80, 100))
        ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log")
        ax_acc.legend()
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
        fig.suptitle(f"digits, {args.bits}-bit gradients, {args.workers} simulated workers, bucket {args.bucket_size}")


if __name__ == "__main__":
    main()
