#!/usr/bin/env python3
"""Throughput of the CUDA quantizer kernels against the device's own copy bandwidth.

On one fp32 vector (10M elements by default, buckets of 512), for each quantizer width:
  * ``copy``: a device-to-device copy of the vector (cupy.copyto), the bandwidth yardstick;
  * ``encode`` (x -> scales, codes), ``decode`` (codes -> x), ``encode_ef`` (v, e -> scales, codes
    and the new residual, one fused pass), ``decode_mean`` of 2 and 4 payloads (one pass);
each as the best of several runs (stream synchronised around each), in GB/s of the bytes the
kernel must move at least (every input read once, every output written once), and as a fraction
of the copy's GB/s counted the same way (4n read + 4n written).

    python bench/bench_gpu_fused.py [--numel N] [--bucket-size B] [--repeats R] [--json out.json]

Needs CuPy and a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hvd_qadam.quant import codebooks as cb  # noqa: E402
from hvd_qadam.quant import gpu_cupy  # noqa: E402
from hvd_qadam.quant.common import num_buckets, packed_nbytes  # noqa: E402

CASES = [("qsgd", 4), ("qsgd", 6), ("qsgdinf", 8), ("sign", 1)]


def best_time(cp, fn, repeats):
    stream = cp.cuda.get_current_stream()
    fn()
    stream.synchronize()
    best = float("inf")
    for _ in range(repeats):
        stream.synchronize()
        t0 = time.perf_counter()
        fn()
        stream.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def device_name(cp):
    try:
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except AttributeError:
        return "unknown device"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--bucket-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import cupy as cp

    n, bucket = args.numel, args.bucket_size
    rng = np.random.default_rng(0)
    v = cp.asarray(rng.standard_normal(n).astype(np.float32))
    e = cp.asarray((rng.standard_normal(n) * 0.01).astype(np.float32))
    out = cp.empty_like(v)
    compile_s = gpu_cupy.warmup()
    copy_s = best_time(cp, lambda: cp.copyto(out, v), args.repeats)
    copy_gbps = 8 * n / copy_s / 1e9
    result = {"device": device_name(cp), "numel": n, "bucket_size": bucket, "repeats": args.repeats,
              "compile_s": compile_s, "copy_gbps": copy_gbps, "kernels": []}
    print(f"{result['device']}: {n} elements, buckets of {bucket}; device copy {copy_gbps:.1f} GB/s "
          f"(read + write), first compile {compile_s:.2f} s")
    for name, bits in CASES:
        levels, scale_kind = cb.codebook(name, bits), cb.kind(name).scale
        stochastic = cb.kind(name).stochastic
        code_bytes = packed_nbytes(n, bits) + 4 * num_buckets(n, bucket)
        scales, packed = gpu_cupy.encode(v, levels, bits, bucket, scale_kind, stochastic, 1, 0)
        runs = {
            "encode": (lambda: gpu_cupy.encode(v, levels, bits, bucket, scale_kind, stochastic, 1, 0),
                       4 * n + code_bytes),
            "encode_ef": (lambda: gpu_cupy.encode_ef(v, e, out, levels, bits, bucket, scale_kind, stochastic, 1, 0),
                          12 * n + code_bytes),
            "decode": (lambda: gpu_cupy.decode_into(out, scales, packed, levels, bits, bucket, n),
                       code_bytes + 4 * n),
        }
        for rows in (2, 4):
            runs[f"decode_mean_{rows}"] = (
                lambda rows=rows: gpu_cupy.decode_mean(out, [scales] * rows, [packed] * rows, levels, bits, bucket, n),
                rows * code_bytes + 4 * n)
        for kernel, (fn, nbytes) in runs.items():
            seconds = best_time(cp, fn, args.repeats)
            gbps = nbytes / seconds / 1e9
            row = {"quantizer": name, "bits": bits, "kernel": kernel, "ms": seconds * 1e3, "gbps": gbps,
                   "of_copy": gbps / copy_gbps}
            result["kernels"].append(row)
            print(f"  {name + str(bits):<9} {kernel:<14} {seconds * 1e3:8.3f} ms {gbps:8.1f} GB/s "
                  f"{100 * gbps / copy_gbps:6.1f} % of copy")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
