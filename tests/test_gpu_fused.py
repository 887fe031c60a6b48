"""The fused CUDA kernels (error feedback + encode in one pass, the mean of N payloads in one pass,
decode into / add / add-and-divide) against the numba CPU path, bit for bit.

They run on a CUDA device when there is one, else through the CuPy stand-in (tests/cupy_standin),
which executes gpu_cupy's launches with the CUDA kernels compiled for the host.
"""
from __future__ import annotations

import numpy as np
import pytest

from hvd_qadam.quant import codebooks as cb
from hvd_qadam.quant import gpu_cupy
from hvd_qadam.quant.codebooks import SCALE_L2, SCALE_MAXABS, SCALE_MEANABS

pytest.importorskip("numba")
from hvd_qadam.quant import cpu_numba  # noqa: E402
from conftest import random_codebook, same_bits  # noqa: E402

KEY = 0x0123456789ABCDEF
BIG_OFFSET = (1 << 33) + 5          # stream indices past 2^32: the hash's high word counts


def sample(n, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-4, 4, n))).astype(np.float32)
    x[rng.random(n) < 0.05] = 0
    return x


# (name, bits, levels, scale kind): uniform grids, count searches, the large-codebook paths
CODEBOOKS = [(q, b, cb.codebook(q, b), cb.kind(q).scale)
             for q, b in (("qsgd", 4), ("qsgd", 8), ("qsgdinf", 6), ("sign", 1), ("terngrad", 2), ("nuq", 3),
                          ("nuq", 8))]
CODEBOOKS += [("random", 5, random_codebook(np.random.default_rng(5), 19, -0.3, 1.0), kind)
              for kind in (SCALE_L2, SCALE_MAXABS, SCALE_MEANABS)]
IDS = [f"{q}{b}-{k}" for q, b, _, k in CODEBOOKS]


def check_encode_ef(cupy, v, e, levels, bits, bucket_size, scale_kind, stochastic, offset):
    """gpu_cupy.encode_ef against cpu_numba.encode_ef: scales, codes, the new residual, the flag."""
    want_out = np.empty_like(v)
    want_scales, want_packed, want_flag = cpu_numba.encode_ef(v, e, want_out, levels, bits, bucket_size, scale_kind,
                                                              stochastic, KEY, offset)
    out = cupy.empty(v.size, dtype=cupy.float32)
    scales, packed, flag = gpu_cupy.encode_ef(cupy.asarray(v), cupy.asarray(e), out, levels, bits, bucket_size,
                                              scale_kind, stochastic, KEY, offset)
    assert flag == want_flag
    assert same_bits(scales.get(), want_scales), "scales differ"
    assert same_bits(packed.get(), want_packed), "codes differ"
    if not want_flag:
        assert same_bits(out.get(), want_out), "residual differs"
    return scales, packed


@pytest.mark.parametrize("name,bits,levels,scale_kind", CODEBOOKS, ids=IDS)
def test_gpu_encode_ef_matches_numba(cupy, name, bits, levels, scale_kind):
    for i, (n, bucket_size) in enumerate(((1, 1), (7, 3), (513, 512), (4101, 100), (20_001, 8192), (30_003, 9000),
                                          (50_000, 1 << 20))):
        v, e = sample(n, seed=n), sample(n, seed=n + 1) * np.float32(0.1)
        check_encode_ef(cupy, v, e, levels, bits, bucket_size, scale_kind, stochastic=i % 2 == 0,
                        offset=BIG_OFFSET if i % 3 == 0 else i)


@pytest.mark.parametrize("scale_kind", [SCALE_L2, SCALE_MAXABS, SCALE_MEANABS])
def test_gpu_encode_ef_long_buckets(cupy, scale_kind):
    """Buckets longer than 8192 split their scale sums into pieces (one thread each) that the
    fused kernels form from v + e as well."""
    v, e = sample(100_003, seed=3), sample(100_003, seed=4)
    levels = cb.codebook("qsgd", 5)
    for bucket_size in (30_000, 100_003, 1 << 22):
        check_encode_ef(cupy, v, e, levels, 5, bucket_size, scale_kind, True, BIG_OFFSET)
    if hasattr(cupy, "launch_log") and scale_kind != SCALE_L2:
        assert any(name == "hq_ef_scale_pieces" for name, _, _ in cupy.launch_log[-9:])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_gpu_encode_ef_flags_nonfinite_input(cupy):
    levels = cb.codebook("qsgd", 4)
    v, e = sample(5000, seed=1), np.zeros(5000, np.float32)
    for bad in (np.inf, -np.inf, np.nan):
        for where in (0, 2500, 4999):
            w = v.copy()
            w[where] = bad
            for scale_kind in (SCALE_L2, SCALE_MAXABS, SCALE_MEANABS):
                check_encode_ef(cupy, w, e, levels, 4, 512, scale_kind, True, 0)
    big = np.full(4096, 3e38, np.float32)           # finite, but the L2 scale overflows: not flagged
    check_encode_ef(cupy, big, np.zeros_like(big), levels, 4, 512, SCALE_L2, True, 0)
    overflow = np.full(16, 3e38, np.float32)         # v + e overflows to inf: flagged
    check_encode_ef(cupy, overflow, overflow, levels, 4, 8, SCALE_MAXABS, False, 0)


def test_gpu_encode_ef_refuses_bad_buffers(cupy):
    levels = cb.codebook("qsgd", 4)
    v = cupy.asarray(sample(100, seed=1))
    e = cupy.zeros(100, dtype=cupy.float32)
    with pytest.raises(ValueError, match="overlap"):
        gpu_cupy.encode_ef(v, e, v, levels, 4, 16, SCALE_L2, True, KEY)
    with pytest.raises(ValueError, match="residual has"):
        gpu_cupy.encode_ef(v, cupy.zeros(99, dtype=cupy.float32), cupy.empty(100, dtype=cupy.float32), levels, 4,
                           16, SCALE_L2, True, KEY)
    with pytest.raises(ValueError, match="out must be"):
        gpu_cupy.encode_ef(v, e, cupy.empty(100, dtype=cupy.float64), levels, 4, 16, SCALE_L2, True, KEY)
    with pytest.raises(TypeError, match="CuPy array"):
        gpu_cupy.encode_ef(sample(100, seed=1), e, cupy.empty(100, dtype=cupy.float32), levels, 4, 16, SCALE_L2,
                           True, KEY)


@pytest.mark.parametrize("name,bits,levels,scale_kind", CODEBOOKS, ids=IDS)
def test_gpu_decode_mean_matches_numba(cupy, name, bits, levels, scale_kind):
    """decode_mean of N payloads (received as host bytes, or already on the device) and the
    decode_into / decode_add / decode_add-with-divisor chain, against numba."""
    for i, (n, bucket_size) in enumerate(((1, 1), (13, 4), (4101, 512), (30_003, 9000))):
        rows = 1 + i % 4 + (i == 0)
        payloads = [cpu_numba.encode(sample(n, seed=10 * n + r), levels, bits, bucket_size, scale_kind, True, KEY + r,
                                     BIG_OFFSET) for r in range(rows)]
        scales, packed = [p[0] for p in payloads], [p[1] for p in payloads]
        want = cpu_numba.decode_mean(np.empty(n, np.float32), scales, packed, levels, bits, bucket_size, n)
        for on_device in (False, True):
            s_in = [cupy.asarray(s) for s in scales] if on_device else scales
            p_in = [cupy.asarray(p) for p in packed] if on_device else packed
            out = cupy.empty(n, dtype=cupy.float32)
            assert gpu_cupy.decode_mean(out, s_in, p_in, levels, bits, bucket_size, n) is out
            assert same_bits(out.get(), want), f"decode_mean differs ({rows} payloads, n={n})"
        acc_cpu = np.empty(n, np.float32)
        acc_gpu = cupy.empty(n, dtype=cupy.float32)
        cpu_numba.decode_into(acc_cpu, scales[0], packed[0], levels, bits, bucket_size, n)
        gpu_cupy.decode_into(acc_gpu, cupy.asarray(scales[0]), cupy.asarray(packed[0]), levels, bits, bucket_size, n)
        for r in range(1, rows):
            divisor = rows if r == rows - 1 else None
            cpu_numba.decode_add(acc_cpu, scales[r], packed[r], levels, bits, bucket_size, n, divisor=divisor)
            gpu_cupy.decode_add(acc_gpu, cupy.asarray(scales[r]), cupy.asarray(packed[r]), levels, bits, bucket_size,
                                n, divisor=divisor)
        assert same_bits(acc_gpu.get(), acc_cpu), "decode_into + decode_add chain differs"
        if rows > 1:
            assert same_bits(acc_cpu, want), "the chain and the one-pass mean must agree on the CPU too"


def test_gpu_decode_mean_refuses_bad_input(cupy):
    levels = cb.codebook("qsgd", 4)
    scales, packed = cpu_numba.encode(sample(100, seed=2), levels, 4, 16, SCALE_L2, True, KEY)
    out = cupy.empty(100, dtype=cupy.float32)
    with pytest.raises(ValueError, match="one .scales, packed. pair"):
        gpu_cupy.decode_mean(out, [], [], levels, 4, 16, 100)
    with pytest.raises(ValueError, match="scales for"):
        gpu_cupy.decode_mean(out, [scales, scales[:3]], [packed, packed], levels, 4, 16, 100)
    with pytest.raises(ValueError, match="out must be"):
        gpu_cupy.decode_mean(cupy.empty(99, dtype=cupy.float32), [scales], [packed], levels, 4, 16, 100)


def test_gpu_received_payloads_decode_on_the_device(cupy):
    """What the engine does with a CUDA group buffer, up to the DLPack hand-off of the torch
    tensor: payloads received as frame bytes are decoded by the CUDA kernels in place into the
    shard slices of one device buffer (codec.decode_into -> codec.decode_on_device, the sharded
    downlink) and averaged in one pass (codec.mean_into -> codec.mean_on_device, the uplink), bit
    for bit the CPU's; elements outside a slice are never written."""
    import torch

    from hvd_qadam.codec import (decode_flat, decode_on_device, decode_payload_into, mean_on_device,
                                 mean_payloads_into, quantize)
    from hvd_qadam.layout import shard_bounds
    from hvd_qadam.wire import Frame
    n, world, bucket = 10_007, 3, 128
    bounds = shard_bounds(n, world, bucket)
    x = [sample(n, seed=40 + r) for r in range(world)]
    for name, bits in (("qsgdinf", 6), ("sign", 1), ("nuq", 3)):
        rounding = "stochastic" if cb.kind(name).stochastic else "nearest"
        sent = [Frame(rank=c, step=4, layout=7, payloads=[quantize(x[c][a:b], name, bits, bucket, key=KEY + c,
                                                                   offset=a + BIG_OFFSET, rounding=rounding)])
                for c, (a, b) in enumerate(bounds)]
        received = [Frame.from_bytes(f.to_bytes()).payloads[0] for f in sent]
        out = cupy.full(n + 64, np.nan, dtype=cupy.float32)
        for p, (a, b) in zip(received, bounds):
            decode_payload_into(out[a:b], p)
        got = out.get()
        assert same_bits(got[:n], np.concatenate([decode_flat(p) for p in received])), name
        assert np.isnan(got[n:]).all(), "decoded past the group's end"
        ups = [Frame.from_bytes(Frame(rank=r, step=4, layout=7, payloads=[
            quantize(x[r], name, bits, bucket, key=KEY + r, offset=BIG_OFFSET, rounding=rounding)]).to_bytes()).payloads[0]
            for r in range(world)]
        mean = cupy.empty(n, dtype=cupy.float32)
        mean_payloads_into(mean, ups)
        want = cpu_numba.decode_mean(np.empty(n, np.float32), [p.scales for p in ups], [p.codes for p in ups],
                                     ups[0].levels, bits, bucket, n)
        assert same_bits(mean.get(), want), name
        # the engine's torch-side guards: a CPU buffer or a pass-through payload is not the device path's
        assert not decode_on_device(ups[0], torch.empty(n)) and not mean_on_device(ups, torch.empty(n))
        assert not decode_on_device(quantize(x[0], "bf16"), torch.empty(n))


def test_gpu_cuda_tensors_take_the_fused_kernels(cupy):
    """CUDA torch tensors through the API's error-feedback quantization, functional's optimizer
    transforms and the engine's one-pass mean run the fused CUDA kernels, and give the bytes,
    residuals, updates and means of the CPU path."""
    import torch

    from hvd_qadam import functional as F
    from hvd_qadam.codec import quantize_ef
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA: DLPack hand-offs of tensors in real device memory")
    v_host, e_host = torch.from_numpy(sample(100_003, seed=8)), torch.from_numpy(sample(100_003, seed=9))
    for quantizer, bits in (("qsgd", 6), ("sign", 1), ("nuq", 3)):
        out_host = torch.empty_like(v_host)
        want, _ = quantize_ef(v_host, e_host, out_host, quantizer, bits, 512, key=KEY, offset=BIG_OFFSET)
        out = torch.empty_like(v_host, device="cuda")
        got, nonfinite = quantize_ef(v_host.cuda(), e_host.cuda(), out, quantizer, bits, 512, key=KEY,
                                     offset=BIG_OFFSET)
        assert not nonfinite and got.to_bytes() == want.to_bytes()
        assert same_bits(out.cpu().numpy(), out_host.numpy())
    g, m, v, x = (torch.from_numpy(a) for a in transform_inputs(100_003, seed=1))
    c = F.adam_constants(5, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, True, False)
    outs_host = [torch.empty_like(g) for _ in range(3)]
    F.adam_update(g, m, v, x, *outs_host, c)
    outs = [torch.empty_like(g, device="cuda") for _ in range(3)]
    F.adam_update(g.cuda(), m.cuda(), v.cuda(), x.cuda(), *outs, c)
    for a, b in zip(outs, outs_host):
        assert same_bits(a.cpu().numpy(), b.numpy())
    c = F.momentum_constants(0.1, 0.9, 0.0, True, 1e-4, False, False)
    buf_host, d_host = torch.empty_like(g), torch.empty_like(g)
    F.momentum_update(g, m, x, buf_host, d_host, c)
    buf, d = torch.empty_like(g, device="cuda"), torch.empty_like(g, device="cuda")
    F.momentum_update(g.cuda(), m.cuda(), x.cuda(), buf, d, c)
    assert same_bits(buf.cpu().numpy(), buf_host.numpy()) and same_bits(d.cpu().numpy(), d_host.numpy())
    import hvd_qadam
    from hvd_qadam.codec import mean_on_device
    payloads = [hvd_qadam.quantize(torch.from_numpy(sample(100_003, seed=r)), "qsgd", 6, 512, seed=r)
                for r in range(3)]
    want = cpu_numba.decode_mean(np.empty(100_003, np.float32), [p.scales for p in payloads],
                                 [p.codes for p in payloads], payloads[0].levels, 6, 512, 100_003)
    mean = torch.empty(100_003, device="cuda")
    assert mean_on_device(payloads, mean) and same_bits(mean.cpu().numpy(), want)
    # a received payload decoded in place into a slice of a CUDA buffer (the sharded downlink)
    from hvd_qadam.codec import decode_flat, decode_on_device
    from hvd_qadam.wire import Payload
    received = Payload.from_bytes(payloads[1].to_bytes())
    buf = torch.full((100_003 + 10,), float("nan"), device="cuda")
    assert decode_on_device(received, buf[5:100_008])
    host = buf.cpu().numpy()
    assert same_bits(host[5:100_008], decode_flat(received)) and np.isnan(host[:5]).all() and np.isnan(host[-5:]).all()
    # 2-byte pass-through payloads go up at 2 bytes and are widened on the device
    from hvd_qadam.codec import _decode_on
    xb = torch.randn(1001).to(torch.bfloat16)
    for q, t in (("bf16", xb), ("fp16", xb.half())):
        got = _decode_on(Payload.from_bytes(hvd_qadam.quantize(t, q).to_bytes()), torch.device("cuda"))
        assert got.is_cuda and got.dtype == torch.float32 and torch.equal(got.cpu(), t.float())
    assert not mean_on_device(payloads, torch.empty(100_003)), "a CPU buffer is not the device path's"


# ----------------------------------------------------------------------------- optimizer transforms

def transform_inputs(n, seed):
    rng = np.random.default_rng(seed)
    g, m, x = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = (rng.standard_normal(n) ** 2 * 1e-3).astype(np.float32)
    v[rng.random(n) < 0.1] = 0                 # frozen_adam's v == 0 branch
    return g, m, v, x


def run_both(cupy, cpu_fn, gpu_fn, inputs, outputs, alias=None):
    """cpu_fn (functional, numba) on torch CPU tensors and gpu_fn (gpu_cupy) on cupy arrays, from
    the same inputs (None stays None) into fresh outputs (or into the inputs named by ``alias``);
    returns both sets of outputs as NumPy arrays."""
    import torch
    alias = alias or {}
    n = next(a for a in inputs if a is not None).size
    cpu_in = [None if a is None else torch.from_numpy(a.copy()) for a in inputs]
    gpu_in = [None if a is None else cupy.asarray(a) for a in inputs]
    cpu_out = [cpu_in[alias[k]] if k in alias else (None if k is None else torch.full((n,), float("nan")))
               for k in outputs]
    gpu_out = [gpu_in[alias[k]] if k in alias else (None if k is None else cupy.empty(n, dtype=cupy.float32))
               for k in outputs]
    cpu_fn(*cpu_in, *cpu_out)
    gpu_fn(*gpu_in, *gpu_out)
    return ([None if t is None else t.numpy() for t in cpu_out], [None if a is None else a.get() for a in gpu_out])


def assert_outputs_agree(cpu, gpu, what):
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        assert (a is None) == (b is None)
        if a is not None:
            assert same_bits(b, a), f"{what}: output {i} differs"


ADAM_SETTINGS = [dict(step=1, weight_decay=0.0, decoupled=False, bias_correction=True, maximize=False),
                 dict(step=7, weight_decay=1e-2, decoupled=True, bias_correction=True, maximize=False),
                 dict(step=1000, weight_decay=1e-4, decoupled=False, bias_correction=True, maximize=True),
                 dict(step=3, weight_decay=0.0, decoupled=False, bias_correction=False, maximize=False)]


@pytest.mark.parametrize("n", [1, 7, 4097, 100_003])
def test_gpu_optimizer_transforms_match_numba(cupy, n):
    """Adam, SGD momentum, 1-bit Adam's momentum and frozen step, axpby: gpu_cupy's kernels give
    the bits of functional's numba kernels, into fresh buffers and in place."""
    from hvd_qadam import functional as F
    g, m, v, x = transform_inputs(n, seed=n)
    for s in ADAM_SETTINGS:
        c = F.adam_constants(s["step"], 1e-3, 0.9, 0.999, 1e-8, s["weight_decay"], s["decoupled"],
                             s["bias_correction"], s["maximize"])
        xs = x if s["weight_decay"] else None
        for alias in ({}, {"m_out": 1, "v_out": 2}):
            cpu, gpu = run_both(
                cupy, lambda g_, m_, v_, x_, *out: F.adam_update(g_, m_, v_, x_, *out, c),
                lambda g_, m_, v_, x_, *out: gpu_cupy.adam_update(g_, m_, v_, x_, *out, c),
                [g, m, v, xs], ["m_out", "v_out", "d_out"], alias)
            assert_outputs_agree(cpu, gpu, f"adam {s} {alias}")
        cpu, gpu = run_both(cupy, lambda g_, m_, x_, out: F.momentum_ema(g_, m_, x_, out, c),
                            lambda g_, m_, x_, out: gpu_cupy.momentum_ema(g_, m_, x_, out, c),
                            [g, m, x if c["l2"] else None], ["out"])
        assert_outputs_agree(cpu, gpu, f"momentum_ema {s}")
        cpu, gpu = run_both(cupy, lambda m_, v_, x_, *out: F.frozen_adam_apply(m_, v_, x_, *out, c),
                            lambda m_, v_, x_, *out: gpu_cupy.frozen_adam_apply(m_, v_, x_, *out, c),
                            [m, v, xs], ["m_out", "d_out"])
        assert_outputs_agree(cpu, gpu, f"frozen_adam {s}")
    momentum_settings = [(0.1, 0.9, 0.0, False, 0.0, False, True), (0.1, 0.9, 0.1, True, 1e-4, False, False),
                         (0.05, 0.9, 0.0, False, 1e-4, True, False), (0.1, 0.0, 0.0, False, 0.0, False, True)]
    for lr, mom, damp, nesterov, wd, maximize, first in momentum_settings:
        c = F.momentum_constants(lr, mom, damp, nesterov, wd, maximize, first)
        buf = None if first or not mom else m
        cpu, gpu = run_both(cupy, lambda g_, b_, x_, *out: F.momentum_update(g_, b_, x_, *out, c),
                            lambda g_, b_, x_, *out: gpu_cupy.momentum_update(g_, b_, x_, *out, c),
                            [g, buf, x if wd else None], ["buf_out" if mom else None, "d_out"])
        assert_outputs_agree(cpu, gpu, f"momentum {c}")
    for alpha, beta in ((1.0, -1.0), (1.0, 1.0), (0.5, 3.0)):
        cpu, gpu = run_both(cupy, lambda a, b, out: F.axpby(a, b, out, alpha, beta),
                            lambda a, b, out: gpu_cupy.axpby(a, b, out, alpha, beta), [x, g], ["out"])
        assert_outputs_agree(cpu, gpu, f"axpby {alpha} {beta}")


def test_gpu_optimizer_transforms_refuse_mismatched_buffers(cupy):
    from hvd_qadam import functional as F
    c = F.adam_constants(1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, True, False)
    a, short = cupy.zeros(10, dtype=cupy.float32), cupy.zeros(9, dtype=cupy.float32)
    with pytest.raises(ValueError, match="d_out must be"):
        gpu_cupy.adam_update(a, a, a, None, a, a, short, c)
    with pytest.raises(ValueError, match="out must be"):
        gpu_cupy.axpby(a, a, cupy.zeros(10, dtype=cupy.float64), 1.0, 1.0)


def test_gpu_bf16_conversion_on_the_device(cupy):
    """A CUDA vector sent as bf16 is rounded on the device (quantize -> common.bf16_bits on a CuPy
    array), to the same bit patterns as on the host and as torch; decoding widens them back."""
    import torch

    from hvd_qadam.quant.common import bf16_bits, bf16_values
    x = np.concatenate([sample(5001, seed=3), np.float32([1.00390625, 1.01171875, -1.00390625, 1e-45, -0.0,
                                                          3.3895e38, np.nan, -np.nan])])
    got = bf16_bits(cupy.asarray(x))
    assert got.dtype == cupy.uint16 and same_bits(got.get(), bf16_bits(x))
    finite = np.isfinite(x)
    torch_bits = torch.from_numpy(x[finite]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert same_bits(got.get()[finite], torch_bits)
    assert same_bits(bf16_values(got).get(), bf16_values(bf16_bits(x)))


def test_gpu_check_script_parses_and_runs_two_ranks_first():
    """scripts/gpu_check.sh is valid bash, and its dry run (no GPU needed) puts the two-ranks-on-
    one-GPU run first, on CUDA, before the device tests and the benchmarks."""
    import os
    import subprocess
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    first = commands[0]
    assert first[first.index("mpirun"):first.index("mpirun") + 3] == ["mpirun", "-np", "2"]
    assert "tests/mpi/train_ranks.py" in first and first[first.index("--device") + 1] == "cuda"
    pytest_at = next(i for i, c in enumerate(commands) if "pytest" in c)
    assert all("mpirun" in c or c[1] == "-" for c in commands[:pytest_at])      # runs and their checks
    assert sum("mpirun" in c for c in commands[:pytest_at]) == 2
    assert subprocess.run(["bash", script, "--bogus"], capture_output=True).returncode == 2
