#!/usr/bin/env python3
"""A cost model of one training step, fitted to the scaling lab, extrapolated to clusters.

    step = compute + wire + codec + latency                (nothing hidden behind backward)
    wire    = bytes leaving the rank's host per rank / (link rate x efficiency)
    codec   = elements the rank encodes and decodes per step / codec throughput
    latency = message rounds of the collectives x alpha

Bytes per rank come from each topology's own byte model (``hvd_qadam.topology``, checked against
real frames in the tests and against interface counters in the lab). From the lab
(``bench/bench_scaling.py``'s JSON) it fits, by least squares over every point:
  efficiency  the share of the link rate TCP delivers (Horovod's rows and ours),
  alpha       seconds per message round, and
  codec       seconds per element of the CPU codec, per rank,
both times the lab's CPU oversubscription (ranks per core: with 16 ranks on 2 cores a rank waits
for its turn at every round and every pass),
and reports the model's error at every lab point. Then it predicts step time and bytes per rank
for 32-256 ranks at 10-100 Gbit/s, for a model size and compute time you give, a GPU codec
throughput and a per-round latency you assume (stated in the output: no GPU and no real cluster
was measured); only the link efficiency carries over from the lab.

    python3 bench/cost_model.py --lab results/scaling.json [--params 350e6 --compute 0.30 \
        --codec-gelems 100 --per-host 8] [--json docs/cost_model.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from hvd_qadam.config import LinkSpec  # noqa: E402
from hvd_qadam.topology import TOPOLOGIES, Hosts, payload_bytes_per_element  # noqa: E402

sys.path.insert(0, HERE)
from bench_lab import took_horovod  # noqa: E402 - this folder's module: what a lab row says

RATES = {"100mbit": 1e8, "1gbit": 1e9, "10gbit": 1e10}


def _links(row) -> tuple[float, float]:
    """(uplink, downlink) bytes per element of a lab row's hvd_qadam configuration."""
    kw = row.get("kwargs") or {}
    up = LinkSpec(kw.get("quantizer", "qsgdinf"), kw.get("bits"), 128, "nearest")
    dq = kw.get("downlink_quantizer", up.quantizer)
    down = LinkSpec(dq, kw.get("downlink_bits", kw.get("bits")), 128, "nearest")
    return payload_bytes_per_element(up), payload_bytes_per_element(down)


def exchange_terms(kind: str, n: float, hosts: Hosts, up: float = 0.0, down: float = 0.0) -> dict:
    """Bytes across hosts per rank, intra-host bytes per rank, message rounds, codec elements."""
    N, L, H = hosts.size, hosts.local_size, hosts.count
    if kind in ("hvd_fp32", "hvd_fp16"):
        elem = 4.0 if kind == "hvd_fp32" else 2.0
        ring = 2 * (N - 1) / N * n * elem
        return {"inter": ring / L if H > 1 else 0.0, "intra": ring if L > 1 else 0.0, "rounds": 2 * (N - 1),
                "codec": 0.0}
    topo = TOPOLOGIES[kind]
    b = topo.bytes_per_rank(n, up, down if topo.downlink_travels else 0.0, hosts)
    rounds = {"allgather": N - 1, "sharded": 2 * (N - 1), "hierarchical": 2 * (L - 1) + 2 * (H - 1)}[kind]
    # encode the rank's uplink, decode what it averages and what it applies (elements)
    codec = {"allgather": n + N * n, "sharded": n + n + 2 * n / N,
             "hierarchical": n / L + n + 2 * n / N}[kind]
    return {"inter": b["inter_host"], "intra": b["total"] - b["inter_host"], "rounds": rounds, "codec": codec}


def lab_points(rows: list) -> list:
    pts = []
    for r in rows:
        if r["config"] == "no_exchange" or r["rate"] not in RATES:
            continue
        floor = next((x["step_s"] for x in rows if x["point"] == r["point"] and x["config"] == "no_exchange"), None)
        if floor is None:
            continue
        hosts = Hosts(r["ranks"], r.get("per_host", 1))
        # exchange="auto" rows whose steps went through Horovod's allreduce cost what Horovod costs
        if r["kwargs"] is None or took_horovod(r):
            kind = "hvd_fp16" if r["compression"] == "fp16" else "hvd_fp32"
            t = exchange_terms(kind, r["numel"], hosts)
        else:
            up, down = _links(r)
            t = exchange_terms(r["topology"], r["numel"], hosts, up, down)
        oversub = max(1.0, r["ranks"] / 2.0)   # the lab machine's 2 cores
        pts.append({"point": r["point"], "label": r["label"], "rate": RATES[r["rate"]], "floor": floor,
                    "step": r["step_s"], "oversub": oversub, "wire_measured": max(r["wire_tx_bytes"], r["wire_rx_bytes"]),
                    **t})
    return pts


def fit(pts: list) -> dict:
    """Least squares on step - floor = inter / (rate eff) + alpha rounds + c oversub codec."""
    A = np.array([[8 * p["inter"] / p["rate"], p["oversub"] * p["rounds"], p["oversub"] * p["codec"]] for p in pts])
    y = np.array([p["step"] - p["floor"] for p in pts])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    inv_eff, alpha, c = (max(v, 0.0) for v in coef)
    return {"efficiency": 1.0 / inv_eff if inv_eff else float("inf"), "alpha_s": alpha, "codec_s_per_elem": c}


def predict_lab(p: dict, m: dict) -> float:
    return (p["floor"] + 8 * p["inter"] / (p["rate"] * m["efficiency"]) + m["alpha_s"] * p["oversub"] * p["rounds"]
            + m["codec_s_per_elem"] * p["oversub"] * p["codec"])


def cluster_table(m: dict, args) -> list:
    out = []
    up = down = payload_bytes_per_element(LinkSpec("qsgdinf", None, 128, "nearest"))
    for gbit in args.rates_gbit:
        rate = gbit * 1e9
        for N in args.ranks:
            hosts = Hosts(N, args.per_host)
            row = {"ranks": N, "per_host": args.per_host, "gbit": gbit}
            for kind in ("hvd_fp32", "hvd_fp16", "sharded", "hierarchical"):
                t = exchange_terms(kind, args.params, hosts, up, down)
                wire = 8 * t["inter"] / (rate * m["efficiency"])
                intra = t["intra"] / (args.intra_gbyte * 1e9)
                codec = t["codec"] / (args.codec_gelems * 1e9)
                step = args.compute + wire + intra + codec + args.alpha_us * 1e-6 * t["rounds"]
                row[kind] = {"step_s": step, "inter_host_bytes_per_rank": t["inter"], "wire_s": wire}
            out.append(row)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lab", default=os.path.join(os.path.dirname(HERE), "results", "scaling.json"))
    p.add_argument("--params", type=float, default=350e6, help="model parameters of the prediction")
    p.add_argument("--compute", type=float, default=0.30, help="compute (forward + backward + optimizer) s per step")
    p.add_argument("--codec-gelems", type=float, default=100.0,
                   help="assumed GPU codec throughput, G elements/s per rank (not measured: no GPU)")
    p.add_argument("--intra-gbyte", type=float, default=100.0, help="assumed intra-host bandwidth, GB/s per rank")
    p.add_argument("--alpha-us", type=float, default=30.0,
                   help="assumed latency of one message round on the cluster, microseconds")
    p.add_argument("--per-host", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--rates-gbit", type=float, nargs="+", default=[10, 25, 100])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with open(args.lab) as f:
        rows = json.load(f)["rows"]
    pts = lab_points(rows)
    m = fit(pts)
    print(f"fitted on {len(pts)} lab points: link efficiency {m['efficiency']:.3f}, alpha {1e3 * m['alpha_s']:.2f} ms "
          f"per round and CPU codec {1e9 * m['codec_s_per_elem']:.2f} ns per element per rank (both x ranks per core)\n")
    print("| point | configuration | measured s | model s | error |\n|---|---|---|---|---|")
    errs = []
    for q in pts:
        pred = predict_lab(q, m)
        errs.append(pred / q["step"] - 1)
        print(f"| {q['point']} | {q['label']} | {q['step']:.3f} | {pred:.3f} | {100 * errs[-1]:+.0f} % |")
    print(f"\nmedian |error| {100 * float(np.median(np.abs(errs))):.0f} %, max {100 * float(np.max(np.abs(errs))):.0f} %\n")
    table = cluster_table(m, args)
    print(f"Predicted: {args.params / 1e6:.0f}M parameters, compute {args.compute:.2f} s per step (not hidden), "
          f"{args.per_host} ranks per host, intra-host {args.intra_gbyte:.0f} GB/s per rank, codec "
          f"{args.codec_gelems:.0f} G elements/s per rank (assumed GPU), {args.alpha_us:.0f} us per message round "
          f"(assumed), link efficiency {m['efficiency']:.2f} (fitted)\n")
    print("| ranks | link Gbit/s | Horovod fp32 ring s | fp16 ring s | defaults flat (sharded) s | defaults hierarchical s "
          "| speed-up vs fp32 | inter-host MB per rank: fp32 / ours |\n|---|---|---|---|---|---|---|---|")
    for r in table:
        best = min(r["sharded"]["step_s"], r["hierarchical"]["step_s"])
        print(f"| {r['ranks']} | {r['gbit']:.0f} | {r['hvd_fp32']['step_s']:.3f} | {r['hvd_fp16']['step_s']:.3f} | "
              f"{r['sharded']['step_s']:.3f} | {r['hierarchical']['step_s']:.3f} | "
              f"{r['hvd_fp32']['step_s'] / best:.2f}x | {r['hvd_fp32']['inter_host_bytes_per_rank'] / 1e6:.0f} / "
              f"{r['hierarchical']['inter_host_bytes_per_rank'] / 1e6:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fit": m, "lab_errors": [{"point": q["point"], "label": q["label"], "measured_s": q["step"],
                                                 "model_s": predict_lab(q, m)} for q in pts],
                       "assumptions": {k: v for k, v in vars(args).items() if k not in ("lab", "json")},
                       "prediction": table}, f, indent=1)


if __name__ == "__main__":
    main()
