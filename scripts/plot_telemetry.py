"""Plot an hvd_qadam telemetry log (JSON lines, ``DistributedOptimizer(..., telemetry="run.jsonl")``
or ``HVD_QADAM_TELEMETRY=run.jsonl``) to a PNG: bytes per step, the ratio to Horovod's fp32 ring,
the step's times stacked (encode, exchange wait, decode, apply), the bits per element each fused
group's path sent, and the error-feedback residual ratio.

    python scripts/plot_telemetry.py run.jsonl -o run.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from hvd_qadam.telemetry import path_bits

TIMES = ("encode_s", "exchange_s", "decode_s", "apply_s")


def load(path: str) -> tuple[dict, list]:
    """(the first header object, the step records in order)."""
    header, steps = {}, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e}); is this an hvd_qadam telemetry log?") from None
            if "step" in obj:
                steps.append(obj)
            elif not header:
                header = obj
    if not steps:
        raise SystemExit(f"{path}: no step records")
    return header, steps


def num(v) -> float:
    return float("nan") if v is None else float(v)


def plot(path: str, out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, recs = load(path)
    x = [r["step"] for r in recs]
    fig, axes = plt.subplots(5, 1, figsize=(9, 14), sharex=True)
    ax = axes[0]
    ax.plot(x, [r["sent_bytes"] / 1e6 for r in recs], label="sent")
    ax.plot(x, [r["received_bytes"] / 1e6 for r in recs], label="received", linestyle="--")
    ax.plot(x, [r["fp32_bytes"] / 1e6 for r in recs], label="Horovod fp32 ring (sent)", linestyle=":")
    ax.set_ylabel("MB per step (rank 0)")
    ax.legend(loc="best", fontsize=8)
    ax = axes[1]
    ax.plot(x, [num(r["ratio"]) for r in recs], color="tab:green")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("x fewer bytes than fp32")
    ax = axes[2]
    ax.stackplot(x, *[[1e3 * num(r[k]) for r in recs] for k in TIMES], labels=[k[:-2] for k in TIMES])
    ax.set_ylabel("ms per step")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    groups = sorted({g for r in recs for g in r.get("group_paths") or {}}, key=lambda g: (len(g), g))
    if groups:
        for g in groups:
            ax.step(x, [path_bits((r.get("group_paths") or {}).get(g, "")) for r in recs], where="post",
                    label=f"group {g}")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.step(x, [1.0 if r["compressed"] else 0.0 for r in recs], where="post")
        ax.set_yticks([0, 1], ["full precision", "compressed"])
    ax.set_ylabel("bits per element" if groups else "")
    ax = axes[4]
    ax.plot(x, [num(r.get("residual_ratio")) for r in recs], color="tab:red")
    ax.set_ylabel("||EF residual|| / ||grad||")
    ax.set_xlabel("step")
    cfg = header.get("config") or {}
    up = cfg.get("uplink") or {}
    title = (f"{os.path.basename(path)}: {cfg.get('algorithm', '?')}, {up.get('quantizer', '?')} "
             f"{up.get('bits', '')} bits, topology {recs[-1].get('topology', '?')}, "
             f"{recs[-1].get('world_size', '?')} ranks")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="telemetry JSON-lines file")
    ap.add_argument("-o", "--out", default=None, help="PNG to write (default: the log's name with .png)")
    args = ap.parse_args(argv)
    out = args.out or os.path.splitext(args.log)[0] + ".png"
    plot(args.log, out)
    recs = load(args.log)[1]
    finite = [r["ratio"] for r in recs if r.get("ratio") is not None and math.isfinite(r["ratio"])]
    print(f"{out}: {len(recs)} steps" + (f", median ratio to fp32 {sorted(finite)[len(finite) // 2]:.2f}x"
                                          if finite else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
