"""The fused step kernels: bit for bit against their NumPy statements, against torch.optim, and
a steady-state step that allocates nothing of the model's size."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

import hvd_qadam
from hvd_qadam import functional as F
from hvd_qadam.comm import SimWorld
from hvd_qadam.quant import codebooks as cb
from hvd_qadam.quant import reference

numba_kernels = pytest.importorskip("hvd_qadam.quant.cpu_numba")


@pytest.mark.parametrize("quantizer,bits", [("qsgdinf", 4), ("qsgd", 8), ("sign", 1), ("nuq", 3), ("terngrad", 2),
                                            ("qsgdinf", 2)])
@pytest.mark.parametrize("n,bucket", [(10_000, 512), (70_001, 128), (3, 512), (200_000, 100_000)])
def test_encode_ef_equals_three_separate_steps(quantizer, bits, n, bucket):
    rs = np.random.default_rng(n + bits)
    v = rs.standard_normal(n).astype(np.float32)
    e = (rs.standard_normal(n) * 0.1).astype(np.float32)
    k = cb.kind(quantizer)
    lv = cb.codebook(quantizer, bits)
    out = np.empty(n, np.float32)
    for stochastic in (False, True):
        scales, packed, bad = numba_kernels.encode_ef(v, e, out, lv, bits, bucket, k.scale, stochastic, 99, 5)
        p = v + e
        ref_scales, ref_packed = reference.encode(p, lv, bits, bucket, k.scale, stochastic, 99, 5)
        assert not bad
        assert np.array_equal(scales, ref_scales) and np.array_equal(packed, ref_packed)
        assert np.array_equal(out, p - reference.decode(ref_scales, ref_packed, lv, bits, bucket, n))


def test_encode_ef_reports_nonfinite_and_refuses_aliasing():
    v = np.ones(4096, np.float32)
    v[100] = np.inf
    e = np.zeros_like(v)
    out = np.empty_like(v)
    lv = cb.codebook("qsgdinf", 4)
    assert numba_kernels.encode_ef(v, e, out, lv, 4, 512, cb.SCALE_MAXABS, False, 1)[2]
    with pytest.raises(ValueError, match="overlap"):
        numba_kernels.encode_ef(v, e, e, lv, 4, 512, cb.SCALE_MAXABS, False, 1)


def test_uniform_grid_on_grid_data_is_exact():
    """Data already on the grid (a decoded payload re-quantized) must round to itself."""
    rs = np.random.default_rng(3)
    lv = cb.codebook("qsgdinf", 4)
    x = rs.standard_normal(50_000).astype(np.float32)
    s, p = reference.encode(x, lv, 4, 512, cb.SCALE_MAXABS, False, 0)
    d = reference.decode(s, p, lv, 4, 512, x.size)
    s2, p2 = numba_kernels.encode(d, lv, 4, 512, cb.SCALE_MAXABS, False, 0)
    r2 = reference.encode(d, lv, 4, 512, cb.SCALE_MAXABS, False, 0)
    assert np.array_equal(s2, r2[0]) and np.array_equal(p2, r2[1])


def test_decode_into_and_mean_divisor():
    rs = np.random.default_rng(1)
    lv = cb.codebook("qsgdinf", 4)
    xs = [rs.standard_normal(9000).astype(np.float32) for _ in range(3)]
    enc = [reference.encode(x, lv, 4, 512, cb.SCALE_MAXABS, False, 0) for x in xs]
    dec = [reference.decode(s, p, lv, 4, 512, 9000) for s, p in enc]
    acc = np.empty(9000, np.float32)
    numba_kernels.decode_into(acc, *enc[0], lv, 4, 512, 9000)
    numba_kernels.decode_add(acc, *enc[1], lv, 4, 512, 9000)
    numba_kernels.decode_add(acc, *enc[2], lv, 4, 512, 9000, divisor=3)
    assert np.array_equal(acc, ((dec[0] + dec[1]) + dec[2]) / np.float32(3))


@pytest.mark.parametrize("decoupled,wd,maximize,bc", [(False, 0.0, False, True), (False, 0.1, False, True),
                                                      (True, 0.1, False, True), (False, 0.0, True, False)])
def test_adam_kernel_equals_its_numpy_statement(decoupled, wd, maximize, bc):
    rs = np.random.default_rng(0)
    n = 100_003
    g, m, x = (rs.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rs.standard_normal(n)).astype(np.float32)
    c = F.adam_constants(7, 1e-3, 0.9, 0.999, 1e-8, wd, decoupled, bc, maximize)
    t = [torch.from_numpy(a) for a in (g, m, v, x)]
    outs = [torch.empty(n) for _ in range(3)]
    F.adam_update(*t, *outs, c)
    for got, want in zip(outs, F.adam_reference(g, m, v, x, c)):
        assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("momentum,dampening,nesterov,wd,maximize,first", [
    (0.9, 0.0, False, 0.0, False, True), (0.9, 0.1, False, 1e-4, False, False), (0.9, 0.0, True, 1e-4, False, False),
    (0.5, 0.0, False, 0.0, True, False), (0.0, 0.0, False, 1e-4, False, False)])
def test_momentum_kernel_equals_its_numpy_statement(momentum, dampening, nesterov, wd, maximize, first):
    """ef_sgd's worker transform (the numba kernel on the CPU) against F.momentum_reference, bit for bit."""
    rs = np.random.default_rng(1)
    n = 100_003
    g, buf, x = (rs.standard_normal(n).astype(np.float32) for _ in range(3))
    c = F.momentum_constants(0.05, momentum, dampening, nesterov, wd, maximize, first)
    buf_out = torch.empty(n) if momentum else None
    d_out = torch.empty(n)
    F.momentum_update(torch.from_numpy(g), None if first else torch.from_numpy(buf), torch.from_numpy(x), buf_out,
                      d_out, c)
    want_buf, want_d = F.momentum_reference(g, None if first else buf, x, c)
    assert np.array_equal(d_out.numpy(), want_d)
    if momentum:
        assert np.array_equal(buf_out.numpy(), want_buf)
    else:
        assert want_buf is None


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.1}),
                                    (torch.optim.AdamW, {"weight_decay": 0.1}), (torch.optim.Adam, {"maximize": True})])
def test_qadam_uncompressed_matches_torch_adam_on_the_mean_gradient(cls, kw):
    """Oracle: qadam with no quantization on 2 ranks = torch's Adam stepped on the averaged gradient."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    grads = [[torch.randn(64, 32) for _ in range(2)] for _ in range(5)]

    def worker(rank, comm):
        p = torch.nn.Parameter(w0.clone())
        opt = hvd_qadam.DistributedOptimizer(cls([p], lr=1e-2, **kw), [("w", p)], comm=comm, algorithm="qadam",
                                             quantizer="none", min_compress_numel=1)
        for step in range(5):
            p.grad = grads[step][rank].clone()
            opt.step()
        return p.detach().clone()
    got = hvd_qadam.simulate(2, worker)
    q = torch.nn.Parameter(w0.clone())
    ref = cls([q], lr=1e-2, foreach=False, **kw)
    for step in range(5):
        q.grad = (grads[step][0] + grads[step][1]) / 2
        ref.step()
    for r in got:
        torch.testing.assert_close(r, q.detach(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}, {"maximize": True}])
def test_ef_sgd_uncompressed_matches_torch_sgd_on_the_mean_gradient(kw):
    torch.manual_seed(1)
    w0 = torch.randn(50, 40)
    grads = [[torch.randn(50, 40) for _ in range(2)] for _ in range(5)]

    def worker(rank, comm):
        p = torch.nn.Parameter(w0.clone())
        opt = hvd_qadam.DistributedOptimizer(torch.optim.SGD([p], lr=0.05, **kw), [("w", p)], comm=comm,
                                             algorithm="ef_sgd", quantizer="none", min_compress_numel=1)
        for step in range(5):
            p.grad = grads[step][rank].clone()
            opt.step()
        return p.detach().clone()
    got = hvd_qadam.simulate(2, worker)
    q = torch.nn.Parameter(w0.clone())
    ref = torch.optim.SGD([q], lr=0.05, foreach=False, **kw)
    for step in range(5):
        q.grad = (grads[step][0] + grads[step][1]) / 2
        ref.step()
    for r in got:
        torch.testing.assert_close(r, q.detach(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("opt_kw,alg,match", [
    ({"amsgrad": True}, "efficient_adam", "amsgrad"), ({}, "qadam", None)])
def test_unsupported_optimizer_options_are_refused_at_construction(opt_kw, alg, match):
    p = torch.nn.Parameter(torch.zeros(10))
    comm = SimWorld(1).comm(0)
    if match is None:
        with pytest.raises(ValueError, match="betas"):
            hvd_qadam.DistributedOptimizer(torch.optim.SGD([p], lr=0.1), [("p", p)], comm=comm, algorithm=alg)
        return
    with pytest.raises(ValueError, match=match):
        hvd_qadam.DistributedOptimizer(torch.optim.Adam([p], **opt_kw), [("p", p)], comm=comm, algorithm=alg)


@pytest.mark.parametrize("kw", [{}, {"algorithm": "efficient_adam", "downlink_quantizer": "qsgdinf"},
                                {"algorithm": "qadam", "downlink_quantizer": "sign", "quantizer": "sign"}])
def test_steady_state_step_allocates_nothing_of_the_model_size(kw):
    """After warm-up, backward + step allocates no NumPy buffer near a group's fp32 size (torch
    buffers are the autograd's own gradients only: ours are persistent)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    x = torch.randn(8, 512)
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model.named_parameters(),
                                         comm=SimWorld(1).comm(0), **kw)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for _ in range(3):
        step()
    full = 4 * 512 * 512 * 2
    tracemalloc.start()
    try:
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the payload, its frame and the gathered copy are ~0.2 of fp32 each at the default 6 bits
    # (~0.6 in all); one buffer of the model's fp32 size would add 1
    assert peak < 0.75 * full, f"peak {peak} bytes of new allocations in a steady-state step (fp32 size {full})"


@pytest.mark.parametrize("quantizer,bits", [("qsgdinf", 4), ("qsgd", 2), ("qsgdinf", 8), ("terngrad", 2),
                                            ("sign", 1), ("qsgdinf", 3), ("qsgdinf", 6), ("qsgd", 6)])
@pytest.mark.parametrize("bucket", [8, 128, 136, 520])
def test_byte_aligned_uniform_path_equals_reference(quantizer, bits, bucket):
    """The byte-aligned path (whole buckets of a uniform grid at 4, 6 or 8 bits, or of sign's two
    levels at 1 bit) against
    the reference, bit for bit, for every kernel: encode, encode_ef, decode, decode_add with and
    without the divisor, and decode_mean. 136 and 520 do not divide the parallel task size, so
    decode tasks start and end inside buckets (the partial ends take the block path); 3 bits
    (and the 2-bit grids) never take the fast path and are controls."""
    n = 3 * 32768 + 1000 + 3          # several parallel tasks, a partial last bucket
    rs = np.random.default_rng(bits * 1000 + bucket)
    xs = [(rs.standard_normal(n) * np.exp(rs.uniform(-3, 3, n))).astype(np.float32) for _ in range(3)]
    xs[0][:bucket] = 0                # a zero bucket
    k = cb.kind(quantizer)
    lv = cb.codebook(quantizer, bits)
    for stochastic in (False, True):
        enc = [reference.encode(x, lv, bits, bucket, k.scale, stochastic, 7, 3) for x in xs]
        dec = [reference.decode(s, p, lv, bits, bucket, n) for s, p in enc]
        for x, (s, p) in zip(xs, enc):
            s2, p2 = numba_kernels.encode(x, lv, bits, bucket, k.scale, stochastic, 7, 3)
            assert np.array_equal(s2, s) and np.array_equal(p2, p)
        e = (rs.standard_normal(n) * 0.1).astype(np.float32)
        out = np.empty(n, np.float32)
        s3, p3, bad = numba_kernels.encode_ef(xs[1], e, out, lv, bits, bucket, k.scale, stochastic, 7, 3)
        pe = xs[1] + e
        rs3, rp3 = reference.encode(pe, lv, bits, bucket, k.scale, stochastic, 7, 3)
        assert not bad and np.array_equal(s3, rs3) and np.array_equal(p3, rp3)
        assert np.array_equal(out.view(np.uint32), (pe - reference.decode(rs3, rp3, lv, bits, bucket, n)).view(np.uint32))
        got = numba_kernels.decode(*enc[0], lv, bits, bucket, n)
        assert np.array_equal(got.view(np.uint32), dec[0].view(np.uint32))
        acc = np.empty(n, np.float32)
        numba_kernels.decode_into(acc, *enc[0], lv, bits, bucket, n)
        numba_kernels.decode_add(acc, *enc[1], lv, bits, bucket, n)
        numba_kernels.decode_add(acc, *enc[2], lv, bits, bucket, n, divisor=3)
        want = ((dec[0] + dec[1]) + dec[2]) / np.float32(3)
        assert np.array_equal(acc.view(np.uint32), want.view(np.uint32))
        mean = np.empty(n, np.float32)
        numba_kernels.decode_mean(mean, [s for s, _ in enc], [p for _, p in enc], lv, bits, bucket, n)
        assert np.array_equal(mean.view(np.uint32), want.view(np.uint32))


def test_byte_aligned_uniform_path_rejects_codes_past_the_codebook():
    """4-bit qsgdinf has 15 levels: code 15 in a whole bucket (the fast path) is refused by
    decode, decode_add (before touching acc) and decode_mean."""
    lv = cb.codebook("qsgdinf", 4)
    n = 70_000
    s, p = reference.encode(np.random.default_rng(0).standard_normal(n).astype(np.float32), lv, 4, 128,
                            cb.SCALE_MAXABS, False, 0)
    p = p.copy()
    p[20_000] |= 0xF0                  # element 40_001: code 15
    with pytest.raises(ValueError, match="code 15 is out of range"):
        numba_kernels.decode(s, p, lv, 4, 128, n)
    acc = np.ones(n, np.float32)
    with pytest.raises(ValueError, match="code 15 is out of range"):
        numba_kernels.decode_add(acc, s, p, lv, 4, 128, n)
    assert np.all(acc == 1)
    with pytest.raises(ValueError, match="code 15 is out of range"):
        numba_kernels.decode_mean(np.empty(n, np.float32), [s, s], [p, p], lv, 4, 128, n)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_all_ones_code_check_agrees_with_unpacking(bits):
    """The wire parser's word-at-a-time check for a uniform grid's invalid code (all ones)
    against unpacking every code, for a code in every position of the words and of the tail."""
    from hvd_qadam.quant.reference import pack_codes
    rs = np.random.default_rng(bits)
    for n in (1, 7, 8 * 8 // bits + 3, 1000):
        codes = rs.integers(0, 2 ** bits - 1, n).astype(np.uint8)        # all valid
        assert not numba_kernels.any_all_ones_code(pack_codes(codes, bits), bits)
        for pos in range(n):
            bad = codes.copy()
            bad[pos] = 2 ** bits - 1
            assert numba_kernels.any_all_ones_code(pack_codes(bad, bits), bits), (n, pos)
    with pytest.raises(ValueError, match="bits must be"):
        numba_kernels.any_all_ones_code(np.zeros(4, np.uint8), 3)
    for size in (3, 4, 5):   # 6 bits: the whole fields of a 1- or 2-byte tail, not its padding
        tail = np.zeros(size, np.uint8)
        tail[3:] = (0xC0,) if size == 4 else (0, 0xF0) if size == 5 else ()   # padding bits set: ignored
        assert not numba_kernels.any_all_ones_code(tail, 6)
