#!/usr/bin/env python3
"""Benchmark of the quantizer kernels: throughput, wire bytes, first-call latency.

For each quantizer and bit width, on one fp32 vector (16M elements by default):
  * encode and decode throughput in GB/s of fp32 data (4 * n bytes / best time of several runs
    after a warm-up), also as a fraction of this machine's memory copy bandwidth measured in the
    same run (np.copyto of 64 MiB, or a CuPy device copy; bytes read / time);
  * speed-up over a straightforward torch-ops implementation of the same quantizer, measured in
    the same run (bucket norms via view + norm, torch.rand, floor or bucketize, shift-and-add
    packing): the baseline any user could write in a few lines;
  * bytes on the wire (Payload.nbytes from hvd_qadam.quantize) against the theoretical minimum
    (ceil(log2 K) bits per element plus one fp32 scale per bucket) and against fp32;
  * for the numba backend, the first-call latency: a fresh process compiling every kernel into
    an empty cache, a fresh process loading them from that cache, and this process's warm-up.

    python bench/bench_kernels.py [--quick] [--numel N] [--backend numba|numpy|cupy]
                                    [--json out.json] [--plot out.png]

Timings on a shared machine vary with what else runs; the load average is printed with the
results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hvd_qadam  # noqa: E402
from hvd_qadam.quant import codebooks as cb  # noqa: E402
from hvd_qadam.quant import rng  # noqa: E402
from hvd_qadam.quant.backend import fused_kernels  # noqa: E402
from hvd_qadam.quant.backend import cpu_backend, gpu_backend  # noqa: E402
from hvd_qadam.quant.common import num_buckets, packed_nbytes  # noqa: E402

FULL_CASES = ([("qsgd", b) for b in range(2, 9)] + [("qsgdinf", b) for b in (2, 4, 8)]
              + [("nuq", b) for b in range(2, 9)] + [("terngrad", 2), ("sign", 1), ("fp16", 16)])
QUICK_CASES = [("qsgd", 4), ("qsgd", 8), ("qsgdinf", 4), ("nuq", 4), ("terngrad", 2), ("sign", 1), ("fp16", 16)]
TORCH_BASELINE_ALWAYS = {("qsgd", 4), ("sign", 1)}


# ----------------------------------------------------------------------------- timing

class Timer:
    """Best-of-N wall time of a callable; synchronises the GPU around each run when needed.
    Also keeps the least CPU time (all threads of this process) of a run in ``last_cpu``: on a
    shared machine the wall time depends on what else runs, the CPU time much less."""

    def __init__(self, repeats: int, sync=None):
        self.repeats = repeats
        self.sync = sync or (lambda: None)
        self.last_cpu = math.nan

    def best(self, fn, repeats: int | None = None) -> float:
        fn()                      # warm-up (first-call costs are measured separately)
        self.sync()
        best = cpu = math.inf
        for _ in range(repeats or self.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        self.last_cpu = cpu
        return best


def copy_bandwidth(xp, timer: Timer) -> float:
    """GB/s of bytes read by a 64 MiB array copy (np.copyto, or the CuPy equivalent)."""
    src = xp.ones(64 * 2 ** 20 // 4, dtype=xp.float32)
    dst = xp.empty_like(src)
    return src.nbytes / timer.best(lambda: xp.copyto(dst, src), max(timer.repeats, 10)) / 1e9


# ----------------------------------------------------------------------------- torch-ops baseline

class TorchOps:
    """The quantizer written with plain torch tensor ops, as a user might (fp32 scales, so its
    results differ slightly from the exact kernels; it is a speed reference only)."""

    def __init__(self, torch, levels, bits, bucket_size, scale_kind, stochastic, n, device):
        self.torch = torch
        self.levels = torch.tensor(np.array(levels, np.float32), device=device)
        self.bits, self.bucket_size, self.scale_kind, self.stochastic = bits, bucket_size, scale_kind, stochastic
        self.n, self.device = n, device
        k = len(levels)
        self.uniform_m = (k - 1) // 2 if k % 2 == 1 and np.allclose(
            np.asarray(levels), (np.arange(k) - (k - 1) // 2) / max(1, (k - 1) // 2)) else None
        self.generator = torch.Generator(device=device).manual_seed(0)
        nb = num_buckets(n, bucket_size)
        self.counts = torch.full((nb,), float(bucket_size), device=device)
        self.counts[-1] = n - (nb - 1) * bucket_size

    def encode(self, x):
        t = self.torch
        n, b = self.n, self.bucket_size
        nb = num_buckets(n, b)
        rows = t.nn.functional.pad(x, (0, nb * b - n)).view(nb, b)
        if self.scale_kind == cb.SCALE_L2:
            scales = rows.norm(dim=1)
        elif self.scale_kind == cb.SCALE_MAXABS:
            scales = rows.abs().amax(dim=1)
        else:
            scales = rows.abs().sum(dim=1) / self.counts
        safe = t.where(scales > 0, scales, t.ones_like(scales))
        r = t.where(scales[:, None] > 0, rows / safe[:, None], t.zeros_like(rows)).view(-1)[:n]
        lv = self.levels
        r = r.clamp(float(lv[0]), float(lv[-1]))
        if self.uniform_m is not None:
            j = t.floor((r - lv[0]) * self.uniform_m).clamp(0, lv.numel() - 2).long()
        else:
            j = t.bucketize(r, lv[1:-1], right=True)
        lo = lv[j]
        p = (r - lo) / (lv[j + 1] - lo)
        if self.stochastic:
            up = t.rand(n, generator=self.generator, device=self.device) < p
        else:
            up = p >= 0.5
        return scales, self.pack((j + up).to(t.uint8))

    def pack(self, codes):
        t, bits, n = self.torch, self.bits, self.n
        if 8 % bits == 0:
            per_byte = 8 // bits
            c = t.nn.functional.pad(codes, (0, (-n) % per_byte)).view(-1, per_byte).to(t.int32)
            shifts = t.arange(per_byte, dtype=t.int32, device=self.device) * bits
            return (c << shifts).sum(1).to(t.uint8)
        c = t.nn.functional.pad(codes, (0, (-n) % 8)).view(-1, 8).to(t.int64)
        words = (c << (t.arange(8, device=self.device) * bits)).sum(1)   # 8 codes -> `bits` bytes
        return words.view(t.uint8).view(-1, 8)[:, :bits].reshape(-1)[:packed_nbytes(n, bits)]

    def decode(self, scales, packed):
        t, bits, n = self.torch, self.bits, self.n
        if 8 % bits == 0:
            shifts = t.arange(8 // bits, dtype=t.int32, device=self.device) * bits
            codes = ((packed[:, None].to(t.int32) >> shifts) & ((1 << bits) - 1)).view(-1)[:n]
        else:
            groups = t.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).view(-1, bits)
            words = t.nn.functional.pad(groups, (0, 8 - bits)).contiguous().view(t.int64).view(-1)
            codes = ((words[:, None] >> (t.arange(8, device=self.device) * bits)) & ((1 << bits) - 1)).view(-1)[:n]
        values = self.levels[codes.long()]
        return values * scales.repeat_interleave(self.bucket_size)[:n]


# ----------------------------------------------------------------------------- first-call latency

LATENCY_PROBE = ("import time; t0 = time.perf_counter(); "
                 "from hvd_qadam.warmup import compile_kernels; compile_kernels(); "
                 "print(time.perf_counter() - t0)")


def numba_first_call_latency(cold: bool) -> dict:
    """Seconds from import to compiled kernels in fresh processes: with an empty on-disk cache
    (compiling everything) and with the cache that run left behind (loading)."""
    out = {}
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in (["compile_s"] if cold else []) + ["cache_load_s"]:
            if label == "cache_load_s" and not cold:
                env = dict(os.environ)      # the user's own cache (warm if anything ran before)
            result = subprocess.run([sys.executable, "-c", LATENCY_PROBE], env=env, cwd=repo,
                                    capture_output=True, text=True, check=True)
            out[label] = float(result.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- one case

def min_wire_bytes(name: str, bits: int, n: int, bucket_size: int) -> int:
    if name == "fp16":
        return 2 * n
    k = len(cb.codebook(name, bits))
    return packed_nbytes(n, math.ceil(math.log2(k))) + 4 * num_buckets(n, bucket_size)


def run_case(name, bits, x, x_host, args, backend, xp, timer, torch, torch_x, device):
    n = x.size
    row = {"quantizer": name, "bits": bits}
    if name == "fp16":
        half = x.astype(xp.float16)
        row["levels"] = None
        row["encode_s"] = timer.best(lambda: x.astype(xp.float16))
        row["encode_cpu_ns"] = 1e9 * timer.last_cpu / n
        row["decode_s"] = timer.best(lambda: half.astype(xp.float32))
        row["decode_cpu_ns"] = 1e9 * timer.last_cpu / n
        row["wire_bytes"] = hvd_qadam.quantize(x_host, "fp16", 16).nbytes
    else:
        kind = cb.kind(name)
        levels = cb.codebook(name, bits)
        row["levels"] = int(len(levels))
        key = rng.stream_key(1)
        scales, packed = backend.encode(x, levels, bits, args.bucket_size, kind.scale, kind.stochastic, key, 0)
        row["encode_s"] = timer.best(
            lambda: backend.encode(x, levels, bits, args.bucket_size, kind.scale, kind.stochastic, key, 0))
        row["encode_cpu_ns"] = 1e9 * timer.last_cpu / n
        row["decode_s"] = timer.best(lambda: backend.decode(scales, packed, levels, bits, args.bucket_size, n))
        row["decode_cpu_ns"] = 1e9 * timer.last_cpu / n
        acc = xp.zeros(n, dtype=xp.float32)
        if fused_kernels(backend).decode_into:
            row["decode_add_s"] = timer.best(
                lambda: backend.decode_add(acc, scales, packed, levels, bits, args.bucket_size, n))
        row["wire_bytes"] = hvd_qadam.quantize(x_host, name, bits, bucket_size=args.bucket_size,
                                               backend=None if args.backend == "cupy" else args.backend).nbytes
        if torch is not None and (not args.quick_torch or (name, bits) in TORCH_BASELINE_ALWAYS):
            ops = TorchOps(torch, levels, bits, args.bucket_size, kind.scale, kind.stochastic, n, device)
            t_scales, t_packed = ops.encode(torch_x)
            assert t_packed.numel() == packed_nbytes(n, bits)
            sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else None
            torch_timer = Timer(timer.repeats, sync)
            row["torch_encode_s"] = torch_timer.best(lambda: ops.encode(torch_x))
            row["torch_encode_cpu_ns"] = 1e9 * torch_timer.last_cpu / n
            row["torch_decode_s"] = torch_timer.best(lambda: ops.decode(t_scales, t_packed))
            row["torch_decode_cpu_ns"] = 1e9 * torch_timer.last_cpu / n
    row["min_wire_bytes"] = min_wire_bytes(name, bits, n, args.bucket_size)
    return row


def merge_rounds(rows):
    """One row per case from several rounds: the least time of each measurement."""
    best = dict(rows[0])
    for row in rows[1:]:
        for key, value in row.items():
            if key.endswith("_s") or key.endswith("_cpu_ns"):
                best[key] = min(best[key], value)
    return best


def derive(row, n):
    """Throughputs and ratios from the times."""
    row["n"] = n
    gb = 4 * n / 1e9
    row["encode_gbps"] = gb / row["encode_s"]
    row["decode_gbps"] = gb / row["decode_s"]
    if "torch_encode_s" in row:
        row["encode_speedup"] = row["torch_encode_s"] / row["encode_s"]
        row["decode_speedup"] = row["torch_decode_s"] / row["decode_s"]
    row["wire_over_min"] = row["wire_bytes"] / row["min_wire_bytes"]
    row["compression_vs_fp32"] = 4 * n / row["wire_bytes"]
    return row


# ----------------------------------------------------------------------------- report

def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows, copy_gbps):
    head = (f"{'quantizer':<9} {'bits':>4} {'K':>4} | {'enc GB/s':>8} {'/copy':>5} {'dec GB/s':>8} {'/copy':>5} "
            f"| {'enc cpu':>7} {'dec cpu':>7} | {'torch enc':>9} {'x':>6} {'torch dec':>9} {'x':>6} "
            f"| {'wire B':>10} {'min B':>10} {'/min':>6} {'vs fp32':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        torch_enc = 4 * 1e-9 * r["n"] / r["torch_encode_s"] if "torch_encode_s" in r else None
        torch_dec = 4 * 1e-9 * r["n"] / r["torch_decode_s"] if "torch_decode_s" in r else None
        print(f"{r['quantizer']:<9} {r['bits']:>4} {fmt(r['levels'], '>4')} | {r['encode_gbps']:>8.2f} "
              f"{r['encode_gbps'] / copy_gbps:>5.2f} {r['decode_gbps']:>8.2f} {r['decode_gbps'] / copy_gbps:>5.2f} "
              f"| {fmt(r.get('encode_cpu_ns'), '>7.2f')} {fmt(r.get('decode_cpu_ns'), '>7.2f')} "
              f"| {fmt(torch_enc, '>9.3f')} {fmt(r.get('encode_speedup'), '>6.1f')} {fmt(torch_dec, '>9.3f')} "
              f"{fmt(r.get('decode_speedup'), '>6.1f')} | {r['wire_bytes']:>10} {r['min_wire_bytes']:>10} "
              f"{r['wire_over_min']:>6.4f} {r['compression_vs_fp32']:>7.2f}")


def check_targets(rows) -> list[str]:
    """The issue's targets for the numba backend on the reference 2-core machine."""
    by = {(r["quantizer"], r["bits"]): r for r in rows}
    lines = []
    q4, sign = by.get(("qsgd", 4)), by.get(("sign", 1))
    if q4:
        lines.append(f"qsgd 4-bit encode {q4['encode_gbps']:.2f} GB/s (target >= 2): "
                     f"{'PASS' if q4['encode_gbps'] >= 2 else 'FAIL'}")
        if "encode_speedup" in q4:
            lines.append(f"qsgd 4-bit encode speed-up over torch ops {q4['encode_speedup']:.1f}x (target >= 10): "
                         f"{'PASS' if q4['encode_speedup'] >= 10 else 'FAIL'}")
        lines.append(f"qsgd 4-bit decode {q4['decode_gbps']:.2f} GB/s (target >= 3): "
                     f"{'PASS' if q4['decode_gbps'] >= 3 else 'FAIL'}")
    if sign:
        lines.append(f"sign 1-bit encode {sign['encode_gbps']:.2f} GB/s (target >= 4): "
                     f"{'PASS' if sign['encode_gbps'] >= 4 else 'FAIL'}")
    return lines


def plot(rows, copy_gbps, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["quantizer"] if r["quantizer"] == "fp16" else f"{r['quantizer']}{r['bits']}" for r in rows]
    pos = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(rows)), 8), sharex=True)
    top.bar(pos - 0.2, [r["encode_gbps"] for r in rows], 0.4, label="encode")
    top.bar(pos + 0.2, [r["decode_gbps"] for r in rows], 0.4, label="decode")
    top.axhline(copy_gbps, color="k", linestyle="--", label=f"memory copy {copy_gbps:.1f} GB/s")
    top.set_ylabel("GB/s of fp32 input")
    top.set_title(title)
    top.legend()
    speed = [(i, r["encode_speedup"], r["decode_speedup"]) for i, r in enumerate(rows) if "encode_speedup" in r]
    if speed:
        idx, enc, dec = zip(*speed)
        bottom.bar(np.array(idx) - 0.2, enc, 0.4, label="encode")
        bottom.bar(np.array(idx) + 0.2, dec, 0.4, label="decode")
        bottom.axhline(10, color="r", linestyle=":", label="10x")
        bottom.set_yscale("log")
        bottom.legend()
    bottom.set_ylabel("speed-up over torch ops")
    bottom.set_xticks(pos)
    bottom.set_xticklabels(labels, rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=16 * 2 ** 20, help="vector length (default 16M)")
    parser.add_argument("--bucket-size", type=int, default=512)
    parser.add_argument("--backend", choices=("numba", "numpy", "cupy"), default="numba")
    parser.add_argument("--quick", action="store_true", help="a subset of quantizers and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (best is kept)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes over all cases, keeping each measurement's best (robust to bursts of load)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch-ops baseline")
    parser.add_argument("--quick-torch", action="store_true",
                        help="torch baseline only for 4-bit qsgd and 1-bit sign")
    parser.add_argument("--no-cold-compile", action="store_true",
                        help="skip the fresh-cache numba compile measurement (it takes a while)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar chart here (matplotlib, Agg)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (3 if args.quick or args.backend == "numpy" else 7)
    info = {"numel": args.numel, "bucket_size": args.bucket_size, "backend": args.backend, "repeats": repeats,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_before": os.getloadavg(), "numpy": np.__version__}
    try:
        import torch
        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None

    if args.backend == "cupy":
        import cupy as xp
        backend = gpu_backend()
        timer = Timer(repeats, lambda: xp.cuda.get_current_stream().synchronize())
        device = "cuda"
        info["first_call_s"] = {"this_process": backend.warmup()}
        info["device"] = xp.cuda.runtime.getDeviceProperties(xp.cuda.runtime.getDevice())["name"].decode()
    else:
        xp = np
        backend = cpu_backend(args.backend)
        timer = Timer(repeats)
        device = "cpu"
        if args.backend == "numba":
            import numba
            info["numba"], info["numba_threads"] = numba.__version__, numba.get_num_threads()
            info["first_call_s"] = numba_first_call_latency(cold=not args.no_cold_compile)
            from hvd_qadam.warmup import compile_kernels
            info["first_call_s"]["this_process"] = compile_kernels()

    x_host = np.random.default_rng(0).standard_normal(args.numel).astype(np.float32)
    x = xp.asarray(x_host)
    torch_x = None
    if torch is not None:
        torch_x = torch.from_numpy(x_host).to(device)
    info["copy_gbps"] = copy_bandwidth(xp, timer)

    # Rounds over all cases, keeping each measurement's best: on a shared machine a burst of
    # other work then spoils one round of a case rather than the result.
    measured = {case: [] for case in cases}
    progress = tqdm(total=len(cases) * args.rounds, desc=f"{args.backend} kernels", unit="case", file=sys.stderr)
    for _ in range(args.rounds):
        for name, bits in cases:
            measured[(name, bits)].append(run_case(name, bits, x, x_host, args, backend, xp, timer, torch, torch_x,
                                                   device))
            progress.update()
    progress.close()
    rows = [derive(merge_rounds(measured[case]), args.numel) for case in cases]
    info["load_avg_after"] = os.getloadavg()

    print(f"backend {args.backend}, {args.numel} fp32 elements, bucket {args.bucket_size}, best of {repeats} runs "
          f"x {args.rounds} round(s); "
          f"{info['cpus']} CPUs, load average {info['load_avg_before'][0]:.2f} before / "
          f"{info['load_avg_after'][0]:.2f} after")
    print(f"memory copy bandwidth (bytes read / time): {info['copy_gbps']:.2f} GB/s"
          + (f"; torch {info['torch']} with {info['torch_threads']} threads" if torch is not None else ""))
    if "first_call_s" in info:
        print("first-call latency: " + ", ".join(f"{k} {v:.2f} s" for k, v in info["first_call_s"].items()))
    print("enc/dec cpu: CPU time of all threads per element (ns), least over the runs; x: speed-up "
          "(wall time) over the torch-ops baseline")
    print()
    print_table(rows, info["copy_gbps"])
    print()
    if args.backend == "numba":
        for line in check_targets(rows):
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, info["copy_gbps"], args.plot, f"{args.backend}: {args.numel} elements, bucket {args.bucket_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
