#!/usr/bin/env python3
"""The main job: data-parallel training of an MLP on scikit-learn's digits with hvd_qadam.

    horovodrun -np 3 python examples/train_digits.py            # or: mpirun -np 3 python ...

Trains the same model twice from the same seed: first with plain ``hvd.DistributedOptimizer``
(uncompressed fp32 allreduce), then with ``hvd_qadam.DistributedOptimizer`` (its defaults: 6-bit
max-abs quantized gradients with error feedback, the topology chosen for the world), printing
per-epoch loss, test accuracy and the bytes each rank sends per step (for Horovod, its ring
allreduce's 2 (N - 1)/N x 4 bytes per parameter), and a final comparison.

Only rank 0 writes. ``--progress`` (default: ``$HVD_QADAM_PROGRESS``, else auto) chooses what:
``bar``, a progress bar with the epoch lines above it, all on stderr (for a terminal: under
mpirun a rank cannot tell, so ``scripts/demo.sh`` decides); ``lines``, one plain line per epoch on
stdout (logs, pipes); ``none``, only the summary. ``auto`` is ``bar`` when stdout and stderr are
terminals, else ``lines``.
"""
import argparse
import json
import os
import sys
import time

from mpi4py import MPI  # before Horovod: mpi4py owns MPI with thread level "multiple"

import horovod.torch as hvd
import torch

import hvd_qadam
from hvd_qadam.config import LinkSpec
# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import digits  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--algorithm", default="qsgd", choices=["qsgd", "efficient_adam", "qadam", "qadam_weights", "ef_sgd",
                                                       "local_sgd"])
p.add_argument("--topology", default="auto", choices=["auto", "allgather", "sharded", "hierarchical"])
p.add_argument("--quantizer", default="qsgdinf", help="uplink quantizer (default: the library's, qsgdinf)")
p.add_argument("--bits", type=int, default=None, help="uplink bits (default: the library's, 6 for qsgdinf)")
p.add_argument("--bucket-size", type=int, default=None, help="elements per scale (default: the library's, 128)")
p.add_argument("--exchange", default=None, choices=["auto", "compressed", "horovod"],
               help="compressed exchange, Horovod's allreduce, or measured (default: the library's)")
p.add_argument("--downlink-quantizer", default=None)
p.add_argument("--downlink-bits", type=int, default=None)
p.add_argument("--no-error-feedback", action="store_true")
p.add_argument("--epochs", type=int, default=20)
p.add_argument("--batch", type=int, default=96, help="global batch size (split over ranks)")
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--no-baseline", action="store_true", help="skip the uncompressed run")
p.add_argument("--json", default=None, help="write the results here (rank 0)")
PROGRESS = ("auto", "bar", "lines", "none")
p.add_argument("--progress", choices=PROGRESS, default=os.environ.get("HVD_QADAM_PROGRESS") or "auto",
               help="rank 0's display (see above; default: $HVD_QADAM_PROGRESS or auto)")
args = p.parse_args()
if args.progress not in PROGRESS:
    p.error(f"HVD_QADAM_PROGRESS must be auto, bar, lines or none, not {args.progress!r}")
if args.progress == "auto":
    args.progress = "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"
# A bar and the lines around it share one stream, so that they reach the terminal in order (a rank's
# stdout and stderr travel through mpirun separately).
out = sys.stderr if args.progress == "bar" else sys.stdout

hvd.init(comm=MPI.COMM_WORLD)
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
main = rank == 0


def log(*a):
    if main:
        print(*a, file=out, flush=True)


def terminal_columns():
    """The bar's width: the terminal's, which scripts/demo.sh passes on as COLUMNS (a rank's stderr
    is a pipe), at most 120; None (tqdm's default) when unknown."""
    try:
        cols = int(os.environ.get("COLUMNS") or 0)
    except ValueError:
        cols = 0
    return max(40, min(cols, 120)) - 1 if cols > 0 else None


def run(label, make_optimizer):
    steps_per_epoch = len(range(0, 1348 - args.batch + 1, args.batch))
    bar = None
    if main and args.progress == "bar":
        from tqdm import tqdm
        bar = tqdm(total=args.epochs * steps_per_epoch, desc=label, unit="step", leave=False, file=out,
                   ncols=terminal_columns(), mininterval=0.25)
    rows = []

    holder = {}

    def on_step(step, opt):
        holder["opt"] = opt
        if bar is not None:
            bar.update(1)

    def on_epoch(h, opt):
        loss = hvd.allreduce(torch.tensor(h["loss"]), name=f"{label}.loss").item()
        stats = getattr(opt, "communication_stats", None)
        sent = stats.sent_bytes if stats is not None else fp32_bytes
        row = dict(h, loss=loss, sent_bytes_per_step=sent, fp32_bytes_per_step=fp32_bytes)
        rows.append(row)
        line = (f"  [{label}] epoch {h['epoch']:3d}  loss {loss:.4f}  test acc {h['test_accuracy']:.4f}  "
                f"sent/step {sent:>8d} B  (Horovod fp32 ring {fp32_bytes} B, {fp32_bytes / sent:.1f}x)")
        if bar is not None:
            bar.write(line, file=out)
        elif main and args.progress == "lines":
            print(line, file=out, flush=True)

    t0 = time.time()
    model, _ = digits.train(rank, size, make_optimizer, epochs=args.epochs, global_batch=args.batch,
                            seed=args.seed, on_step=on_step, on_epoch=on_epoch)
    if bar is not None:
        bar.close()
    return rows, time.time() - t0, getattr(holder.get("opt"), "communication_stats", None)


n_params = sum(q.numel() for q in digits.make_model().parameters())
# what Horovod's ring allreduce sends per rank and step (one rank: the fp32 gradients, once)
fp32_bytes = 8 * (size - 1) * n_params // size if size > 1 else 4 * n_params
log(f"hvd_qadam {hvd_qadam.__version__}: {size} ranks, digits MLP ({n_params} parameters), "
    f"global batch {args.batch}, {args.epochs} epochs")

results = {}
if not args.no_baseline:
    def baseline(model):
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    log("== uncompressed: hvd.DistributedOptimizer, fp32 allreduce")
    results["uncompressed"] = run("fp32", baseline)

bits = LinkSpec(args.quantizer, args.bits).bits     # the width the library resolves bits=None to
label = f"{args.algorithm}/{args.quantizer}{bits}" + ("" if args.no_error_feedback else "+EF")


def compressed(model):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return hvd_qadam.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), algorithm=args.algorithm, topology=args.topology,
        quantizer=args.quantizer, bits=args.bits, bucket_size=args.bucket_size,
        downlink_quantizer=args.downlink_quantizer, downlink_bits=args.downlink_bits,
        error_feedback=not args.no_error_feedback, seed=args.seed, exchange=args.exchange)


log(f"== compressed: hvd_qadam.DistributedOptimizer({args.algorithm}, {args.quantizer} {bits} bits, "
    f"bucket {args.bucket_size or 'default'}, {'no EF' if args.no_error_feedback else 'error feedback'}, {args.topology})")
results[label] = run(label, compressed)

if main:
    log("\n== summary")
    log(f"{'run':<28}{'final loss':>12}{'test acc':>10}{'best acc':>10}{'sent B/step':>13}{'vs fp32':>9}{'time s':>8}")
    for name, (rows, secs, _) in results.items():
        last = rows[-1]
        best = max(r["test_accuracy"] for r in rows)
        log(f"{name:<28}{last['loss']:>12.4f}{last['test_accuracy']:>10.4f}{best:>10.4f}"
            f"{last['sent_bytes_per_step']:>13d}{fp32_bytes / last['sent_bytes_per_step']:>8.1f}x{secs:>8.1f}")
    stats = results[label][2]
    if stats is not None:
        log(f"hvd_qadam topology: {stats.topology} ({stats.topology_reason})")
        log(f"hvd_qadam exchange: {stats.exchange} ({stats.exchange_reason})")
    if stats is not None and stats.totals["level_refits"]:
        secs = results[label][1]
        log(f"adaptive levels: {stats.totals['level_refits']} refits, {1e3 * stats.totals['levels_s']:.1f} ms in total "
            f"= {100 * stats.totals['levels_s'] / secs:.2f}% of the run's {secs:.1f} s")
    if "uncompressed" in results:
        gap = results["uncompressed"][0][-1]["test_accuracy"] - results[label][0][-1]["test_accuracy"]
        log(f"accuracy gap (uncompressed - compressed): {100 * gap:+.2f} points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": size, "args": vars(args),
                       "runs": {k: {"epochs": v[0], "seconds": v[1]} for k, v in results.items()}}, f, indent=1)
hvd.shutdown()
