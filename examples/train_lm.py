#!/usr/bin/env python3
"""Data-parallel training of a byte-level Transformer LM (harness/lm.py) with Horovod or hvd_qadam.

    mpirun -np 3 python examples/train_lm.py --size tiny --steps 300                    # hvd_qadam defaults
    mpirun -np 3 python examples/train_lm.py --optimizer horovod --compression fp16
    mpirun -np 3 python examples/train_lm.py --algorithm efficient_adam --quantizer sign \\
        --downlink-quantizer sign --topology sharded --json out.json --plot curve.png
    sudo bash bench/netlab.sh --ranks 3 --rate 1gbit -- python3 examples/train_lm.py ...  # shaped links

(as root add --allow-run-as-root to mpirun, with more ranks than cores --oversubscribe; horovodrun
works too.) The corpus is the Python standard library's source (no download; every rank must run the
same Python version: the corpus fingerprint is checked across ranks). Each rank draws its own
batches, deterministic in (seed, rank, step). The hvd_qadam options are passed through only when
given, so the library's defaults apply otherwise. ``--topology ps`` starts one more process: the
last rank becomes the parameter server.

Output: a progress bar on a terminal (rank 0, stderr; ``--progress``) or plain lines otherwise; per evaluation the
train loss (mean over the interval and the ranks) and the validation cross-entropy (nats/byte,
fixed windows); ``--json``: the configuration, parameter count, evaluations, final validation
loss, median step time (slowest rank) and bytes per step; ``--plot``: the loss curves (png).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# The repository's root, for harness/ (appended: hvd_qadam is found where it was before).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QADAM_OPTIONS = [  # (flag, type, help); passed to hvd_qadam.DistributedOptimizer only when given
    ("--algorithm", str, "qsgd, efficient_adam, qadam, qadam_weights, ef_sgd, local_sgd, onebit_adam"),
    ("--topology", str, "allgather, sharded, ps"),
    ("--exchange", str, "auto (the default: measured), compressed, horovod"),
    ("--quantizer", str, "uplink quantizer: qsgd, qsgdinf, nuq, terngrad, sign, alq, amq, fp16, none"),
    ("--bits", int, "uplink bits"),
    ("--bucket-size", int, "uplink bucket size"),
    ("--rounding", str, "uplink rounding: nearest, stochastic"),
    ("--downlink-quantizer", str, "server -> worker quantizer (default: full precision)"),
    ("--downlink-bits", int, None),
    ("--downlink-bucket-size", int, None),
    ("--downlink-rounding", str, None),
    ("--warmup-steps", int, "uncompressed steps first"),
    ("--min-compress-numel", int, "smaller tensors travel as fp32"),
    ("--fusion-threshold-mb", float, None),
    ("--nonfinite", str, "raise or skip"),
    ("--momentum-steps", int, "ef_sgd: momentum for the first E steps only"),
    ("--sync-every", int, "local_sgd averaging period"),
    ("--level-every", int, "alq/amq refit period"),
    ("--freeze-step", lambda s: s if s == "auto" else int(s), "onebit_adam: fp32 warm-up steps, or 'auto'"),
    ("--v-refresh-every", int, "onebit_adam: an uncompressed v refresh every this many steps after the freeze"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=["horovod", "hvd_qadam"], default="hvd_qadam")
    p.add_argument("--compression", choices=["none", "fp16"], default="none", help="--optimizer horovod only")
    q = p.add_argument_group("hvd_qadam options (passed through when given)")
    for flag, typ, hlp in QADAM_OPTIONS:
        q.add_argument(flag, type=typ, default=None, help=hlp)
    q.add_argument("--no-error-feedback", action="store_true")
    q.add_argument("--no-server-error-feedback", action="store_true")
    q.add_argument("--no-bias-correction", action="store_true")
    q.add_argument("--qadam-seed", type=int, default=None, help="hvd_qadam rounding seed (default: --seed)")
    p.add_argument("--size", default="tiny", help="tiny, small, base (harness/lm.py)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (not scaled by the world size)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="linear warm-up over --lr-warmup steps, then cosine to 10%% of --lr, or constant")
    p.add_argument("--lr-warmup", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=128, help="fixed validation windows")
    p.add_argument("--data-bytes", type=int, default=4 << 20, help="corpus byte budget")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="rank 0: a tqdm bar on stderr (auto: when stderr is a terminal - under mpirun it is a "
                        "pipe, so force it with 'bar' if mpirun's output goes to a terminal) or plain lines")
    p.add_argument("--json", default=None, help="write the metrics here (rank 0)")
    p.add_argument("--plot", default=None, help="loss curves (png, rank 0)")
    return p.parse_args()


def _local_ranks() -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def main():
    args = parse_args()
    # Compute threads per rank: HVD_QADAM_THREADS, else this host's cores shared among its ranks.
    # numba's pool is sized when numba is first imported (importing hvd_qadam does that), and an
    # oversized pool spins against the other ranks (measured: 14x slower steps, 2 ranks on 2 cores),
    # so NUMBA_NUM_THREADS must be set before that import.
    threads = int(os.environ.get("HVD_QADAM_THREADS") or max(1, (os.cpu_count() or 1) // _local_ranks()))
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    topology_ps = args.optimizer == "hvd_qadam" and args.topology == "ps"
    if topology_ps:
        import hvd_qadam
        hvd_qadam.ps_init()                 # the server rank serves and exits inside
        import horovod.torch as hvd
    else:
        from mpi4py import MPI  # noqa: F401 - before Horovod: mpi4py owns MPI (thread level "multiple")
        import horovod.torch as hvd
        hvd.init(comm=MPI.COMM_WORLD)
    import numpy as np
    import torch

    from harness import lm

    rank, size = hvd.rank(), hvd.size()
    main_rank = rank == 0
    torch.set_num_threads(threads)

    def log(msg):
        if main_rank:
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)
    bar = None

    corpus = lm.load_corpus(args.data_bytes)
    prints = hvd.allgather_object(corpus.fingerprint)
    if len(set(prints)) != 1:
        raise SystemExit(f"rank {rank}: the ranks read different corpora (CRC32 {[f'{x:08x}' for x in prints]}); "
                         "run the same Python version everywhere")
    model = lm.make_lm(args.size, seed=args.seed)
    n_params = lm.count_params(model)
    base = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    qadam_kwargs = {}
    if args.optimizer == "horovod":
        comp = hvd.Compression.fp16 if args.compression == "fp16" else hvd.Compression.none
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=comp)
        label = f"Horovod {'fp16' if args.compression == 'fp16' else 'fp32'} allreduce"
    else:
        import hvd_qadam
        for flag, _, _ in QADAM_OPTIONS:
            key = flag[2:].replace("-", "_")
            if getattr(args, key) is not None:
                qadam_kwargs[key] = getattr(args, key)
        if args.no_error_feedback:
            qadam_kwargs["error_feedback"] = False
        if args.no_server_error_feedback:
            qadam_kwargs["server_error_feedback"] = False
        if args.no_bias_correction:
            qadam_kwargs["bias_correction"] = False
        qadam_kwargs["seed"] = args.seed if args.qadam_seed is None else args.qadam_seed
        opt = hvd_qadam.DistributedOptimizer(base, named_parameters=model.named_parameters(), **qadam_kwargs)
        label = "hvd_qadam " + (", ".join(f"{k}={v}" for k, v in qadam_kwargs.items() if k != "seed") or "defaults")

    warm = args.lr_warmup if args.lr_warmup is not None else max(1, args.steps // 20)

    def lr_at(step):   # step: 0-based index of the step about to be taken
        if step < warm:
            return args.lr * (step + 1) / warm
        if args.schedule == "constant":
            return args.lr
        frac = (step - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    sampler = lm.BatchSampler(corpus.train, model.ctx, args.batch, seed=args.seed, rank=rank)
    fp32_bytes = 4 * n_params

    def evaluate():
        s, c = lm.evaluate_sum(model, corpus.val, n_windows=args.eval_windows, rank=rank, size=size)
        t = hvd.allreduce(torch.tensor([s, float(c)], dtype=torch.float64), op=hvd.Sum, name="lm.eval")
        return float(t[0] / t[1])

    log(f"{label}: {size} ranks, LM '{args.size}' ({n_params:,} parameters, ctx {model.ctx}), batch {args.batch} x "
        f"{model.ctx} bytes per rank, {args.steps} steps, lr {args.lr:g} ({args.schedule}, warm-up {warm}), "
        f"{threads} thread(s) per rank; data: {corpus.source}")
    if main_rank and (args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())):
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    evals = []
    step_times, interval_losses = [], []
    sent = recv = 0
    paths = {}                      # steps per exchange path (communication_stats.exchange)
    t_start = time.perf_counter()
    val = evaluate()
    evals.append({"step": 0, "train_loss": None, "val_loss": val, "elapsed_s": 0.0})
    log(f"step {0:6d}  val {val:.4f}")
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = sampler.batch(step)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        interval_losses.append(loss.item())
        st = getattr(opt, "communication_stats", None)
        if st is not None:
            sent, recv = int(getattr(st, "sent_bytes", 0)), int(getattr(st, "received_bytes", 0))
            path = getattr(st, "exchange", None) if getattr(st, "compressed", True) else "uncompressed step"
            paths[path] = paths.get(path, 0) + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{interval_losses[-1]:.3f}", refresh=False)
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            train = float(hvd.allreduce(torch.tensor(float(np.mean(interval_losses))), op=hvd.Average,
                                        name="lm.train_loss"))
            interval_losses = []
            val = evaluate()
            elapsed = time.perf_counter() - t_start
            evals.append({"step": done, "train_loss": train, "val_loss": val, "elapsed_s": elapsed,
                          "lr": lr_at(step)})
            ms = 1e3 * float(np.median(step_times[-args.eval_every:]))
            extra = f"  sent/step {sent / 1e6:.3f} MB" if st is not None else ""
            log(f"step {done:6d}  train {train:.4f}  val {val:.4f}  {ms:7.1f} ms/step{extra}  ({elapsed:.0f} s)")
    if bar is not None:
        bar.close()
        bar = None

    all_times = hvd.allgather_object(step_times)
    slowest = [max(ts[i] for ts in all_times) for i in range(len(step_times))]
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "label": label, "ranks": size, "threads_per_rank": threads,
        "hvd_qadam_kwargs": qadam_kwargs if args.optimizer == "hvd_qadam" else None,
        "netlab_rate": os.environ.get("HQ_NETLAB_RATE"),
        "params": n_params, "model": {"size": args.size, "d": model.d, "layers": model.layers,
                                      "heads": model.heads, "ctx": model.ctx},
        "data": {"source": corpus.source, "train_bytes": corpus.train.numel(), "val_bytes": corpus.val.numel(),
                 "crc32": f"{corpus.fingerprint:08x}"},
        "evals": evals,
        "final_val_loss": evals[-1]["val_loss"],
        "median_step_s": float(np.median(slowest)),            # slowest rank per step, then median
        "median_step_s_rank0": float(np.median(step_times)),
        "wall_s": time.perf_counter() - t_start,
        "fp32_bytes": fp32_bytes,
    }
    st = getattr(opt, "communication_stats", None)
    if st is not None:
        totals = getattr(st, "totals", {}) or {}
        n = max(1, totals.get("steps", 0) or args.steps)
        result["bytes_per_step"] = {
            "sent_last": sent, "received_last": recv,
            "sent_mean": totals.get("sent_bytes", 0) / n if totals else None,
            "received_mean": totals.get("received_bytes", 0) / n if totals else None,
            "measured": True}
        result["communication_stats"] = {k: v for k, v in vars(st).items()
                                         if isinstance(v, (int, float, bool, str, dict))}
        result["steps_per_path"] = paths        # exchange="auto": how many steps took each path
        eng = getattr(opt, "engine", None)
        if eng is not None:     # step counters, e.g. onebit_adam's Adam steps before the freeze
            result["engine_counters"] = {"step": eng.counters["step"],
                                         "worker_adam_step": dict(eng.counters["worker_adam_step"])}
    else:
        elem = 2 if args.compression == "fp16" else 4
        ring = 2 * (size - 1) / size * n_params * elem
        result["bytes_per_step"] = {"sent_last": ring, "received_last": ring, "sent_mean": ring,
                                    "received_mean": ring, "measured": False,
                                    "note": "Horovod ring-allreduce volume 2(N-1)/N x size"}
    if main_rank:
        b = result["bytes_per_step"]
        print(f"final: val loss {result['final_val_loss']:.4f} nats/byte ({result['final_val_loss'] / math.log(2):.3f} "
              f"bits/byte), median step {1e3 * result['median_step_s']:.1f} ms (slowest rank), sent "
              f"{b['sent_mean'] / 1e6:.3f} MB/step per rank{'' if b['measured'] else ' (ring-allreduce volume)'}, "
              f"{result['wall_s']:.0f} s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.plot:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(6.5, 4))
            tr = [e for e in evals if e["train_loss"] is not None]
            ax.plot([e["step"] for e in tr], [e["train_loss"] for e in tr], "o-", label="train (interval mean)")
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "s-", label="validation")
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats/byte)")
            ax.set_title(f"{label}\nLM {args.size} ({n_params / 1e6:.2f}M), {size} ranks", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"plot: {args.plot}")
    hvd.shutdown()


if __name__ == "__main__":
    main()
