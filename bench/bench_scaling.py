#!/usr/bin/env python3
"""Scaling lab: step time and bytes per rank against the number of ranks, on shaped links.

For each point ``N[xR]@RATE`` (N ranks, R per emulated host, default 1) it launches
``bench/netlab.sh --ranks N --per-host R --rate RATE -- bench/bench_lab.py --worker ...`` once
with every configuration, and collects per configuration: the median step of the slowest rank,
the no-exchange step of the same script (the compute floor), the bytes each rank sends per step
(frames counted by hvd_qadam; Horovod's ring volume 2(N-1)/N x model) and through its host's
interface (/proc/net/dev, TCP/IP included, divided by the ranks on the host), and hvd_qadam's decode
time per rank. Horovod runs on Open MPI's ring allreduce (``--ompi-allreduce default`` for its own
decision).

    sudo python3 bench/bench_scaling.py --points 4@100mbit 8@100mbit 16@100mbit 8@1gbit 8x2@100mbit \
        --out results/scaling.json --plot results/scaling.png

With more ranks than the machine's cores every step is partly CPU-bound: the no-exchange step
of the same run says how much. The wire floor of a configuration is its interface bytes per rank
divided by the link rate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_lab  # noqa: E402 - this folder's module

DEFAULT_CONFIGS = ["no_exchange", "hvd_fp32", "hvd_fp16", "qadam_default", "qadam_allgather", "qadam_4_4_sharded"]


def parse_point(p: str) -> tuple[int, int, str]:
    ranks, _, rate = p.partition("@")
    n, _, r = ranks.partition("x")
    return int(n), int(r or 1), rate or "100mbit"


def _rate_bps(rate: str) -> float | None:
    return None if rate == "none" else bench_lab._rate_value(rate)


def run(args) -> list:
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="hq-scaling-") as tmp:
        for point in args.points:
            n, per_host, rate = parse_point(point)
            largs = argparse.Namespace(ranks=n, per_host=per_host, delay=None, ompi_allreduce=args.ompi_allreduce,
                                       verbose=args.verbose)
            js = os.path.join(tmp, f"{n}x{per_host}-{rate}.json")
            py = ["--worker", "--configs", *args.configs, "--workload", "lm", "--size", args.size,
                  "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", js]
            rc, out = bench_lab._netlab(rate, largs, py, args.launch_timeout)
            if rc == 0 and os.path.exists(js):
                with open(js) as f:
                    got = json.load(f)["rows"]
                for r in got:
                    r.update(rate=rate, point=point, per_host=per_host, hosts=n // per_host)
                rows += got
            else:
                failures.append({"point": point, "rc": rc, "tail": out[-3000:]})
                print(f"  {point} failed (rc {rc}):\n{out[-2000:]}", file=sys.stderr)
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "rows": rows, "failures": failures}, f, indent=1)
    return rows


def markdown(rows: list) -> str:
    out = ["| ranks (hosts x per host) | link | configuration | topology | step s | compute floor s | wire floor s | "
           "step / (floor + wire) | sent MB/rank | interface MB/rank | decode s | vs Horovod fp32 | vs Horovod fp16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = {x["config"]: x for x in rows if x["point"] == r["point"]}
        floor = same.get("no_exchange", {}).get("step_s")
        bps = _rate_bps(r["rate"])
        # the host's link carries all its ranks' bytes (interface bytes are kept per rank)
        wire = max(r["wire_tx_bytes"], r["wire_rx_bytes"]) * r["per_host"] / (bps / 8) if bps else None
        physical = f"{r['step_s'] / (floor + wire):.2f}" if floor and wire is not None and r["config"] != "no_exchange" \
            else "–"

        def vs(ref):
            return f"{same[ref]['step_s'] / r['step_s']:.2f}x" if ref in same and r["config"] != "no_exchange" else "–"
        hosts = f"{r['ranks']} ({r['hosts']} x {r['per_host']})"
        out.append(f"| {hosts} | {r['rate']} | {r['label']} | {r.get('topology') or '–'} | {r['step_s']:.3f} | "
                   f"{floor:.3f} | {'–' if wire is None else f'{wire:.3f}'} | {physical} | "
                   f"{r['sent_bytes'] / 1e6:.2f} | {r['wire_tx_bytes'] / 1e6:.2f} | "
                   f"{r.get('decode_s', 0.0):.3f} | {vs('hvd_fp32')} | {vs('hvd_fp16')} |"
                   if floor is not None else f"| {hosts} | {r['rate']} | {r['label']} | – | {r['step_s']:.3f} |")
    return "\n".join(out)


def _path(row: dict) -> str:
    """How a row exchanged: the topology, and for exchange="auto" the path of its last step."""
    if bench_lab.took_horovod(row):
        return "Horovod's allreduce"
    return row.get("topology") or "–"


def summary(rows: list) -> str:
    """The compact table: per point, the floors, Horovod's rings and the defaults."""
    out = ["| ranks | link | compute floor | Horovod fp32 (ring) | Horovod fp16 (ring) | hvd_qadam defaults | "
           "vs fp32 / fp16 | interface MB per rank: fp32 / defaults |", "|---|---|---|---|---|---|---|---|"]
    for point in dict.fromkeys(r["point"] for r in rows):
        same = {x["config"]: x for x in rows if x["point"] == point}
        if not all(k in same for k in ("no_exchange", "hvd_fp32", "hvd_fp16", "qadam_default")):
            continue
        d, f32, f16 = same["qadam_default"], same["hvd_fp32"], same["hvd_fp16"]
        hosts = f"{d['ranks']}" + (f" ({d['hosts']} hosts x {d['per_host']})" if d["per_host"] > 1 else "")
        rate = {"100mbit": "100 Mbit/s", "1gbit": "1 Gbit/s", "10gbit": "10 Gbit/s"}.get(d["rate"], d["rate"])
        out.append(f"| {hosts} | {rate} | {same['no_exchange']['step_s']:.2f} s | {f32['step_s']:.2f} s | "
                   f"{f16['step_s']:.2f} s | **{d['step_s']:.2f} s** ({_path(d)}) | "
                   f"**{f32['step_s'] / d['step_s']:.2f}x** / {f16['step_s'] / d['step_s']:.2f}x | "
                   f"{max(f32['wire_tx_bytes'], f32['wire_rx_bytes']) / 1e6:.1f} / "
                   f"{max(d['wire_tx_bytes'], d['wire_rx_bytes']) / 1e6:.1f} |")
    return "\n".join(out)


def plot(rows: list, path: str, rate: str = "100mbit") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    flat = [r for r in rows if r["rate"] == rate and r["per_host"] == 1]
    configs = [c for c in dict.fromkeys(r["config"] for r in flat)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(configs):
        pts = sorted((r["ranks"], r["step_s"], max(r["wire_tx_bytes"], r["wire_rx_bytes"]), r["label"])
                     for r in flat if r["config"] == c)
        if not pts:
            continue
        style = dict(marker="o", color=colors[i % len(colors)], label=pts[0][3])
        a1.plot([p[0] for p in pts], [p[1] for p in pts], **style)
        if c != "no_exchange":
            a2.plot([p[0] for p in pts], [p[2] / 1e6 for p in pts], **style)
    a1.set(xlabel="ranks (one per emulated host)", ylabel="step time, s (slowest rank, median)",
           title=f"step time at {rate}")
    a2.set(xlabel="ranks", ylabel="MB per rank per step through the interface", title="bytes per rank")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    a2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", default=["4@100mbit", "8@100mbit", "16@100mbit", "8@1gbit", "8x2@100mbit"])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(bench_lab.CONFIGS))
    p.add_argument("--size", default="small", help="LM size (harness/lm.py); 'small' lets 16 ranks share 2 cores")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ompi-allreduce", choices=["default", "ring"], default="ring")
    p.add_argument("--launch-timeout", type=float, default=1500)
    p.add_argument("--out", default=os.path.join(bench_lab.ROOT, "results", "scaling.json"))
    p.add_argument("--plot", default=None)
    p.add_argument("--report", metavar="JSON", help="print the table (and --plot) of an earlier run")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.report:
        with open(args.report) as f:
            rows = json.load(f)["rows"]
    else:
        if os.geteuid() != 0:
            sys.exit("bench_scaling needs root (netlab.sh creates network namespaces)")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        rows = run(args)
    print(markdown(rows))
    print()
    print(summary(rows))
    if args.plot and rows:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
