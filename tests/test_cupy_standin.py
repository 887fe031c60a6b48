"""The CuPy stand-in (tests/cupy_standin) is honest: it runs every thread of a launch, checks each
argument against the kernel's C signature, and raises for what it cannot emulate, so a test that
passes through it has executed gpu_cupy's launch code the way a device would.

These tests are about the stand-in itself; on a machine with a CUDA device they skip.
"""
from __future__ import annotations

import numpy as np
import pytest

from hvd_qadam.quant import codebooks as cb
from hvd_qadam.quant import gpu_cupy

THREAD_IDS = r"""
extern "C" __global__ void cupy_ids(long long* out, long long n) {
    long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
    long long thread = threadIdx.x + (long long)blockDim.x * (threadIdx.y + (long long)blockDim.y * threadIdx.z);
    long long i = block * blockDim.x * blockDim.y * blockDim.z + thread;
    if (i < n) out[i] = i * 1000 + (threadIdx.x + threadIdx.y + threadIdx.z);
}
extern "C" __global__ void cupy_scale(const float* x, float a, int n, float* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i];
}
extern "C" __global__ void cupy_overrun(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;          // one past the end
}
"""


@pytest.fixture
def standin(cupy):
    if not hasattr(cupy, "launch_log"):
        pytest.skip("CuPy runs on a real CUDA device here: the stand-in is not in use")
    return cupy


def test_cupy_standin_runs_every_grid_and_block_index(standin):
    module = standin.RawModule(code=THREAD_IDS)
    kernel = module.get_function("cupy_ids")
    for grid, block, n in (((3,), (64,), 150), ((2, 3, 2), (4, 2, 3), 12 * 24), ((5,), (1,), 5)):
        out = standin.zeros(n + 7, dtype=standin.int64)
        kernel(grid, block, (out, np.int64(n)))
        got = out.get()
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        tid = np.arange(n) % (bx * by * bz)
        tsum = tid % bx + (tid // bx) % by + tid // (bx * by)
        assert np.array_equal(got[:n], np.arange(n) * 1000 + tsum)
        assert np.all(got[n:] == 0)
    assert standin.launch_log[-1] == ("cupy_ids", (5, 1, 1), (1, 1, 1))


def test_cupy_standin_checks_arguments_against_the_signature(standin):
    kernel = standin.RawModule(code=THREAD_IDS).get_function("cupy_scale")
    x = standin.asarray(np.arange(10, dtype=np.float32))
    out = standin.empty(10, dtype=standin.float32)
    kernel((1,), (32,), (x, np.float32(2), np.int32(10), out))
    assert np.array_equal(out.get(), 2 * np.arange(10, dtype=np.float32))
    bad = [((x, np.float64(2), np.int32(10), out), "float64 scalar for a float32"),
           ((x, np.float32(2), np.int64(10), out), "int64 scalar for a int32"),
           ((x, 2.0, np.int32(10), out), "expected a NumPy float32 scalar"),
           ((x.astype(np.float64), np.float32(2), np.int32(10), out), "array of float64"),
           ((x.get(), np.float32(2), np.int32(10), out), "expected a CuPy array"),
           ((x, np.float32(2), np.int32(10)), "takes 4 arguments")]
    for args, message in bad:
        with pytest.raises(TypeError, match=message):
            kernel((1,), (32,), args)
    strided = standin.empty(20, dtype=standin.float32)[::2]
    with pytest.raises(ValueError, match="non-contiguous"):
        kernel((1,), (32,), (strided, np.float32(2), np.int32(10), out))
    with pytest.raises(standin.cuda.CUDADriverError, match="threads per block"):
        kernel((1,), (64, 32), (x, np.float32(2), np.int32(10), out))
    with pytest.raises(TypeError, match="tuple"):
        kernel((1,), (32,), [x, np.float32(2), np.int32(10), out])
    with pytest.raises(NotImplementedError, match="shared memory"):
        kernel((1,), (32,), (x, np.float32(2), np.int32(10), out), shared_mem=128)


def test_cupy_standin_catches_a_kernel_writing_past_an_array(standin):
    kernel = standin.RawModule(code=THREAD_IDS).get_function("cupy_overrun")
    with pytest.raises(RuntimeError, match="guard bytes"):
        kernel((1,), (64,), (standin.empty(10, dtype=standin.float32), np.int32(10)))


def test_cupy_standin_refuses_what_it_cannot_emulate(standin):
    with pytest.raises(standin.cuda.CompileException, match="__syncthreads|atomicAdd"):
        standin.RawModule(code='extern "C" __global__ void k(float* x) { __syncthreads(); atomicAdd(x, 1.0f); }')
    with pytest.raises(NotImplementedError, match="NVRTC option"):
        standin.RawModule(code=THREAD_IDS, options=("--use_fast_math",))
    with pytest.raises(standin.cuda.CUDADriverError, match="not found"):
        standin.RawModule(code=THREAD_IDS).get_function("missing")
    x = standin.asarray(np.ones(4, np.float32))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(NotImplementedError, match="order-dependent"):
        x.sum()
    with pytest.raises(NotImplementedError, match="DLPack"):
        x.__dlpack__()
    with pytest.raises(TypeError, match="NumPy arrays"):
        x + np.ones(4, np.float32)
    with pytest.raises(standin.cuda.CUDARuntimeError):
        standin.cuda.Device(1)
    fresh = standin.empty(3, dtype=standin.float32).get()
    assert np.isnan(fresh).all(), "uninitialised memory must not read as plausible values"


def test_cupy_standin_runs_gpu_cupy_launches_as_planned(standin):
    """gpu_cupy's launch configuration, as the stand-in recorded it: one thread per group of 8
    codes, per bucket, per element, and the long-bucket pieces first."""
    x = standin.asarray(np.random.default_rng(1).standard_normal(100_003).astype(np.float32))
    levels = cb.codebook("qsgd", 4)
    del standin.launch_log[:]
    scales, packed = gpu_cupy.encode(x, levels, 4, 30_000, cb.kind("qsgd").scale, True, 7, 0)
    gpu_cupy.decode(scales, packed, levels, 4, 30_000, x.size)
    names = [(name, grid[0], block[0]) for name, grid, block in standin.launch_log]
    assert names == [("hq_bucket_scales", 1, 256), ("hq_encode", -(-12_501 // 256), 256),
                     ("hq_decode", -(-100_003 // 256), 256)]
    del standin.launch_log[:]
    gpu_cupy.encode(x, levels, 4, 50_000, cb.SCALE_MEANABS, True, 7, 0)
    pieces = gpu_cupy.pairwise_pieces(50_000, 50_000)[0].size
    assert [n for n, _, _ in standin.launch_log] == ["hq_scale_pieces", "hq_bucket_scales", "hq_encode"]
    assert standin.launch_log[0][1][0] == -(-3 * pieces // 256)
