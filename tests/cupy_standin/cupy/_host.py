"""CUDA C++ compiled for the host and launched thread by thread: the stand-in's "device".

A module's source is compiled by the host C++ compiler into a shared library after a shim that
makes the CUDA keywords plain C++ (``__global__``, ``__host__``, ``__device__`` vanish) and
declares ``blockIdx``/``threadIdx``/``blockDim``/``gridDim`` as thread-local variables; the source
sees ``HQ_HOST_LAUNCH`` defined and reads its thread index from them. For every
``extern "C" __global__`` kernel a generated C entry takes the launch dimensions and an array of
argument addresses (as ``cuLaunchKernel`` does) and calls the kernel once per thread: blocks in
order (x fastest), and inside each block its threads in order.

What this cannot emulate does not compile, or raises: shared memory, ``__syncthreads``, atomics,
warp intrinsics and the ``*_rn`` intrinsics are simply not declared, so a source that uses them
outside ``#if defined(__CUDA_ARCH__)`` fails to build (CompileException). Kernels that depend on
threads running concurrently cannot be emulated by a sequential loop; the kernels run here
must give each thread its own outputs.

Libraries are cached by the SHA-256 of everything that goes into them (source, shim, generated
entries, compiler and flags), on disk under the temporary directory and in memory, so a test
session compiles each distinct source once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

SHIM = r"""
// ---- CuPy stand-in shim: CUDA keywords as host C++ (tests/cupy_standin/cupy/_host.py)
#define __global__
#define __host__
#define __device__
#define __forceinline__ inline
#define HQ_HOST_LAUNCH 1
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;
// ---- module source
"""

# C parameter types the stand-in marshals, with the NumPy dtype an argument must have. The
# project's typedefs (hq_*) are listed by name: the kernel signatures use them.
C_TYPES = {
    "float": np.float32, "double": np.float64,
    "int": np.int32, "unsigned int": np.uint32, "hq_u32": np.uint32,
    "long long": np.int64, "hq_i64": np.int64,
    "unsigned long long": np.uint64, "hq_u64": np.uint64,
    "unsigned char": np.uint8, "hq_u8": np.uint8,
    "unsigned short": np.uint16, "hq_u16": np.uint16,
}

# Options of NVRTC the host build understands, and what they become for the host compiler.
KNOWN_OPTIONS = {"--std=c++17": ["-std=c++17"], "-std=c++17": ["-std=c++17"],
                 "--fmad=false": ["-ffp-contract=off"], "-fmad=false": ["-ffp-contract=off"]}
HOST_FLAGS = ["-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-w"]

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


class CompileError(Exception):
    pass


class Param:
    """One kernel parameter: a pointer to ``dtype`` elements, or a ``dtype`` scalar."""

    def __init__(self, decl: str):
        self.decl = " ".join(decl.split())
        self.pointer = "*" in decl
        words = [w for w in re.split(r"[\s*]+", decl) if w and w not in ("const", "__restrict__")]
        if len(words) < 2:
            raise NotImplementedError(f"kernel parameter {decl!r} has no name")
        self.name = words[-1]
        self.ctype = " ".join(words[:-1])
        if self.ctype not in C_TYPES:
            raise NotImplementedError(f"the stand-in cannot marshal a {self.ctype!r} kernel parameter ({decl!r})")
        self.dtype = np.dtype(C_TYPES[self.ctype])
        self.cast = self.decl[:self.decl.rindex(self.name)].strip()   # the type as written

    def __repr__(self):
        return self.decl


def kernel_signatures(source: str) -> dict:
    """{kernel name: [Param, ...]} for every ``extern "C" __global__`` function of ``source``."""
    kernels = {}
    for name, params in _KERNEL.findall(source):
        params = params.strip()
        kernels[name] = [Param(p) for p in params.split(",")] if params and params != "void" else []
    return kernels


def _entry(name: str, params: list) -> str:
    call = ", ".join(f"*({p.cast}*)args[{i}]" for i, p in enumerate(params))
    return f"""
extern "C" void hq_standin_launch_{name}(const unsigned int* d, void** args) {{
    gridDim = dim3{{d[0], d[1], d[2]}};
    blockDim = dim3{{d[3], d[4], d[5]}};
    for (unsigned int bz = 0; bz < d[2]; ++bz)
    for (unsigned int by = 0; by < d[1]; ++by)
    for (unsigned int bx = 0; bx < d[0]; ++bx) {{
        blockIdx = uint3{{bx, by, bz}};
        for (unsigned int tz = 0; tz < d[5]; ++tz)
        for (unsigned int ty = 0; ty < d[4]; ++ty)
        for (unsigned int tx = 0; tx < d[3]; ++tx) {{
            threadIdx = uint3{{tx, ty, tz}};
            {name}({call});
        }}
    }}
}}
"""


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cache_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "hvd_qadam_cupy_standin")
    os.makedirs(path, exist_ok=True)
    return path


_loaded: dict = {}


def build(source: str, options=()) -> tuple:
    """(ctypes library, kernel signatures) for ``source`` compiled with NVRTC ``options``."""
    flags = list(HOST_FLAGS)
    for opt in options:
        if opt not in KNOWN_OPTIONS:
            raise NotImplementedError(f"the stand-in does not know the NVRTC option {opt!r}")
        flags += KNOWN_OPTIONS[opt]
    if not any(f.startswith("-std=") for f in flags):
        flags.append("-std=c++17")
    cxx = compiler()
    if cxx is None:
        raise CompileError("no host C++ compiler (g++) for the CuPy stand-in")
    kernels = kernel_signatures(source)
    full = SHIM + source + "".join(_entry(name, params) for name, params in kernels.items())
    digest = hashlib.sha256("\0".join([full, cxx, *flags]).encode()).hexdigest()[:24]
    if digest in _loaded:
        return _loaded[digest], kernels
    lib_path = os.path.join(cache_dir(), f"module-{digest}.so")
    if not os.path.exists(lib_path):
        src_path = os.path.join(cache_dir(), f"module-{digest}.cpp")
        with open(src_path, "w") as f:
            f.write(full)
        tmp = f"{lib_path}.{os.getpid()}.tmp"
        proc = subprocess.run([cxx, *flags, "-x", "c++", src_path, "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise CompileError(f"host compile of the CUDA source failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib_path)        # atomic: concurrent sessions never load a partial library
    lib = ctypes.CDLL(lib_path)
    _loaded[digest] = lib
    return lib, kernels
