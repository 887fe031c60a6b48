#!/usr/bin/env python3
"""Shaped-network benchmark: Horovod vs hvd_qadam on emulated hosts (bench/netlab.sh).

Driver (as root, outside mpirun): for each link rate and each configuration, launch
``bench/netlab.sh --ranks N --rate R -- python3 bench/bench_lab.py --worker ...``, collect the
results, write ``results/lab.json``, print a markdown table and plot step time against link rate:

    sudo python3 bench/bench_lab.py --sweep [--quick] [--rates 100mbit 1gbit 10gbit none]
                                      [--configs hvd_fp32 qadam_default ...] [--plot lab.png]

Worker (what netlab runs, one rate at a time; also usable under a plain mpirun):

    bash bench/netlab.sh --ranks 3 --rate 1gbit -- python3 bench/bench_lab.py --worker --configs hvd_fp32
    bash bench/netlab.sh --ranks 3 --rate 1gbit -- python3 bench/bench_lab.py --collectives

``--collectives`` checks the links: times ``hvd.allreduce`` of 42 MB fp32 and ``hvd.allgather`` of
5.3 MB uint8 (the sizes of the "base" LM's fp32 gradients and of its 4-bit payload), and prints
each rank's network namespace, interface address and Horovod's rank/local/cross sizes.

Each configuration: ``--warmup`` untimed steps, then ``--steps`` timed ones, every step started
together on all ranks (a tiny allreduce first). Reported per configuration: the median over
steps of the slowest rank's step time (max over ranks, then median), with the same statistic for
forward+backward (until ``backward()`` returns; Horovod's allreduces already run in its hooks
then), the optimizer step, and hvd_qadam's ``communication_stats`` timings (``encode_s``,
``exchange_s``, ``decode_s`` and any other ``*_s`` field it has); bytes each rank sends/receives per
step (hvd_qadam: its measured frames; Horovod: the ring-allreduce volume 2(N-1)/N x size) and, in
netlab, the bytes that really crossed each rank's interface (``/proc/self/net/dev``, with TCP/IP
headers; median per step, max over ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.append(ROOT)  # harness/ (last: hvd_qadam is found as before)

# name -> (label, hvd compression or None, hvd_qadam kwargs or None)
_SHARDED44 = dict(quantizer="qsgdinf", bits=4, downlink_quantizer="qsgdinf", downlink_bits=4, topology="sharded")
CONFIGS = {
    # the same job with no exchange at all: the compute floor
    "no_exchange": ("no exchange (compute floor)", "local", None),
    "hvd_fp32": ("Horovod fp32", "none", None),
    "hvd_fp16": ("Horovod fp16", "fp16", None),
    "qadam_default": ("hvd_qadam defaults (auto, 6 bits)", None, {}),
    # the measured choice between Horovod's allreduce and the compressed exchange
    "qadam_auto": ("hvd_qadam exchange='auto'", None, dict(exchange="auto")),
    "qadam_compressed": ("hvd_qadam exchange='compressed'", None, dict(exchange="compressed")),
    # every exchange in full precision through Horovod's allreduce, and onebit_adam's warm-up
    "qadam_horovod": ("hvd_qadam exchange='horovod'", None, dict(exchange="horovod")),
    # Horovod's allreduce with smaller fused groups: each starts earlier in backward
    "qadam_horovod_fusion4": ("hvd_qadam exchange='horovod', 4 MB groups", None,
                              dict(exchange="horovod", fusion_threshold_mb=4)),
    "qadam_horovod_fusion1": ("hvd_qadam exchange='horovod', 1 MB groups", None,
                              dict(exchange="horovod", fusion_threshold_mb=1)),
    "onebit_warmup": ("onebit_adam in its fp32 warm-up", None, dict(algorithm="onebit_adam", freeze_step=10 ** 6)),
    # the defaults with the two-level exchange (hosts of several ranks)
    "qadam_hierarchical": ("hvd_qadam defaults, hierarchical=True", None, dict(hierarchical=True)),
    "qadam_compressed_hierarchical": ("hvd_qadam exchange='compressed', hierarchical=True", None,
                                      dict(exchange="compressed", hierarchical=True)),
    # the defaults with smaller fused groups (more exchanges overlap backward and each other)
    "qadam_default_fusion4": ("hvd_qadam defaults, 4 MB groups", None, dict(fusion_threshold_mb=4)),
    "qadam_default_fusion1": ("hvd_qadam defaults, 1 MB groups", None, dict(fusion_threshold_mb=1)),
    # fewer, larger groups: fewer collectives per step, less of the exchange behind backward
    "qadam_compressed_groups1": ("hvd_qadam exchange='compressed', 1 group", None,
                                 dict(exchange="compressed", num_groups=1)),
    "qadam_compressed_groups2": ("hvd_qadam exchange='compressed', 2 groups", None,
                                 dict(exchange="compressed", num_groups=2)),
    # the defaults before topology="auto": every rank gathers every payload
    "qadam_allgather": ("hvd_qadam 6 bits, allgather (the old default)", None, dict(topology="allgather")),
    # the default width until the 10M-parameter LM showed it 1.9 % above Horovod Adam (README)
    "qadam_4bit": ("hvd_qadam defaults at 4 bits", None, dict(bits=4)),
    "qadam_4_4_sharded": ("qadam qsgdinf 4/4 sharded", None, dict(algorithm="qadam", **_SHARDED44)),
    "eadam_4_4_sharded": ("efficient_adam qsgdinf 4/4 sharded", None, dict(algorithm="efficient_adam", **_SHARDED44)),
    "eadam_1bit_sharded": ("efficient_adam sign 1/1 sharded", None,
                           dict(algorithm="efficient_adam", quantizer="sign", downlink_quantizer="sign",
                                topology="sharded")),
}
RATES = ["100mbit", "1gbit", "10gbit", "none"]
STAT_FIELDS = ("encode_s", "exchange_s", "decode_s")   # read with getattr defaults; extra *_s fields are added


def took_horovod(row: dict) -> bool:
    """Whether a row's last timed step went through Horovod's allreduce (``row["exchange"]``:
    the path of every timed step; ``exchange="auto"`` rows may take either)."""
    return (row.get("exchange") or [None])[-1] == "horovod"


# ================================================================================== worker side
def wire_bytes() -> tuple[int, int]:
    """(rx, tx) bytes of this network namespace's interfaces except lo (/proc/self/net/dev)."""
    rx = tx = 0
    try:
        with open("/proc/self/net/dev") as f:
            for line in f.readlines()[2:]:
                name, data = line.split(":", 1)
                if name.strip() == "lo":
                    continue
                fields = data.split()
                rx += int(fields[0])
                tx += int(fields[8])
    except OSError:
        pass
    return rx, tx


def tcp_losses() -> tuple[int, int]:
    """(segments retransmitted, retransmission timeouts) of this network namespace's TCP so far
    (/proc/self/net/snmp RetransSegs, /proc/self/net/netstat TCPTimeouts): a shaped link that
    drops a burst shows as retransmissions; each timeout stalls that flow for at least 200 ms."""
    def field(path: str, proto: str, name: str) -> int:
        try:
            with open(path) as f:
                rows = [line.split() for line in f if line.startswith(proto + ":")]
            for header, values in zip(rows[::2], rows[1::2]):
                if name in header:
                    return int(values[header.index(name)])
        except (OSError, ValueError, IndexError):
            pass
        return 0
    return field("/proc/self/net/snmp", "Tcp", "RetransSegs"), field("/proc/self/net/netstat", "TcpExt", "TCPTimeouts")


def _init_hvd():
    # One compute thread per rank unless told otherwise (netlab exports these); numba sizes its
    # pool at import, so this must precede importing hvd_qadam.
    os.environ.setdefault("NUMBA_NUM_THREADS", os.environ.get("HVD_QADAM_THREADS", "1"))
    from mpi4py import MPI   # before Horovod: mpi4py owns MPI (thread level "multiple")
    import horovod.torch as hvd
    hvd.init(comm=MPI.COMM_WORLD)
    import torch
    torch.set_num_threads(int(os.environ.get("HVD_QADAM_THREADS", "1")))
    return MPI, hvd, torch


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "?"


def _my_addr() -> str:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
        return ",".join(line.split()[3] for line in out.splitlines() if " lo " not in line) or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _identity(hvd) -> dict:
    return {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
            "cross_size": hvd.cross_size(), "netns": _netns(), "addr": _my_addr(), "pid": os.getpid(),
            "ompi_local_size": os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")}


def collectives_worker(args):
    MPI, hvd, torch = _init_hvd()
    comm = MPI.COMM_WORLD
    rank, size = hvd.rank(), hvd.size()
    ident = comm.gather(_identity(hvd), root=0)
    numel = int(args.allreduce_mb * 1e6 / 4)
    a = torch.ones(numel, dtype=torch.float32)
    g = torch.full((int(args.allgather_mb * 1e6),), rank, dtype=torch.uint8)
    results = {}
    for op, fn, nbytes in (("allreduce", lambda i: hvd.allreduce(a, name=f"lab.ar.{i}", op=hvd.Sum), 4 * numel),
                           ("allgather", lambda i: hvd.allgather(g, name=f"lab.ag.{i}"), g.numel())):
        times, wires = [], []
        for i in range(args.reps + 1):
            hvd.allreduce(torch.zeros(1), name=f"lab.sync.{op}.{i}")
            w0 = wire_bytes()
            t0 = time.perf_counter()
            out = fn(i)
            t = time.perf_counter() - t0
            w1 = wire_bytes()
            if i == 0:   # warm-up (also checks the result once)
                if op == "allreduce":
                    assert float(out[0]) == size and float(out[-1]) == size, "allreduce gave a wrong sum"
                else:
                    assert out.numel() == size * g.numel() and int(out[-1]) == size - 1, "allgather gave a wrong result"
                continue
            times.append(t)
            wires.append((w1[1] - w0[1], w1[0] - w0[0]))
        t_max = comm.gather(times, root=0)
        w_all = comm.gather(wires, root=0)
        if rank == 0:
            per_rep = [max(ts[i] for ts in t_max) for i in range(args.reps)]
            med = statistics.median(per_rep)
            tx = max(statistics.median(w[0] for w in ws) for ws in w_all)
            rx = max(statistics.median(w[1] for w in ws) for ws in w_all)
            results[op] = {"bytes": nbytes, "seconds": med, "all_seconds": per_rep, "wire_tx_bytes": tx,
                           "wire_rx_bytes": rx}
    if rank == 0:
        rate = os.environ.get("HQ_NETLAB_RATE", "(not in netlab)")
        print(f"collectives over {size} ranks, link rate {rate}")
        for d in ident:
            print(f"  rank {d['rank']}: netns {d['netns']}  addr {d['addr']}  local_rank {d['local_rank']}  "
                  f"local_size {d['local_size']}  cross_size {d['cross_size']}  "
                  f"OMPI_COMM_WORLD_LOCAL_SIZE {d['ompi_local_size']}")
        distinct = len({d["netns"] for d in ident}) == size
        print(f"  distinct network namespaces: {distinct}")
        for op, r in results.items():
            print(f"  {op:<9} {r['bytes'] / 1e6:6.1f} MB: median {r['seconds']:.3f} s over {args.reps} "
                  f"({', '.join(f'{t:.3f}' for t in r['all_seconds'])}); per rank on the wire: sent "
                  f"{r['wire_tx_bytes'] / 1e6:.1f} MB, received {r['wire_rx_bytes'] / 1e6:.1f} MB "
                  f"= {8 * max(r['wire_tx_bytes'], r['wire_rx_bytes']) / r['seconds'] / 1e9:.2f} Gbit/s")
        out = {"kind": "collectives", "rate": rate, "ranks": size, "identity": ident,
               "distinct_netns": distinct, "results": results}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    hvd.shutdown()


def bench_worker(args):
    MPI, hvd, torch = _init_hvd()
    import numpy as np
    from harness import lm
    comm = MPI.COMM_WORLD
    rank = hvd.rank()
    ident = comm.gather(_identity(hvd), root=0)
    corpus = lm.load_corpus() if args.workload == "lm" else None
    if rank == 0:
        print("[ready] every rank started", flush=True)   # the driver's launch watchdog waits for it
    rows = []
    for name in args.configs:
        try:
            row = _bench_one(name, args, hvd, torch, np, lm, comm, corpus)
        except Exception:   # noqa: BLE001 - a rank that fails alone would leave the others waiting
            import traceback
            traceback.print_exc()
            print(f"rank {rank}: configuration {name} failed; aborting the MPI job", file=sys.stderr, flush=True)
            comm.Abort(1)
        if row is not None:
            rows.append(row)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "bench", "identity": ident, "rows": rows}, f, indent=1)
    hvd.shutdown()


def _bench_one(name, args, hvd, torch, np, lm, comm, corpus):
    """Run one configuration; rank 0 returns its result row, the others None."""
    rank, size = hvd.rank(), hvd.size()
    row = None
    label, compression, kwargs = CONFIGS[name]
    if args.workload == "lm":
        model = lm.make_lm(args.size, seed=0)
        sampler = lm.BatchSampler(corpus.train, model.ctx, args.batch, seed=0, rank=rank)
        x, y = sampler.batch(0)

        def loss_fn():
            return model.loss(x, y)
        workload = f"LM {args.size}, batch {args.batch} x {model.ctx} bytes per rank"
    else:
        torch.manual_seed(0)
        mods = []
        for _ in range(10):
            mods += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
        model = torch.nn.Sequential(*mods)
        xm = torch.randn(args.batch, 1024, generator=torch.Generator().manual_seed(rank))

        def loss_fn():
            return model(xm).square().mean()
        workload = f"MLP 10 x Linear(1024, 1024), batch {args.batch} per rank"
    numel = sum(p.numel() for p in model.parameters())
    base = torch.optim.Adam(model.parameters(), lr=1e-4)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if kwargs is None and compression == "local":
        opt = base
    elif kwargs is None:
        comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=comp)
    else:
        import hvd_qadam
        opt = hvd_qadam.DistributedOptimizer(base, named_parameters=model.named_parameters(), **kwargs)
    per_step = []
    t_cfg = time.perf_counter()
    t_warm = None
    warmup = args.warmup
    engine = getattr(opt, "engine", None)
    if engine is not None and engine.exchange.name == "auto":    # untimed until its first decision is taken
        from hvd_qadam.exchange import Auto
        warmup = max(warmup, Auto.SETTLE + 2 * Auto.ROUNDS + 1)
    for step in range(warmup + args.steps):
        hvd.allreduce(torch.zeros(1), name=f"lab.sync.{name}.{step}")   # start every step together
        w0, l0 = wire_bytes(), tcp_losses()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        loss = loss.detach()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        w1, l1 = wire_bytes(), tcp_losses()
        if step < warmup:
            continue
        if t_warm is None:
            t_warm = t0 - t_cfg
        rec = {"step_s": t2 - t0, "fb_s": t1 - t0, "opt_s": t2 - t1, "wire_tx": w1[1] - w0[1],
               "wire_rx": w1[0] - w0[0], "tcp_retrans": l1[0] - l0[0], "tcp_timeouts": l1[1] - l0[1],
               "loss": loss.item()}
        st = getattr(opt, "communication_stats", None)
        if st is not None:
            fields = set(STAT_FIELDS) | {k for k, v in vars(st).items()
                                         if k.endswith("_s") and isinstance(v, (int, float))}
            for k in fields:
                rec[k] = float(getattr(st, k, 0.0) or 0.0)
            rec["sent_bytes"] = int(getattr(st, "sent_bytes", 0) or 0)
            rec["received_bytes"] = int(getattr(st, "received_bytes", 0) or 0)
            rec["topology"] = getattr(st, "topology", "")
            rec["exchange"] = getattr(st, "exchange", "")
            rec["exchange_reason"] = getattr(st, "exchange_reason", "")
        per_step.append(rec)
    wall = time.perf_counter() - t_cfg
    everyone = comm.gather(per_step, root=0)
    if rank == 0:
        keys = sorted({k for recs in everyone for r in recs for k in r if k.endswith("_s")})

        def slowest_median(key):   # median over steps of the max over ranks
            return float(np.median([max(recs[i].get(key, 0.0) for recs in everyone) for i in range(args.steps)]))

        def max_rank_median(key):  # the largest per-rank median
            return max(float(np.median([r.get(key, 0) for r in recs])) for recs in everyone)
        row = {"config": name, "label": label, "workload": workload, "numel": numel, "ranks": size,
               "rate": os.environ.get("HQ_NETLAB_RATE", "unknown"), "delay": os.environ.get("HQ_NETLAB_DELAY"),
               "ompi_allreduce": "ring" if os.environ.get("OMPI_MCA_coll_tuned_allreduce_algorithm") == "4"
               else os.environ.get("OMPI_MCA_coll_tuned_allreduce_algorithm", "default"),
               # netlab sets it with more ranks than cores (bench/netlab.sh --spin keeps busy-polling)
               "mpi_yield_when_idle": os.environ.get("OMPI_MCA_mpi_yield_when_idle", "0"),
               "steps": args.steps, "warmup": warmup, "wall_s": wall, "warmup_wall_s": t_warm,
               "kwargs": kwargs, "compression": compression}
        for k in keys:
            row[k] = slowest_median(k)
        row["stat_keys"] = sorted(k for k in keys if k not in ("step_s", "fb_s", "opt_s"))
        row["all_step_s"] = [max(recs[i]["step_s"] for recs in everyone) for i in range(args.steps)]
        # eth0 is the host's: with several ranks per host, each rank's share is 1/per_host of it
        per_host = int(os.environ.get("HQ_NETLAB_PER_HOST", "1"))
        row["per_host"] = per_host
        row["wire_tx_bytes"] = max_rank_median("wire_tx") / per_host
        row["wire_rx_bytes"] = max_rank_median("wire_rx") / per_host
        # the host's TCP counters (shared by its ranks): per step, summed over the timed steps
        row["tcp_retrans"] = max(sum(r.get("tcp_retrans", 0) for r in recs) for recs in everyone) / args.steps
        row["tcp_timeouts"] = max(sum(r.get("tcp_timeouts", 0) for r in recs) for recs in everyone) / args.steps
        row["topology"] = everyone[0][-1].get("topology") if everyone[0] else None
        row["exchange"] = [r.get("exchange") for r in everyone[0]]
        row["exchange_reason"] = everyone[0][-1].get("exchange_reason") if everyone[0] else None
        if kwargs is None and compression == "local":
            row["sent_bytes"] = row["received_bytes"] = 0
            row["measured_bytes"] = True
        elif kwargs is None:
            elem = 2 if compression == "fp16" else 4
            row["sent_bytes"] = row["received_bytes"] = int(2 * (size - 1) / size * numel * elem)
            row["measured_bytes"] = False
        else:
            row["sent_bytes"] = max_rank_median("sent_bytes")
            row["received_bytes"] = max_rank_median("received_bytes")
            row["measured_bytes"] = True
        row["final_loss"] = float(np.mean([recs[-1]["loss"] for recs in everyone]))
        print(f"[{row['rate']}] {label:<36} {row['topology'] or '':<12} step {1e3 * row['step_s']:8.1f} ms  (fwd+bwd {1e3 * row['fb_s']:.1f}, "
              f"opt {1e3 * row['opt_s']:.1f})  sent {row['sent_bytes'] / 1e6:.2f} MB  "
              f"wire tx {row['wire_tx_bytes'] / 1e6:.2f} MB  TCP retransmits {row['tcp_retrans']:.0f} "
              f"(timeouts {row['tcp_timeouts']:.1f}) per step", flush=True)
    return row


# ================================================================================== driver side
def _netlab(rate: str, args, py_args: list[str], timeout: float, start_timeout: float = 300,
            tries: int = 3) -> tuple[int, str]:
    """Run the worker under netlab; a launch whose ranks are not all up within ``start_timeout``
    (an Open MPI launcher hang across namespaces) is ended and tried again."""
    for attempt in range(tries):
        rc, out = _netlab_once(rate, args, py_args, timeout, start_timeout)
        if rc != 125:
            return rc, out
        print(f"    launch not up after {start_timeout:.0f} s; retrying ({attempt + 1}/{tries})", file=sys.stderr)
    return rc, out


def _netlab_once(rate: str, args, py_args: list[str], timeout: float, start_timeout: float) -> tuple[int, str]:
    cmd = ["bash", os.path.join(HERE, "netlab.sh"), "--ranks", str(args.ranks), "--rate", rate,
           "--per-host", str(getattr(args, "per_host", 1))]
    if args.delay:
        cmd += ["--delay", args.delay]
    cmd += ["--", sys.executable, os.path.abspath(__file__), *py_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOROVOD_LOG_LEVEL=os.environ.get("HOROVOD_LOG_LEVEL", "warning"))
    if args.ompi_allreduce == "ring":   # Open MPI's ring allreduce instead of its default decision
        env.update(OMPI_MCA_coll_tuned_use_dynamic_rules="1", OMPI_MCA_coll_tuned_allreduce_algorithm="4")
    if "NUMBA_CACHE_DIR" not in env:   # the cache scripts/install.sh fills
        env["NUMBA_CACHE_DIR"] = os.path.join(os.environ.get("HVD_QADAM_CACHE",
                                                             os.path.expanduser("~/.cache/hvd_qadam")), "numba")
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    try:
        # start_new_session: on a timeout, TERM goes to netlab, whose trap tears the lab down
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        out_lines = []
        started = time.monotonic()
        deadline = started + timeout
        ready = "--worker" not in py_args
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not ready and time.monotonic() > started + start_timeout:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                return 125, "".join(out_lines)
            if time.monotonic() > deadline:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                return 124, "".join(out_lines) + f"\n(timed out after {timeout:.0f} s)"
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if not line:
                    break
                out_lines.append(line)
                ready = ready or line.startswith("[ready]")
                if args.verbose or (line.startswith("[") and not line.startswith("[ready]")):
                    sys.stderr.write("    " + line)
        return proc.wait(), "".join(out_lines)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)
        raise


def _fmt_ms(v):
    return "–" if v is None else f"{1e3 * v:.0f}"


def markdown(rows: list[dict], collectives: list[dict]) -> str:
    out = []
    if rows:
        r0 = rows[0]
        out.append(f"{r0['workload']} ({r0['numel']:,} parameters), {r0['ranks']} ranks (netlab namespaces), "
                   f"{r0['steps']} timed steps, Open MPI allreduce {r0.get('ompi_allreduce', 'default')}; "
                   "times: median over steps of the slowest rank, ms; bytes per rank per step (MB); "
                   "speed-up = Horovod's step time / this step time at the same rate\n")
        extra = sorted({k for r in rows for k in r.get("stat_keys", ()) if k not in STAT_FIELDS})
        cols = ["rate", "config", "step", "fwd+bwd", "opt step", "encode", "exchange", "decode", *extra,
                "sent MB", "recv MB", "wire tx MB", "wire rx MB", "vs hvd fp32", "vs hvd fp16"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in rows:
            same = {x["config"]: x for x in rows if x["rate"] == r["rate"]}

            def speed(ref, same=same, r=r):
                return f"{same[ref]['step_s'] / r['step_s']:.2f}x" if ref in same else "–"
            star = "" if r.get("measured_bytes") else "*"
            cells = [r["rate"], r["label"], _fmt_ms(r["step_s"]), _fmt_ms(r.get("fb_s")), _fmt_ms(r.get("opt_s"))]
            cells += [_fmt_ms(r.get(k)) if r.get("measured_bytes") else "–" for k in (*STAT_FIELDS, *extra)]
            cells += [f"{r['sent_bytes'] / 1e6:.2f}{star}", f"{r['received_bytes'] / 1e6:.2f}{star}",
                      f"{r['wire_tx_bytes'] / 1e6:.2f}", f"{r['wire_rx_bytes'] / 1e6:.2f}",
                      speed("hvd_fp32"), speed("hvd_fp16")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("\n\\* Horovod: ring-allreduce volume 2(N-1)/N x size; hvd_qadam: measured frame bytes. "
                   "wire = bytes through the rank's interface (TCP/IP included), largest rank.")
    if collectives:
        out.append("\nLink check (`--collectives`): median of the slowest rank, seconds")
        out.append("\n| rate | allreduce 42 MB fp32 | allgather 5.3 MB uint8 | distinct netns | local_size |")
        out.append("|---|---|---|---|---|")
        for c in collectives:
            res = c["results"]
            out.append(f"| {c['rate']} | {res['allreduce']['seconds']:.3f} | {res['allgather']['seconds']:.3f} | "
                       f"{c['distinct_netns']} | {sorted({d['local_size'] for d in c['identity']})} |")
    return "\n".join(out)


def _rate_value(rate: str) -> float:
    units = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
    r = rate.lower()
    for u in sorted(units, key=len, reverse=True):
        if r.endswith(u):
            return float(r[: -len(u)]) * units[u]
    raise ValueError(rate)


def plot(rows: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shaped = [_rate_value(r["rate"]) for r in rows if r["rate"] != "none"]
    x_none = 10 * max(shaped) if shaped else 1e11
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in dict.fromkeys(r["config"] for r in rows):
        sel = sorted((x_none if r["rate"] == "none" else _rate_value(r["rate"]), r["step_s"], r["label"])
                     for r in rows if r["config"] == name)
        ax.plot([s[0] for s in sel], [1e3 * s[1] for s in sel], "o-", label=sel[0][2])
    ticks = sorted({x_none if r["rate"] == "none" else _rate_value(r["rate"]) for r in rows})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels(["unshaped" if t == x_none else
                        (f"{t / 1e9:g} Gbit/s" if t >= 1e9 else f"{t / 1e6:g} Mbit/s") for t in ticks])
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("link rate per host and direction")
    ax.set_ylabel("median step time, slowest rank (ms)")
    r0 = rows[0]
    ax.set_title(f"{r0['workload']}, {r0['ranks']} ranks", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def sweep(args):
    if os.geteuid() != 0:
        sys.exit("--sweep needs root (netlab.sh creates network namespaces)")
    rows, collectives, failures = [], [], []
    out_path = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    def save():
        with open(out_path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "sweep")},
                       "rows": rows, "collectives": collectives, "failures": failures}, f, indent=1)
    with tempfile.TemporaryDirectory(prefix="hq-lab-") as tmp:
        for rate in args.rates:
            if args.collectives_check:
                js = os.path.join(tmp, f"coll-{rate}.json")
                py = ["--collectives", "--reps", str(args.reps), "--json", js]
                rc, out = _netlab(rate, args, py, args.launch_timeout)
                if rc == 0 and os.path.exists(js):
                    with open(js) as f:
                        collectives.append(json.load(f))
                    print("\n".join("    " + ln for ln in out.splitlines() if ln.startswith("  ")), file=sys.stderr)
                else:
                    failures.append({"rate": rate, "config": "collectives", "rc": rc, "tail": out[-3000:]})
                    print(f"  collectives at {rate} failed (rc {rc}):\n{out[-2000:]}", file=sys.stderr)
            groups = [[c] for c in args.configs] if args.launch == "per-config" else [list(args.configs)]
            for group in groups:
                name = "+".join(group)
                js = os.path.join(tmp, f"{rate}-{name}.json")
                py = ["--worker", "--configs", *group, "--workload", args.workload, "--size", args.size,
                      "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                      "--json", js]
                rc, out = _netlab(rate, args, py, args.launch_timeout)
                if rc == 0 and os.path.exists(js):
                    with open(js) as f:
                        got = json.load(f)["rows"]
                    for r in got:
                        r["rate"] = rate
                    rows += got
                else:
                    failures.append({"rate": rate, "config": name, "rc": rc, "tail": out[-3000:]})
                    print(f"  {name} at {rate} failed (rc {rc}):\n{out[-2000:]}", file=sys.stderr)
                save()
    save()
    print(markdown(rows, collectives))
    if failures:
        print(f"\n{len(failures)} launch(es) failed: " + ", ".join(f"{f['config']}@{f['rate']}" for f in failures))
    print(f"\nresults: {out_path}")
    if args.plot and rows:
        plot(rows, args.plot)
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sweep", action="store_true", help="driver: run netlab.sh for every rate and configuration")
    mode.add_argument("--worker", action="store_true", help="benchmark the configurations (under mpirun/netlab)")
    mode.add_argument("--collectives", action="store_true", help="time allreduce/allgather (under mpirun/netlab)")
    mode.add_argument("--report", metavar="LAB_JSON", help="print the table (and --plot) of an earlier --sweep")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rates", nargs="+", default=RATES, help="tc rates for --sweep ('none' = unshaped)")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--per-host", type=int, default=1, help="ranks per emulated host (netlab --per-host)")
    p.add_argument("--delay", default=None, help="netem one-way delay per host (needs sch_netem)")
    p.add_argument("--ompi-allreduce", choices=["default", "ring"], default="default",
                   help="--sweep: Open MPI's allreduce algorithm under Horovod (default: its own decision, which "
                        "for 3 ranks and 42 MB moves ~104 MB per rank; ring moves 2(N-1)/N x 42 = 56 MB)")
    p.add_argument("--workload", choices=["lm", "mlp"], default="lm")
    p.add_argument("--size", default="base", help="LM size (harness/lm.py)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences (LM) / rows (MLP) per rank (default 4; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 2)")
    p.add_argument("--reps", type=int, default=None, help="--collectives repetitions (default 5; --quick 3)")
    p.add_argument("--allreduce-mb", type=float, default=42.0)
    p.add_argument("--allgather-mb", type=float, default=5.3)
    p.add_argument("--quick", action="store_true", help="fewer, smaller steps: a few minutes per rate")
    p.add_argument("--no-collectives", dest="collectives_check", action="store_false",
                   help="--sweep: skip the link check per rate")
    p.add_argument("--launch", choices=["per-config", "per-rate"], default="per-config",
                   help="--sweep: one netlab/mpirun launch per (rate, configuration) - a crash loses one cell - or "
                        "one per rate running every configuration (saves ~20 s of start-up per configuration)")
    p.add_argument("--launch-timeout", type=float, default=1200, help="seconds per netlab launch")
    p.add_argument("--json", default=None, help="worker: write results here (rank 0)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "lab.json"), help="--sweep: results file")
    p.add_argument("--plot", default=None, help="--sweep: step time vs link rate, per configuration (png)")
    p.add_argument("--verbose", action="store_true", help="--sweep: echo everything the launches print")
    args = p.parse_args()
    q = args.quick
    args.batch = args.batch or (2 if q else 4)
    args.steps = args.steps or (5 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 3)
    args.reps = args.reps or (3 if q else 5)
    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        print(markdown(res["rows"], res.get("collectives", [])))
        if args.plot and res["rows"]:
            plot(res["rows"], args.plot)
        return
    if args.sweep:
        sys.exit(sweep(args))
    if args.collectives:
        return collectives_worker(args)
    return bench_worker(args)


if __name__ == "__main__":
    main()
