#!/usr/bin/env python3
"""``exchange="auto"`` following a link whose rate changes mid-run (tc, in the shaped lab).

Driver (as root): launches ``bench/netlab.sh`` with N ranks, each in its own namespace, and
changes every host's link rate when rank 0 reports the phase's last step:

    sudo python3 bench/lab_switch.py [--ranks 3] [--phases none 100mbit none] [--steps 40]
                                       [--size small] [--json docs/lab_switch.json]

Worker (what netlab runs): trains the LM with ``hvd_qadam.DistributedOptimizer(Adam,
exchange="auto")`` for ``len(phases) x steps`` steps, printing each step's path, time and loss;
then checks that every rank ends with identical weights, and trains the same steps with plain
``hvd.DistributedOptimizer`` (Adam, fp32) and with ``exchange="compressed"`` from the same seed,
on the unshaped link, for the losses to compare against.
The driver prints where the decision changed, relative to where the link changed, and writes
JSON. Horovod's allreduce runs on Open MPI's ring.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.append(ROOT)  # harness/ (last: hvd_qadam is found as before)


# ================================================================================== worker
def worker(args):
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from mpi4py import MPI
    import horovod.torch as hvd
    hvd.init(comm=MPI.COMM_WORLD)
    import torch
    torch.set_num_threads(1)
    import hvd_qadam
    from harness import lm
    corpus = lm.load_corpus()
    total = len(args.phases) * args.steps
    rank = hvd.rank()

    def train(make_optimizer, tag):
        model = lm.make_lm(args.size, seed=0)
        opt = make_optimizer(model)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        sampler = lm.BatchSampler(corpus.train, model.ctx, args.batch, seed=0, rank=rank)
        rows = []
        last = time.perf_counter()
        for step in range(total):
            x, y = sampler.batch(step)
            opt.zero_grad()
            loss = model.loss(x, y)
            loss.backward()
            loss = loss.detach()
            opt.step()
            now = time.perf_counter()
            st = getattr(opt, "communication_stats", None)
            path = st.exchange if st is not None else "horovod-optimizer"
            rows.append({"step": step, "path": path, "seconds": now - last, "loss": float(loss)})
            last = now
            if rank == 0:
                print(f"[{tag}] {step} {path} {rows[-1]['seconds']:.3f} {float(loss):.4f}", flush=True)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        return rows, digest, opt

    def auto(model):
        return hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                              named_parameters=model.named_parameters(), exchange="auto")

    def horovod(model):
        return hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                        named_parameters=model.named_parameters())
    if rank == 0:
        print("[ready]", flush=True)
    rows, digest, opt = train(auto, "auto")
    digests = hvd.allgather_object(digest)
    decisions = [{"compressed_step": s, "horovod": full, "seconds": secs}
                 for s, full, secs in opt.engine.exchange.decisions]
    if rank == 0:
        print("[auto-done]", flush=True)
    ref_rows, _, _ = train(horovod, "horovod")

    def compressed(model):
        return hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                              named_parameters=model.named_parameters(), exchange="compressed")
    comp_rows, _, _ = train(compressed, "compressed")
    if rank == 0:
        print("[result] " + json.dumps({"rows": rows, "reference": ref_rows, "compressed": comp_rows,
                                        "decisions": decisions,
                                        "replicas_identical": len(set(digests)) == 1,
                                        "reason": opt.communication_stats.exchange_reason}), flush=True)
    hvd.shutdown()


# ================================================================================== driver
def set_rate(hosts: int, rate: str) -> None:
    """Every host's link to ``rate`` (both directions, as netlab shapes them); "none" unshapes."""
    for i in range(hosts):
        for ns, dev in ((f"hq{i}", "eth0"), (None, f"hqv{i}")):
            pre = ["ip", "netns", "exec", ns] if ns else []
            if rate == "none":
                subprocess.run(pre + ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
                continue
            bps = _bytes_per_s(rate)
            burst = max(65536, bps // 1000)
            subprocess.run(pre + ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "tbf", "rate", rate,
                                  "burst", str(burst), "latency", "50ms"], check=True, capture_output=True)


def _bytes_per_s(rate: str) -> int:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return int(float(rate[:-len(u)]) * f / 8)
    raise ValueError(f"rate {rate!r}: use e.g. 100mbit, 1gbit or none")


def driver(args):
    cmd = ["bash", os.path.join(HERE, "netlab.sh"), "--ranks", str(args.ranks), "--rate", args.phases[0], "--",
           sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps), "--size", args.size,
           "--batch", str(args.batch), "--phases", *args.phases]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMPI_MCA_coll_tuned_use_dynamic_rules="1",
               OMPI_MCA_coll_tuned_allreduce_algorithm="4")
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    for attempt in range(3):
        rc, result, changes = _run_once(cmd, env, args)
        if rc != 125:
            break
        print(f"    ranks not up after {args.start_timeout:.0f} s (Open MPI's launcher across namespaces); "
              f"retrying ({attempt + 1}/3)", file=sys.stderr, flush=True)
    if result is None:
        print(f"lab_switch: no result (netlab exited {rc})", file=sys.stderr)
        return 1
    result.update(phases=args.phases, steps_per_phase=args.steps, ranks=args.ranks, size=args.size,
                  batch=args.batch, rate_changes=changes)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _run_once(cmd, env, args):
    """(exit status, result or None, rate changes); 125 when the ranks did not come up in time."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    ready = threading.Event()

    def watchdog():
        if not ready.wait(args.start_timeout):
            os.killpg(proc.pid, signal.SIGTERM)      # netlab's trap tears the lab down
    threading.Thread(target=watchdog, daemon=True).start()
    result, changes = None, []
    for line in proc.stdout:
        if line.startswith("[ready]"):
            ready.set()
        if line.startswith("[auto] "):
            step = int(line.split()[1])
            phase = (step + 1) // args.steps
            if (step + 1) % args.steps == 0 and phase < len(args.phases):
                set_rate(args.ranks, args.phases[phase])
                changes.append({"after_step": step, "rate": args.phases[phase]})
                print(f"    link -> {args.phases[phase]} after step {step}", file=sys.stderr, flush=True)
            if args.verbose:
                sys.stderr.write("    " + line)
        elif line.startswith("[auto-done]"):
            set_rate(args.ranks, "none")     # the reference run's loss does not depend on the link
        elif line.startswith("[result] "):
            result = json.loads(line[len("[result] "):])
        elif args.verbose:
            sys.stderr.write("    " + line)
    rc = proc.wait()
    return (125 if not ready.is_set() else rc), result, changes


def report(res: dict) -> None:
    rows, ref = res["rows"], res["reference"]
    n = res["steps_per_phase"]
    print(f"{res['ranks']} ranks, LM {res['size']}, phases {' -> '.join(res['phases'])} ({n} steps each)")
    for p, rate in enumerate(res["phases"]):
        part = rows[p * n:(p + 1) * n]
        paths = "".join("H" if r["path"] == "horovod" else "C" for r in part)
        med = sorted(r["seconds"] for r in part[n // 2:])[len(part[n // 2:]) // 2]
        print(f"  phase {p} ({rate:>7}): {paths}  median step (second half) {med:.3f} s")
    print(f"  decisions: {res['decisions']}")
    print(f"  replicas identical: {res['replicas_identical']}")
    comp = res.get("compressed") or ref
    print(f"  final loss (mean of last 10): auto {sum(r['loss'] for r in rows[-10:]) / 10:.4f}, "
          f"Horovod Adam {sum(r['loss'] for r in ref[-10:]) / 10:.4f}, "
          f"compressed throughout {sum(r['loss'] for r in comp[-10:]) / 10:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--phases", nargs="+", default=["none", "100mbit", "none"])
    p.add_argument("--steps", type=int, default=40, help="steps per phase")
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--start-timeout", type=float, default=150, help="seconds for every rank to come up")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
