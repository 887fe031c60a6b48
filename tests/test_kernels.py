"""The fast kernels compute exactly what the NumPy reference computes.

Every comparison is bitwise: scales and decoded values are compared as uint32 patterns (so even
the sign of a zero counts), packed codes byte for byte. The numba CPU kernels are checked across
the whole quantizer family, both roundings, odd lengths, bucket sizes from 1 to beyond the
vector, zero buckets, extreme magnitudes, stream offsets, fp16/bf16 input through the API and
every internal search path. The CUDA source is compiled with nvcc when it is installed (no GPU
needed): once to PTX, and once as host code whose per-thread functions then run on the CPU
against the reference. The CuPy tests run on a CUDA device when there is one, else through the
CuPy stand-in (tests/cupy_standin: NumPy arrays, the CUDA kernels compiled for the host and run
for every grid x block index), which executes gpu_cupy's own launch code on the CPU.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import hvd_qadam
from hvd_qadam.quant import codebooks as cb
from hvd_qadam.quant import common, gpu_cupy
from hvd_qadam.quant import reference as ref
from hvd_qadam.quant.codebooks import SCALE_L2, SCALE_MAXABS, SCALE_MEANABS

pytest.importorskip("numba")
from hvd_qadam.quant import cpu_numba  # noqa: E402
from conftest import random_codebook, same_bits  # noqa: E402

FIXED = ([("qsgd", b) for b in range(2, 9)] + [("qsgdinf", b) for b in range(2, 9)]
         + [("nuq", b) for b in range(2, 9)] + [("terngrad", 2), ("sign", 1)])
SCALE_KINDS = (SCALE_L2, SCALE_MAXABS, SCALE_MEANABS)
KEY = 0x0123456789ABCDEF


def check_backend(backend, x, levels, bits, bucket_size, scale_kind, stochastic, key=KEY, offset=0):
    """backend.encode/decode/decode_add against the reference, bit for bit."""
    n = x.size
    want_scales, want_packed = ref.encode(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset)
    scales, packed = backend.encode(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset)
    assert same_bits(scales, want_scales), "scales differ"
    if not same_bits(packed, want_packed):
        differ = np.flatnonzero(ref.unpack_codes(packed, bits, n) != ref.unpack_codes(want_packed, bits, n))
        pytest.fail(f"codes differ at {differ[:8]} ({differ.size} of {n})")
    want = ref.decode(want_scales, want_packed, levels, bits, bucket_size, n)
    assert same_bits(backend.decode(scales, packed, levels, bits, bucket_size, n), want), "decode differs"
    acc = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    expected = acc + want
    assert backend.decode_add(acc, scales, packed, levels, bits, bucket_size, n) is acc
    assert same_bits(acc, expected), "decode_add differs from acc + decode"
    return scales, packed


def check(x, levels, bits, bucket_size, scale_kind, stochastic, key=KEY, offset=0):
    return check_backend(cpu_numba, np.asarray(x, np.float32), np.asarray(levels, np.float32), bits, bucket_size,
                         scale_kind, stochastic, key, offset)


def sample(n, seed, zero_bucket=None):
    """Heavy-tailed values over many magnitudes, a few exact zeros, optionally a zero bucket."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-6, 6, n))).astype(np.float32)
    x[rng.random(n) < 0.05] = 0
    if zero_bucket is not None:
        x[zero_bucket] = 0
    return x


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("name,bits", FIXED, ids=[f"{q}{b}" for q, b in FIXED])
def test_fixed_quantizers(name, bits, stochastic):
    levels = cb.codebook(name, bits)
    scale_kind = cb.kind(name).scale
    for n in (1, 7, 513, 4101):
        for bucket_size in (1, 3, 512, 8192):
            x = sample(n, seed=n + bucket_size, zero_bucket=slice(0, min(n, bucket_size)) if n > 7 else None)
            check(x, levels, bits, bucket_size, scale_kind, stochastic, offset=n)


@pytest.mark.parametrize("bits", range(1, 9))
def test_adaptive_and_random_codebooks(bits):
    rng = np.random.default_rng(bits)
    codebooks = [cb.default_adaptive_codebook(bits)]
    for num_levels in sorted({2, 3, 2 ** bits // 2 + 1, 2 ** bits} & set(range(2, 2 ** bits + 1))):
        codebooks.append(random_codebook(rng, num_levels, -1.0, 1.0))
        codebooks.append(random_codebook(rng, num_levels, -0.25, 1.0))     # asymmetric
        codebooks.append(random_codebook(rng, num_levels, 0.0, 0.5))       # one-sided, inside [-1, 1]
    x = sample(3001, seed=bits, zero_bucket=slice(512, 1024))
    for i, levels in enumerate(codebooks):
        for scale_kind in SCALE_KINDS:
            check(x, levels, bits, 512 if i % 2 else 100, scale_kind, stochastic=(i + scale_kind) % 2 == 0)


def test_every_search_path_is_exercised():
    """cpu_numba finds j in one of several ways; the codebooks above and below reach all of them."""
    dense = np.concatenate([[-1.0], 0.5 + np.arange(200) * 1e-5, [1.0]]).astype(np.float32)  # crowded cell
    expect = {cpu_numba._SEARCH_COUNT2: cb.codebook("sign", 1), cpu_numba._SEARCH_COUNT8: cb.codebook("nuq", 3),
              cpu_numba._SEARCH_COUNT16: cb.codebook("nuq", 4), cpu_numba._SEARCH_UNIFORM: cb.codebook("qsgd", 4),
              cpu_numba._SEARCH_LOOKUP: cb.codebook("nuq", 6), cpu_numba._SEARCH_BISECT: dense}
    for method, levels in expect.items():
        assert cpu_numba._search_tables(levels)[1] == method
    x = sample(5000, seed=7)
    for stochastic in (True, False):
        check(x, dense, 8, 64, SCALE_L2, stochastic)
        check(x, dense, 8, 64, SCALE_MAXABS, stochastic)


@pytest.mark.parametrize("bits", range(3, 9))
def test_uniform_grid_on_and_next_to_levels(bits):
    """r exactly on a level, or one float away, is where the grid formula's t = r m + m rounds
    onto an integer: with a max-abs scale of 1, r = x, so feed every level and its float
    neighbours (and the terngrad grid, m = 1)."""
    levels = cb.codebook("qsgdinf", bits)
    neighbours = np.concatenate([levels, np.nextafter(levels, np.float32(2)), np.nextafter(levels, np.float32(-2))])
    x = np.clip(neighbours, -1, 1).astype(np.float32)
    x = np.concatenate([x, [1.0]] * 3).astype(np.float32)   # every bucket of 512 holds the 1.0
    assert common.uniform_grid_m(levels) == 2 ** (bits - 1) - 1
    assert common.uniform_grid_m(cb.codebook("terngrad", 2)) == 1
    assert common.uniform_grid_m(cb.codebook("nuq", bits)) == 0
    for stochastic in (True, False):
        check(x, levels, bits, 512, SCALE_MAXABS, stochastic)
        check(x, levels, bits, x.size, SCALE_MAXABS, stochastic)
        check(x, cb.codebook("terngrad", 2), 2, 512, SCALE_MAXABS, stochastic)


@pytest.mark.parametrize("name,bits,stochastic", [("qsgd", 4, True), ("sign", 1, False), ("nuq", 3, True),
                                                  ("qsgdinf", 7, False), ("nuq", 8, True)])
def test_long_odd_vector(name, bits, stochastic):
    x = sample(1_000_003, seed=bits, zero_bucket=slice(8192, 9000))
    check(x, cb.codebook(name, bits), bits, 512, cb.kind(name).scale, stochastic, offset=99)


@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
def test_few_and_single_long_buckets(scale_kind):
    """Scales of long buckets: NumPy sums a single-bucket vector's squares in 8192-element
    pieces and takes pairwise sums over the zero-padded bucket; with few buckets the kernel
    parallelises over elements instead of buckets."""
    x = sample(100_003, seed=scale_kind)
    levels = cb.codebook("qsgd", 5)
    for bucket_size in (30_000, 100_003, 100_004, 1 << 22):
        check(x, levels, 5, bucket_size, scale_kind, True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference overflowing, on purpose
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
def test_zero_buckets_and_extreme_magnitudes(scale_kind):
    x = np.zeros(4096, np.float32)
    x[512:1024] = 3e38                              # L2 overflows float32: scale inf, r = 0
    x[1024:1536] = np.float32(1e-45) * np.arange(512)   # subnormals; mean |x| rounds to tiny
    x[1536:2048:7] = -np.float32(1.4e-45)           # smallest subnormal, one every 7
    x[2048:2560] = np.float32(3.4e38) * np.where(np.arange(512) % 2, 1, -1)
    x[2560:3072] = sample(512, seed=1) * np.float32(1e30)
    x[3072:3584] = sample(512, seed=2) * np.float32(1e-30)
    x[3584] = -0.0                                  # a lone negative zero in a zero bucket
    for name, bits in (("qsgd", 4), ("nuq", 6), ("sign", 1), ("terngrad", 2), ("qsgd", 8)):
        for stochastic in (True, False):
            scales, packed = check(x, cb.codebook(name, bits), bits, 512, scale_kind, stochastic)
            assert scales[0] == 0 and scales[-1] == 0
            decoded = cpu_numba.decode(scales, packed, cb.codebook(name, bits), bits, 512, x.size)
            assert np.all(decoded[:512] == 0), "a zero bucket must decode to zeros"


def test_non_finite_input_gets_the_reference_codes():
    """The API refuses inf/NaN by default; with check_finite=False the codes still match."""
    x = sample(3000, seed=3)
    x[[5, 700, 1500]] = [np.inf, -np.inf, np.nan]
    for name, bits in (("qsgd", 4), ("qsgd", 8), ("nuq", 8), ("qsgdinf", 6), ("sign", 1), ("terngrad", 2)):
        levels, scale_kind = cb.codebook(name, bits), cb.kind(name).scale
        for stochastic in (True, False):
            with np.errstate(all="ignore"):
                want_scales, want_packed = ref.encode(x, levels, bits, 512, scale_kind, stochastic, KEY, 0)
            scales, packed = cpu_numba.encode(x, levels, bits, 512, scale_kind, stochastic, KEY, 0)
            assert np.array_equal(scales, want_scales, equal_nan=True)
            assert same_bits(packed, want_packed)


@pytest.mark.parametrize("bits", range(1, 9))
def test_chunks_at_bucket_boundaries_equal_the_whole(bits):
    """Encoding chunks with offset = index of their first element reproduces the whole vector."""
    levels = cb.default_adaptive_codebook(bits)
    x = sample(10_000, seed=bits)
    base = 123_456_789
    whole_scales, whole_packed = check(x, levels, bits, 96, SCALE_L2, True, offset=base)
    whole_codes = ref.unpack_codes(whole_packed, bits, x.size)
    cuts = [0, 96 * 3, 96 * 40, 96 * 41, 96 * 100, x.size]       # multiples of 96 = 12 bytes of codes at any b
    codes, scales, packed = [], [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        s, p = cpu_numba.encode(x[lo:hi], levels, bits, 96, SCALE_L2, True, KEY, base + lo)
        scales.append(s)
        packed.append(p)
        codes.append(ref.unpack_codes(p, bits, hi - lo))
    assert same_bits(np.concatenate(scales), whole_scales)
    assert same_bits(np.concatenate(codes), whole_codes)
    assert same_bits(np.concatenate(packed), whole_packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantizer,bits", [("qsgd", 4), ("sign", 1), ("nuq", 3), ("terngrad", 2), ("alq", 5)])
def test_api_backends_agree_on_low_precision_input(quantizer, bits, dtype):
    torch.manual_seed(bits)
    t = (torch.randn(3, 1001) * 10).to(dtype)
    codebook = cb.default_adaptive_codebook(bits) if cb.kind(quantizer).adaptive else None
    fast = hvd_qadam.quantize(t, quantizer, bits, bucket_size=256, seed=5, codebook=codebook, offset=7,
                              backend="numba")
    slow = hvd_qadam.quantize(t, quantizer, bits, bucket_size=256, seed=5, codebook=codebook, offset=7,
                              backend="numpy")
    assert same_bits(fast.scales, slow.scales) and same_bits(fast.codes, slow.codes)
    assert fast.to_bytes() == slow.to_bytes()
    out_fast = hvd_qadam.dequantize(fast, backend="numba")
    out_slow = hvd_qadam.dequantize(slow, backend="numpy")
    assert out_fast.dtype == dtype and torch.equal(out_fast, out_slow)


def test_numpy_fp16_input_through_api():
    x = sample(2049, seed=11).astype(np.float16)
    fast = hvd_qadam.quantize(x, "qsgdinf", 6, bucket_size=128, seed=1, backend="numba")
    slow = hvd_qadam.quantize(x, "qsgdinf", 6, bucket_size=128, seed=1, backend="numpy")
    assert fast.to_bytes() == slow.to_bytes()
    assert same_bits(hvd_qadam.dequantize(fast, backend="numba"), hvd_qadam.dequantize(slow, backend="numpy"))


def test_read_only_inputs_and_received_payloads():
    """Arrays over received bytes are read-only; the kernels must take them (and not recompile)."""
    levels = cb.codebook("qsgd", 3)
    x = np.frombuffer(sample(777, seed=4).tobytes(), np.float32)
    assert not x.flags.writeable
    scales, packed = check(x, levels, 3, 64, SCALE_L2, True)
    scales_in = np.frombuffer(scales.tobytes(), np.float32)
    packed_in = np.frombuffer(packed.tobytes(), np.uint8)
    want = ref.decode(scales, packed, levels, 3, 64, x.size)
    assert same_bits(cpu_numba.decode(scales_in, packed_in, levels, 3, 64, x.size), want)
    acc = np.ones(x.size, np.float32)
    assert same_bits(cpu_numba.decode_add(acc, scales_in, packed_in, levels, 3, 64, x.size), 1 + want)
    assert len(cpu_numba._encode_kernel.signatures) == 1 and len(cpu_numba._decode_kernel.signatures) == 1


def test_codes_past_the_codebook_are_rejected():
    levels = cb.codebook("qsgd", 4)                    # 15 levels: code 15 is invalid
    scales = np.ones(2, np.float32)
    packed = np.full(512, 0x77, np.uint8)
    packed[300] = 0xF7
    with pytest.raises(ValueError, match="out of range"):
        cpu_numba.decode(scales, packed, levels, 4, 512, 1024)
    acc = np.arange(1024, dtype=np.float32)
    with pytest.raises(ValueError, match="out of range"):
        cpu_numba.decode_add(acc, scales, packed, levels, 4, 512, 1024)
    assert same_bits(acc, np.arange(1024, dtype=np.float32)), "a rejected payload must leave acc untouched"


def test_bad_arguments_are_refused():
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="bits"):
        cpu_numba.encode(x, cb.codebook("sign", 1), 9, 4, SCALE_L2, True, KEY)
    with pytest.raises(ValueError, match="levels"):
        cpu_numba.encode(x, cb.codebook("qsgd", 4), 3, 4, SCALE_L2, True, KEY)
    with pytest.raises(ValueError, match="increasing"):
        cpu_numba.encode(x, np.array([0.5, -0.5], np.float32), 1, 4, SCALE_L2, True, KEY)
    with pytest.raises(ValueError, match="scale kind"):
        cpu_numba.encode(x, cb.codebook("sign", 1), 1, 4, 7, True, KEY)
    with pytest.raises(ValueError, match="scales"):
        cpu_numba.decode(np.ones(2, np.float32), np.zeros(2, np.uint8), cb.codebook("sign", 1), 1, 4, 10)
    scales, packed = cpu_numba.encode(np.zeros(0, np.float32), cb.codebook("sign", 1), 1, 4, SCALE_L2, True, KEY)
    assert scales.size == 0 and packed.size == 0


# A fresh process: compile_kernels(), then a workload that goes through every path of the library
# that runs a numba kernel (the API on NumPy and torch input, received payloads, every algorithm
# and topology of the engine, adaptive levels). It prints, per numba dispatcher of cpu_numba and
# functional, how many compiled signatures it had after the warm-up and after the workload. The
# dispatchers called from Python are named *_kernel (the others are compiled into them).
WARMUP_PROBE = r"""
import json

import numba
import numpy as np
import torch

import hvd_qadam
from hvd_qadam import functional
from hvd_qadam.quant import codebooks as cb
from hvd_qadam.quant import cpu_numba
from hvd_qadam.warmup import compile_kernels


def dispatchers():
    return {f"{m.__name__.rsplit('.', 1)[1]}.{name}": d for m in (cpu_numba, functional)
            for name, d in vars(m).items() if isinstance(d, numba.core.dispatcher.Dispatcher)}


def counts():
    return {name: len(d.signatures) for name, d in dispatchers().items()}


compile_kernels()
after_warmup = counts()

x = np.random.default_rng(0).standard_normal(3003).astype(np.float32)
for name, k in cb.KINDS.items():
    bits = 3 if k.adaptive else None
    codebook = cb.default_adaptive_codebook(3) if k.adaptive else None
    for data in (x, torch.from_numpy(x).reshape(3, 1001).to(torch.bfloat16), x.astype(np.float16)):
        p = hvd_qadam.quantize(data, name, bits, 256, seed=1, codebook=codebook)
        hvd_qadam.dequantize(hvd_qadam.Payload.from_bytes(p.to_bytes()))
        hvd_qadam.dequantize(p)

CASES = [
    ("adam", {}),
    ("adam", {"algorithm": "efficient_adam", "topology": "sharded", "downlink_quantizer": "qsgd"}),
    ("adamw", {"algorithm": "efficient_adam", "downlink_quantizer": "sign", "quantizer": "sign"}),
    ("adam_l2", {"algorithm": "qadam", "downlink_quantizer": "nuq", "downlink_bits": 3}),
    ("adam", {"algorithm": "qadam_weights", "topology": "sharded", "downlink_quantizer": "qsgdinf",
              "downlink_bits": 8}),
    ("sgd", {"algorithm": "ef_sgd", "quantizer": "sign", "downlink_quantizer": "sign", "momentum_steps": 2}),
    ("sgd", {"algorithm": "local_sgd", "sync_every": 1}),
    ("sgd", {"quantizer": "alq", "bits": 3, "level_schedule": (0, 2)}),
    ("adam", {"quantizer": "amq", "bits": 3, "level_schedule": (0,), "error_feedback": False}),
    ("adamw", {"algorithm": "onebit_adam", "quantizer": "sign", "downlink_quantizer": "sign", "freeze_step": "auto",
               "warmup_steps": 1}),
    ("adam_l2", {"algorithm": "onebit_adam", "freeze_step": 2}),
]


def base(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4 if kind == "adam_l2" else 0.0)


for kind, kwargs in CASES:
    def worker(rank, comm):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        opt = hvd_qadam.DistributedOptimizer(base(kind, model.parameters()), model.named_parameters(), comm=comm,
                                             bucket_size=64, min_compress_numel=100, **kwargs)
        data = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank))
        for _ in range(3):
            opt.zero_grad()
            model(data).square().mean().backward()
            opt.step()
    hvd_qadam.simulate(2, worker)

entry = sorted(name for name in dispatchers() if name.endswith("_kernel"))   # the ones called from Python
print("PROBE " + json.dumps({"after_warmup": after_warmup, "after_workload": counts(), "entry": entry}))
"""


def test_warmup_compiles_everything():
    """After hvd_qadam.warmup.compile_kernels() every kernel the library calls from Python has its
    compiled signatures, and a training workload compiles nothing more (ranks never compile)."""
    proc = subprocess.run([sys.executable, "-c", WARMUP_PROBE], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("PROBE ", 1)[1])
    after_warmup, after_workload = result["after_warmup"], result["after_workload"]
    expected_entries = {"cpu_numba._encode_kernel", "cpu_numba._decode_kernel", "cpu_numba._encode_ef_kernel",
                        "functional._adam_kernel", "functional._momentum_kernel", "functional._axpby_kernel",
                        "functional._momentum_ema_kernel", "functional._frozen_adam_kernel", "functional._sumsq_kernel"}
    assert expected_entries <= set(result["entry"]), result["entry"]
    for name in result["entry"]:
        assert after_warmup[name] > 0, f"{name} was not compiled by the warm-up"
    compiled_later = {name: (after_warmup[name], n) for name, n in after_workload.items() if n != after_warmup[name]}
    assert not compiled_later, f"the workload compiled new signatures (warm-up, workload): {compiled_later}"


THREADS_PROBE = r"""
import json, sys, torch
import numba, numba.np.ufunc.parallel as numba_parallel
if sys.argv[1] == "bare":
    numba_parallel._launch_threads()
else:
    import horovod.torch as hvd
    import hvd_qadam
    hvd.init()
    model = torch.nn.Linear(300, 300)
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters()), model.named_parameters(),
                                         min_compress_numel=0)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 300)).square().mean().backward()
        opt.step()
print("PROBE " + json.dumps({"torch": torch.get_num_threads(), "layer": numba.threading_layer(),
                             "pool": numba.config.NUMBA_NUM_THREADS}))
"""


def _threads_probe(mode):
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", THREADS_PROBE, mode], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("PROBE ", 1)[1])


def test_numba_pool_keeps_torch_on_its_threads():
    """A rank started with OMP_NUM_THREADS=1 keeps torch on one thread through construction and
    steps. numba's OpenMP layer starts its pool (here 2 threads) with omp_set_num_threads in the
    launching thread, which torch reads: the bare launch shows the hazard, the optimizer must not."""
    pytest.importorskip("horovod.torch")
    bare = _threads_probe("bare")
    if bare["layer"] != "omp":
        pytest.skip(f"numba runs on its {bare['layer']!r} threading layer, which leaves OpenMP alone")
    assert bare["torch"] == 2, f"the hazard this test guards against did not show: {bare}"
    assert _threads_probe("optimizer") == dict(bare, torch=1)


# ----------------------------------------------------------------------------- CUDA source, no GPU

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def nvcc(source: str, tmp_path, *flags):
    path = tmp_path / "kernels.cu"
    path.write_text(source)
    return subprocess.run(["nvcc", "-std=c++17", *flags, str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


def test_kernel_source_takes_shared_constants_from_python():
    """The CUDA source has one definition of each constant it shares with Python: a #define
    written from the Python value, which the body only names."""
    from hvd_qadam.quant import rng
    src = gpu_cupy.KERNEL_SOURCE
    for name, value in (("HQ_HASH_A", rng.HASH_A), ("HQ_HASH_B", rng.HASH_B), ("HQ_HASH_C1", rng.HASH_C1),
                        ("HQ_HASH_C2", rng.HASH_C2)):
        literal = f"0x{value:08X}u"
        assert f"#define {name} {literal}\n" in src and src.count(f"{value:08X}") == 1, name
    for name, value in (("HQ_HASH_SHIFT1", rng.HASH_SHIFTS[0]), ("HQ_UNIFORM_SHIFT", rng.UNIFORM_SHIFT),
                        ("HQ_PIECE", common.EINSUM_BUFFER), ("HQ_PAIRWISE_LEAF", common.PAIRWISE_LEAF),
                        ("HQ_SCALE_MEANABS", SCALE_MEANABS), ("HQ_DECODE", 3 * common.TABLE_WIDTH)):
        assert f"#define {name} {value}\n" in src, name
    assert float.fromhex(src.split("#define HQ_UNIFORM_SCALE ")[1].split("f\n")[0]) == rng.UNIFORM_SCALE


@needs_nvcc
def test_kernel_source_compiles_with_nvcc(tmp_path):
    result = nvcc(gpu_cupy.KERNEL_SOURCE, tmp_path, "--ptx", "-arch=sm_80", "-o", str(tmp_path / "k.ptx"))
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    for kernel in ("hq_scale_pieces", "hq_bucket_scales", "hq_encode", "hq_decode"):
        assert f".entry {kernel}(" in ptx
    assert "fma.rn.f32" not in ptx and "fma.rn.f64" not in ptx, "an FMA would round differently from NumPy"
    broken = nvcc(gpu_cupy.KERNEL_SOURCE + "\nextern \"C\" __global__ void broken( { }\n", tmp_path, "--ptx",
                  "-arch=sm_80", "-o", str(tmp_path / "broken.ptx"))
    assert broken.returncode != 0, "nvcc accepted a syntax error: this test could not catch one"


def load_nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (CUDA 13: nvidia/cu13/lib, CUDA 12:
    nvidia/cuda_nvrtc/lib), or None."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for path in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*")), reverse=True):
            # NVRTC opens its builtins library by name, which the wheel's directory is not on
            # the loader's path for: loaded first, that name is already resolved.
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
    return None


def nvrtc_ptx(lib, source: str, options) -> str:
    """PTX of ``source`` compiled by NVRTC with ``options``; AssertionError with its log on failure."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == 0, f"NVRTC failed ({status}): {log.value.decode(errors='replace')}"
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_cuda_source_compiles_with_nvrtc_as_cupy_does(arch):
    """CuPy compiles RawModule sources with NVRTC, given gpu_cupy's options and the device's
    architecture: every kernel must come out, with no fused multiply-add anywhere (the source
    asks for none; one would round differently from NumPy)."""
    lib = load_nvrtc()
    if lib is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc; scripts/install.sh does)")
    source = gpu_cupy.KERNEL_SOURCE
    ptx = nvrtc_ptx(lib, source, [*gpu_cupy._OPTIONS, f"--gpu-architecture={arch}"])
    kernels = re.findall(r'extern "C" __global__ void (\w+)\(', source)
    assert len(kernels) >= 4
    for kernel in kernels:
        assert f".entry {kernel}(" in ptx, kernel
    assert ".target sm_" + arch.split("_")[1] in ptx
    assert not re.search(r"\bfma\.", ptx), "an FMA would round differently from NumPy"
    # every float operation an explicitly rounded one (.rn), none approximate, subnormals kept
    assert not re.search(r"\b(?:add|sub|mul|div|sqrt|rcp)(?:\.(?:approx|full|ftz))*\.f(?:32|64)\b", ptx)
    assert ".ftz" not in ptx and ".approx" not in ptx
    control = nvrtc_ptx(lib, 'extern "C" __global__ void k(float* x) { x[0] = x[1] * x[2] + x[3]; }',
                        [f"--gpu-architecture={arch}"])
    assert re.search(r"\bfma\.rn\.f32", control), "NVRTC's default contraction was not seen: the check is blind"


HARNESS_MAIN = r"""
#include <cstdio>
#include <vector>
// Runs every kernel's per-thread function in a loop on the host, as the launches would.
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb");
    hq_i64 head[9];
    if (fread(head, sizeof(hq_i64), 9, in) != 9) return 2;
    hq_i64 n = head[0], bucket_size = head[1], num_levels = head[3], search_steps = head[5], num_pieces = head[8];
    int scale_kind = (int)head[2], bits = (int)head[4], stochastic = (int)(head[5] >> 32);
    search_steps &= 0xFFFFFFFF;
    hq_u64 key = (hq_u64)head[6], offset = (hq_u64)head[7];
    const size_t table_floats = HQ_PARAMS + HQ_TABLE_WIDTH;   // the whole block of table rows
    std::vector<float> x(n), tables(table_floats), acc(n);
    std::vector<hq_i64> piece_lo(num_pieces + 1), piece_len(num_pieces + 1);
    if (fread(x.data(), 4, n, in) != (size_t)n || fread(tables.data(), 4, table_floats, in) != table_floats ||
        fread(acc.data(), 4, n, in) != (size_t)n) return 3;
    if (num_pieces && (fread(piece_lo.data(), 8, num_pieces, in) != (size_t)num_pieces ||
                       fread(piece_len.data(), 8, num_pieces, in) != (size_t)num_pieces)) return 4;
    fclose(in);
    hq_i64 nb = (n + bucket_size - 1) / bucket_size;
    std::vector<double> pieces(nb * num_pieces + 1);
    for (hq_i64 id = 0; id < nb * num_pieces; ++id)
        pieces[id] = hq_scale_piece(x.data(), n, bucket_size, scale_kind, id / num_pieces, id % num_pieces,
                                    piece_lo[id % num_pieces], piece_len[id % num_pieces]);
    std::vector<float> scales(nb);
    for (hq_i64 k = 0; k < nb; ++k)
        scales[k] = hq_bucket_scale(x.data(), n, bucket_size, nb, scale_kind, k, num_pieces ? pieces.data() : 0,
                                    num_pieces);
    std::vector<hq_u8> packed((n * bits + 7) / 8);
    for (hq_i64 g = 0; g * 8 < n; ++g)
        hq_encode_group(g, x.data(), n, scales.data(), bucket_size, tables.data(), (int)num_levels,
                        (int)search_steps, bits, stochastic, key, offset, packed.data());
    std::vector<float> decoded(n);
    for (hq_i64 i = 0; i < n; ++i) {
        hq_decode_element(i, scales.data(), packed.data(), tables.data(), bits, bucket_size, 0, decoded.data());
        hq_decode_element(i, scales.data(), packed.data(), tables.data(), bits, bucket_size, 1, acc.data());
    }
    FILE* out = fopen(argv[2], "wb");
    fwrite(scales.data(), 4, nb, out);
    fwrite(packed.data(), 1, packed.size(), out);
    fwrite(decoded.data(), 4, n, out);
    fwrite(acc.data(), 4, n, out);
    fclose(out);
    return 0;
}
"""


class HostEmulation:
    """gpu_cupy's encode/decode/decode_add computed by the CUDA functions compiled for the host."""

    def __init__(self, executable, workdir):
        self.executable, self.workdir = executable, workdir
        self.last = None

    def _run(self, x, levels, bits, bucket_size, scale_kind, stochastic, key, offset, acc):
        n = x.size
        nb = common.num_buckets(n, bucket_size)
        tables, steps = gpu_cupy.host_tables(levels)
        plan = gpu_cupy.scale_pieces(n, bucket_size, nb, scale_kind)
        starts, lengths = plan if plan is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        head = np.array([n, bucket_size, scale_kind, levels.size, bits, steps | (int(stochastic) << 32), 0, offset,
                         starts.size], np.int64)
        head[6] = np.array([key & 0xFFFFFFFFFFFFFFFF], np.uint64).view(np.int64)[0]
        (self.workdir / "in.bin").write_bytes(b"".join(a.tobytes() for a in (head, x, tables, acc, starts, lengths)))
        subprocess.run([str(self.executable), "in.bin", "out.bin"], cwd=self.workdir, check=True, timeout=60)
        raw = (self.workdir / "out.bin").read_bytes()
        sizes = [(np.float32, nb), (np.uint8, common.packed_nbytes(n, bits)), (np.float32, n), (np.float32, n)]
        out, pos = [], 0
        for dtype, count in sizes:
            out.append(np.frombuffer(raw, dtype, count, pos))
            pos += count * np.dtype(dtype).itemsize
        return out

    def encode(self, x, levels, bits, bucket_size, scale_kind, stochastic, key, offset=0):
        self.last = self._run(x, levels, bits, bucket_size, scale_kind, stochastic, key, offset,
                              np.random.default_rng(x.size).standard_normal(x.size).astype(np.float32))
        return self.last[0], self.last[1]

    def decode(self, scales, packed, levels, bits, bucket_size, n):
        return self.last[2]

    def decode_add(self, acc, scales, packed, levels, bits, bucket_size, n):
        acc[...] = self.last[3]    # the emulation added to the same random acc that check() uses
        return acc


@needs_nvcc
def test_cuda_functions_match_the_reference_on_the_host(tmp_path):
    result = nvcc(gpu_cupy.KERNEL_SOURCE + HARNESS_MAIN, tmp_path, "-O2", "-o", str(tmp_path / "harness"))
    assert result.returncode == 0, result.stderr
    emulation = HostEmulation(tmp_path / "harness", tmp_path)
    rng = np.random.default_rng(0)
    cases = [(q, b, cb.codebook(q, b), cb.kind(q).scale) for q, b in FIXED]
    for bits in (1, 3, 5, 8):
        levels = random_codebook(rng, int(rng.integers(2, 2 ** bits + 1)), -0.3, 1.0)
        cases += [("random", bits, levels, kind) for kind in SCALE_KINDS]
    for i, (_, bits, levels, scale_kind) in enumerate(cases):
        n = (1, 7, 513, 4101)[i % 4]
        bucket_size = (1, 3, 512, 8192, 3000)[i % 5]
        x = sample(n, seed=i, zero_bucket=slice(0, min(n, bucket_size)) if n > 7 else None)
        check_backend(emulation, x, np.asarray(levels, np.float32), bits, bucket_size, scale_kind, i % 2 == 0,
                      offset=i)
    x = sample(40_000, seed=99)   # long buckets: the scale sums split into pieces
    for scale_kind in SCALE_KINDS:
        for bucket_size in (20_000, 40_000, 1 << 22):
            check_backend(emulation, x, cb.codebook("qsgd", 4), 4, bucket_size, scale_kind, True)


# ----------------------------------------------------------------------------- CuPy on a GPU

class CupyOnHost:
    """gpu_cupy with NumPy arrays in and out, for check_backend."""

    def __init__(self, cupy):
        self.cp = cupy

    def encode(self, x, *args):
        scales, packed = gpu_cupy.encode(self.cp.asarray(x), *args)
        return scales.get(), packed.get()

    def decode(self, scales, packed, *args):
        return gpu_cupy.decode(self.cp.asarray(scales), self.cp.asarray(packed), *args).get()

    def decode_add(self, acc, scales, packed, *args):
        out = gpu_cupy.decode_add(self.cp.asarray(acc), self.cp.asarray(scales), self.cp.asarray(packed), *args)
        acc[...] = out.get()
        return acc


@pytest.mark.parametrize("name,bits", FIXED, ids=[f"{q}{b}" for q, b in FIXED])
def test_gpu_matches_reference(cupy, name, bits):
    backend = CupyOnHost(cupy)
    for n, bucket_size in ((1, 1), (7, 3), (4101, 512), (20_000, 8192), (50_000, 1 << 20), (30_000, 9000)):
        for stochastic in (True, False):
            check_backend(backend, sample(n, seed=n, zero_bucket=slice(0, min(n, 512))),
                          cb.codebook(name, bits), bits, bucket_size, cb.kind(name).scale, stochastic, offset=3)
    for scale_kind in SCALE_KINDS:
        check_backend(backend, sample(3001, seed=bits), random_codebook(np.random.default_rng(bits), 2 ** bits // 2 + 1,
                                                                         -0.3, 1.0), bits, 100, scale_kind, True)


@pytest.mark.parametrize("name,bits", [("qsgd", 4), ("sign", 1), ("nuq", 3)])
def test_gpu_long_vector(cupy, name, bits):
    x = sample(1_000_003, seed=bits, zero_bucket=slice(8192, 9000))
    check_backend(CupyOnHost(cupy), x, cb.codebook(name, bits), bits, 512, cb.kind(name).scale, name != "sign",
                  offset=99)


def test_gpu_torch_tensors_through_api(cupy):
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA: DLPack hand-offs of tensors in real device memory")
    t = torch.randn(5, 4099, device="cuda", dtype=torch.bfloat16)
    gpu = hvd_qadam.quantize(t, "qsgd", 4, bucket_size=512, seed=3)
    cpu = hvd_qadam.quantize(t.cpu(), "qsgd", 4, bucket_size=512, seed=3, backend="numpy")
    assert same_bits(cupy.asnumpy(gpu.scales), cpu.scales) and same_bits(cupy.asnumpy(gpu.codes), cpu.codes)
    out = hvd_qadam.dequantize(gpu)
    assert out.is_cuda and torch.equal(out.cpu(), hvd_qadam.dequantize(cpu, backend="numpy"))
