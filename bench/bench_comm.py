#!/usr/bin/env python3
"""Communication benchmark: bytes per rank per step and step time, hvd_qadam vs Horovod.

For 2, 3 and 4 ranks (mpirun, oversubscribed where needed) and each topology, trains a
10.5M-parameter MLP on synthetic data and measures, per rank and step:
  * bytes sent / received: hvd_qadam counts the real frames it hands to Horovod / MPI; Horovod's
    allreduce does not report bytes, so its figures are the ring-allreduce volume 2(N-1)/N * size
    (what Horovod's MPI/ring allreduce moves per rank);
  * step time: median wall time of a full step (forward, backward, exchange, update).

    python bench/bench_comm.py [--ranks 2 3 4] [--steps 12] [--json out.json] [--plot out.png]

The driver launches itself under mpirun with --worker; each launch prints one JSON line per case.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = [
    # name, topology, hvd_qadam kwargs (None: plain hvd.DistributedOptimizer with this compression)
    ("horovod fp32", "allgather", None, "none"),
    ("horovod fp16", "allgather", None, "fp16"),
    ("qsgd 4-bit + EF", "allgather", dict(algorithm="qsgd", bits=4), None),
    ("efficient_adam 4/4-bit", "allgather", dict(algorithm="efficient_adam", bits=4, downlink_quantizer="qsgd",
                                                 downlink_bits=4), None),
    ("efficient_adam 4/4-bit", "sharded", dict(algorithm="efficient_adam", bits=4, downlink_quantizer="qsgd",
                                               downlink_bits=4), None),
    ("efficient_adam 1/1-bit sign", "sharded", dict(algorithm="efficient_adam", quantizer="sign",
                                                    downlink_quantizer="sign"), None),
    ("efficient_adam 4/4-bit", "ps", dict(algorithm="efficient_adam", bits=4, downlink_quantizer="qsgd",
                                          downlink_bits=4), None),
]


def worker(args):
    ps_mode = args.ps
    if ps_mode:
        import hvd_qadam
        hvd_qadam.ps_init()
        import horovod.torch as hvd
    else:
        from mpi4py import MPI
        import horovod.torch as hvd
        hvd.init(comm=MPI.COMM_WORLD)
    import numpy as np
    import torch

    import hvd_qadam
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    width = 1024
    layers = max(1, round(args.params * 1e6 / (width * width + width)))

    def make_model():
        torch.manual_seed(0)
        mods = []
        for _ in range(layers):
            mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        return torch.nn.Sequential(*mods)

    x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
    for name, topology, kwargs, compression in CASES:
        if (topology == "ps") != ps_mode:
            continue
        model = make_model()
        numel = sum(p.numel() for p in model.parameters())
        base = torch.optim.Adam(model.parameters(), lr=1e-4)
        if kwargs is None:
            comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
            opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=comp)
        else:
            opt = hvd_qadam.DistributedOptimizer(base, model.named_parameters(), topology=topology, **kwargs)
        times = []
        for step in range(args.warmup + args.steps):
            hvd.allreduce(torch.zeros(1), name=f"sync.{name}.{topology}.{step}")   # align ranks
            t0 = time.perf_counter()
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        t = torch.tensor([float(np.median(times))])
        t = hvd.allreduce(t, name=f"time.{name}.{topology}", op=hvd.Max).item()   # the slowest rank's median
        if kwargs is None:
            elem = 2 if compression == "fp16" else 4
            sent = recv = int(2 * (size - 1) / size * numel * elem)
            measured = False
        else:
            st = opt.communication_stats
            sent, recv, measured = st.sent_bytes, st.received_bytes, True
        if rank == 0:
            print("RESULT " + json.dumps({"case": name, "topology": topology, "ranks": size, "numel": numel,
                                          "sent_bytes": sent, "received_bytes": recv, "fp32_bytes": 4 * numel,
                                          "measured_bytes": measured, "step_s": t}), flush=True)
        del opt, model, base
    hvd.shutdown()


def launch(np_, ps, args):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_ + (1 if ps else 0)), "-bind-to", "none",
           "-mca", "btl", "self,tcp", "-mca", "btl_tcp_if_include", "lo", "-mca", "oob_tcp_if_include", "lo",
           sys.executable, os.path.abspath(__file__), "--worker", "--params", str(args.params), "--steps",
           str(args.steps), "--warmup", str(args.warmup)] + (["--ps"] if ps else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.exit(f"benchmark launch failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--params", type=float, default=10.5, help="model size in millions of parameters")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ps", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from tqdm import tqdm
    rows = []
    for np_ in tqdm(args.ranks, desc="rank counts"):
        rows += launch(np_, False, args)
        rows += launch(np_, True, args)
    base = {r["ranks"]: r for r in rows if r["case"] == "horovod fp32"}
    print(f"\n{rows[0]['numel'] / 1e6:.1f}M-parameter MLP, synthetic data, mpirun on this machine "
          f"(loopback TCP); per rank and step")
    print(f"{'ranks':>5}  {'case':<30}{'topology':<11}{'sent MB':>9}{'recv MB':>9}{'vs fp32 sent':>13}"
          f"{'step ms':>9}{'vs hvd fp32':>12}")
    for r in rows:
        b = base[r["ranks"]]
        mark = "" if r["measured_bytes"] else "*"
        print(f"{r['ranks']:>5}  {r['case']:<30}{r['topology']:<11}{r['sent_bytes'] / 1e6:>8.2f}{mark:1}"
              f"{r['received_bytes'] / 1e6:>8.2f}{mark:1}{b['sent_bytes'] / r['sent_bytes']:>12.1f}x"
              f"{1e3 * r['step_s']:>9.0f}{b['step_s'] / r['step_s']:>11.2f}x")
    print("* Horovod's allreduce volume is the ring-allreduce formula 2(N-1)/N x bytes; hvd_qadam's is measured.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (case, topo) in dict.fromkeys((r["case"], r["topology"]) for r in rows):
            sel = [r for r in rows if r["case"] == case and r["topology"] == topo]
            label = f"{case} [{topo}]"
            axes[0].plot([r["ranks"] for r in sel], [(r["sent_bytes"] + r["received_bytes"]) / 1e6 for r in sel], "o-",
                         label=label)
            axes[1].plot([r["ranks"] for r in sel], [1e3 * r["step_s"] for r in sel], "o-", label=label)
        axes[0].set_ylabel("MB sent + received per rank per step")
        axes[1].set_ylabel("step time (ms)")
        for ax in axes:
            ax.set_xlabel("ranks")
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
