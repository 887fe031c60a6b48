"""A test-only stand-in for the part of CuPy that hvd_qadam uses, running on the CPU.

The tests install it as ``cupy`` (``sys.modules``, see tests/conftest.py) on a machine without a
CUDA device; it is never installed and nothing outside the tests imports it. What it is:

* ``ndarray``: "device" memory backed by NumPy. Every allocation is 256-byte aligned (as
  cudaMalloc's), starts filled with 0xFF bytes (uninitialised memory reads as NaN, never as a
  plausible zero), and sits between guard bytes that every kernel launch checks afterwards: a
  kernel that writes past an argument's end raises. Arithmetic, comparisons and the order-free
  reductions (``all``, ``any``, ``max``, ``min``) are NumPy's, which compute what CuPy's
  elementwise kernels compute; order-dependent reductions (``sum``, ``mean``, ``dot``) raise, as
  CuPy's summation order is not NumPy's. Mixing with NumPy arrays, implicit conversion to NumPy
  (``np.asarray``) and DLPack hand-offs raise, as they do in CuPy (a DLPack hand-off to torch would
  need a CUDA device).
* ``RawModule``/``RawKernel``: the CUDA source compiled for the host (see ``_host``); a launch
  checks every argument against the kernel's C signature (an array of exactly the pointer's
  element type, C-contiguous, or a NumPy scalar of exactly the parameter's type), then runs the
  kernel for every grid x block index in order. Launch dimensions outside CUDA's limits raise.
  Every launch is appended to ``launch_log`` as (kernel name, grid, block).
* ``cuda``: one device (id 0), current-device context managers, streams that are always done.

Anything else raises (AttributeError for what is not here at all).
"""
from __future__ import annotations

import ctypes
import numbers

import numpy as np

from . import _host, cuda

# the dtypes, as CuPy exports them (NumPy's own)
bool_, float16, float32, float64 = np.bool_, np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
dtype = np.dtype

_ALIGN = 256          # cudaMalloc's alignment, also the size of each guard
_GUARD_BYTE = 0xA5
_FRESH_BYTE = 0xFF    # uninitialised memory: NaN as a float, all-ones codes

launch_log: list = []


class _Memory:
    """One allocation: ``data`` (uint8) between guard bytes, 256-byte aligned."""

    def __init__(self, nbytes: int):
        raw = np.empty(nbytes + 3 * _ALIGN, np.uint8)
        self.lo = _ALIGN + (-(raw.ctypes.data + _ALIGN)) % _ALIGN
        self.hi = self.lo + nbytes
        raw[:self.lo] = _GUARD_BYTE
        raw[self.hi:] = _GUARD_BYTE
        raw[self.lo:self.hi] = _FRESH_BYTE
        self.raw = raw
        self.data = raw[self.lo:self.hi]

    def intact(self) -> bool:
        return bool((self.raw[:self.lo] == _GUARD_BYTE).all() and (self.raw[self.hi:] == _GUARD_BYTE).all())


class _Flags:
    def __init__(self, a):
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = False

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous}[name]


def _unsupported_operand(other):
    if isinstance(other, np.ndarray):
        raise TypeError(f"Unsupported type {type(other)}: CuPy arrays do not mix with NumPy arrays")
    return other


class ndarray:
    """A "device" array: a NumPy view of a guarded allocation."""

    __slots__ = ("_a", "_mem")
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, _view=None, _mem=None):
        if _view is None:
            dt = np.dtype(dtype)
            shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
            count = int(np.prod(shape, dtype=np.int64))
            _mem = _Memory(count * dt.itemsize)
            _view = _mem.data.view(dt).reshape(shape)
        self._a, self._mem = _view, _mem

    # -- what it is
    shape = property(lambda self: self._a.shape)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    device = property(lambda self: cuda.Device(0))

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"array({self._a!r}) [CuPy stand-in]"

    # -- views (same memory)
    def _view(self, a):
        return ndarray(None, _view=a, _mem=self._mem)

    def reshape(self, *shape, order="C"):
        if order != "C":
            raise NotImplementedError("the stand-in reshapes in C order only")
        if not self._a.flags.c_contiguous:
            return _new(self._a.reshape(*shape))   # NumPy would copy; CuPy copies too
        return self._view(self._a.reshape(*shape))

    def ravel(self):
        return self.reshape(-1)

    def view(self, dtype):
        return self._view(self._a.view(dtype))

    def __getitem__(self, index):
        index = _unsupported_operand(index)
        return self._view(self._a[index])

    def __setitem__(self, index, value):
        value = _unsupported_operand(value)
        self._a[index] = value._a if isinstance(value, ndarray) else value

    # -- copies
    def copy(self):
        return _new(self._a)

    def astype(self, dtype, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _new(self._a.astype(dtype))

    def get(self, stream=None, order="C", out=None):
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def fill(self, value):
        self._a.fill(value)

    def item(self):
        return self._a.item()

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    # -- what CuPy refuses
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    def __dlpack__(self, *args, **kwargs):
        raise NotImplementedError("the CuPy stand-in's memory is host memory posing as a device's; a DLPack "
                                  "hand-off (e.g. to torch) needs a real CUDA device")

    def __dlpack_device__(self):
        return self.__dlpack__()

    def __iter__(self):
        raise TypeError("iterating over a CuPy array copies element by element from the device; use .get()")

    # -- order-free reductions
    def all(self, axis=None):
        return _new(self._a.all(axis=axis))

    def any(self, axis=None):
        return _new(self._a.any(axis=axis))

    def max(self, axis=None):
        return _new(self._a.max(axis=axis))

    def min(self, axis=None):
        return _new(self._a.min(axis=axis))

    def _order_dependent(self, *args, **kwargs):
        raise NotImplementedError("an order-dependent reduction: CuPy sums in another order than NumPy, so the "
                                  "stand-in cannot give its result")

    sum = mean = dot = prod = cumsum = _order_dependent

    # -- elementwise arithmetic (CuPy's elementwise kernels compute the same IEEE operations)
    def _binary(op, reflected=False):
        def method(self, other):
            other = _unsupported_operand(other)
            b = other._a if isinstance(other, ndarray) else other
            return _new(op(b, self._a) if reflected else op(self._a, b))
        return method

    def _inplace(op):
        def method(self, other):
            other = _unsupported_operand(other)
            op(self._a, other._a if isinstance(other, ndarray) else other, out=self._a)
            return self
        return method

    __add__, __radd__, __iadd__ = _binary(np.add), _binary(np.add, True), _inplace(np.add)
    __sub__, __rsub__, __isub__ = _binary(np.subtract), _binary(np.subtract, True), _inplace(np.subtract)
    __mul__, __rmul__, __imul__ = _binary(np.multiply), _binary(np.multiply, True), _inplace(np.multiply)
    __truediv__, __rtruediv__ = _binary(np.true_divide), _binary(np.true_divide, True)
    __itruediv__ = _inplace(np.true_divide)
    __and__, __or__, __xor__ = _binary(np.bitwise_and), _binary(np.bitwise_or), _binary(np.bitwise_xor)
    __lshift__, __rshift__ = _binary(np.left_shift), _binary(np.right_shift)
    __lt__, __le__, __gt__, __ge__ = _binary(np.less), _binary(np.less_equal), _binary(np.greater), \
        _binary(np.greater_equal)
    __eq__, __ne__ = _binary(np.equal), _binary(np.not_equal)
    __hash__ = None

    def __neg__(self):
        return _new(-self._a)

    def __abs__(self):
        return _new(np.abs(self._a))

    del _binary, _inplace


def _new(a) -> ndarray:
    """A fresh allocation holding a copy of host array ``a``."""
    a = np.asarray(a)
    out = ndarray(a.shape, a.dtype)
    out._a[...] = a
    return out


def _host_input(obj):
    if isinstance(obj, ndarray):
        return obj._a
    return np.asarray(obj)


# ----------------------------------------------------------------------------- creation

def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype)


def zeros(shape, dtype=float, order="C"):
    out = ndarray(shape, dtype)
    out._a[...] = 0
    return out


def ones(shape, dtype=float, order="C"):
    out = ndarray(shape, dtype)
    out._a[...] = 1
    return out


def full(shape, fill_value, dtype=None, order="C"):
    dt = np.asarray(fill_value).dtype if dtype is None else dtype
    out = ndarray(shape, dt)
    out._a[...] = fill_value
    return out


def empty_like(a, dtype=None):
    return ndarray(a.shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def array(obj, dtype=None, copy=True):
    return _new(np.array(_host_input(obj), dtype=dtype))


def asarray(obj, dtype=None):
    if isinstance(obj, ndarray):
        return obj if dtype is None or np.dtype(dtype) == obj.dtype else obj.astype(dtype)
    return _new(np.asarray(obj, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got {type(a).__name__})")
    if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _new(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def arange(*args, dtype=None):
    return _new(np.arange(*args, dtype=dtype))


def linspace(start, stop, num=50, dtype=None):
    return _new(np.linspace(start, stop, num, dtype=dtype))


def concatenate(arrays, axis=0):
    return _new(np.concatenate([_only_device(a)._a for a in arrays], axis=axis))


def stack(arrays, axis=0):
    return _new(np.stack([_only_device(a)._a for a in arrays], axis=axis))


def _only_device(a):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}: expected a CuPy array")
    return a


def copyto(dst, src):
    _only_device(dst)._a[...] = _only_device(src)._a


def may_share_memory(a, b, max_work=None):
    return bool(np.may_share_memory(_only_device(a)._a, _only_device(b)._a))


def shares_memory(a, b, max_work=None):
    return bool(np.shares_memory(_only_device(a)._a, _only_device(b)._a))


def from_dlpack(obj):
    raise NotImplementedError("from_dlpack needs a tensor on a CUDA device; the CuPy stand-in has none")


fromDlpack = from_dlpack


def get_array_module(*arrays):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in arrays) else np


# ----------------------------------------------------------------------------- elementwise functions

def _elementwise(fn):
    def wrapper(*args, **kwargs):
        args = [_unsupported_operand(a) for a in args]
        return _new(fn(*[a._a if isinstance(a, ndarray) else a for a in args], **kwargs))
    wrapper.__name__ = fn.__name__
    return wrapper


isfinite, isnan, isinf = _elementwise(np.isfinite), _elementwise(np.isnan), _elementwise(np.isinf)
abs = absolute = _elementwise(np.abs)
clip, minimum, maximum = _elementwise(np.clip), _elementwise(np.minimum), _elementwise(np.maximum)
sqrt, where = _elementwise(np.sqrt), _elementwise(np.where)
add, subtract, multiply, divide = (_elementwise(np.add), _elementwise(np.subtract), _elementwise(np.multiply),
                                   _elementwise(np.true_divide))


def array_equal(a, b):
    return _new(np.array_equal(_only_device(a)._a, _only_device(b)._a))


# ----------------------------------------------------------------------------- kernels

_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def _dims(dims, limits, what):
    if isinstance(dims, numbers.Integral):
        dims = (dims,)
    if not isinstance(dims, tuple) or not 1 <= len(dims) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 integers, got {dims!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if any(not 1 <= d <= lim for d, lim in zip(dims, limits)):
        raise cuda.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {what} {dims} outside CUDA's limits {limits}")
    return dims


class RawKernel:
    """A kernel of a host-compiled module (see _host); ``RawKernel(code, name, options)`` compiles
    ``code`` as ``RawModule(code=code, options=options).get_function(name)`` would."""

    def __init__(self, code, name, options=(), backend="nvrtc", *, translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False, _module=None):
        module = _module or RawModule(code=code, options=options, backend=backend,
                                      translate_cucomplex=translate_cucomplex,
                                      enable_cooperative_groups=enable_cooperative_groups, jitify=jitify)
        if name not in module._signatures:
            raise cuda.CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name!r}")
        self.name = name
        self.params = module._signatures[name]
        self._entry = getattr(module._lib, f"hq_standin_launch_{name}")
        self._entry.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p)]
        self._entry.restype = None

    def _marshal(self, args):
        if not isinstance(args, tuple):
            raise TypeError(f"kernel arguments must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments {self.params}, got {len(args)}")
        holders, memories = [], []
        for i, (arg, param) in enumerate(zip(args, self.params)):
            where = f"{self.name} argument {i} ({param})"
            if param.pointer:
                if not isinstance(arg, ndarray):
                    raise TypeError(f"{where}: expected a CuPy array, got {type(arg).__name__}")
                if arg.dtype != param.dtype:
                    raise TypeError(f"{where}: array of {arg.dtype}, the kernel reads {param.dtype}")
                if not arg._a.flags.c_contiguous:
                    raise ValueError(f"{where}: a non-contiguous array (the kernel indexes flat memory)")
                holders.append(np.array([arg._a.ctypes.data], np.uintp))
                memories.append(arg._mem)
            else:
                if not isinstance(arg, np.generic):
                    raise TypeError(f"{where}: expected a NumPy {param.dtype} scalar, got {type(arg).__name__} "
                                    f"{arg!r} (its width on the device would be CuPy's guess)")
                if arg.dtype != param.dtype:
                    raise TypeError(f"{where}: a {arg.dtype} scalar for a {param.dtype} parameter")
                holders.append(np.array([arg], param.dtype))
        return holders, memories

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        if shared_mem:
            raise NotImplementedError("the stand-in runs threads one after another: no shared memory")
        if enable_cooperative_groups:
            raise NotImplementedError("the stand-in cannot run cooperative groups")
        g = _dims(grid, _MAX_GRID, "grid")
        b = _dims(block, _MAX_BLOCK, "block")
        if b[0] * b[1] * b[2] > 1024:
            raise cuda.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {b[0] * b[1] * b[2]} threads per block (max 1024)")
        holders, memories = self._marshal(args)
        dims = (ctypes.c_uint * 6)(*g, *b)
        pointers = (ctypes.c_void_p * max(1, len(holders)))(*[h.ctypes.data for h in holders])
        launch_log.append((self.name, g, b))
        self._entry(dims, pointers)
        for i, mem in enumerate(memories):
            if not mem.intact():
                raise RuntimeError(f"{self.name} wrote outside an array it was given (guard bytes changed)")


class RawModule:
    """CUDA source compiled for the host (see _host); the NVRTC options must be ones the host
    build understands, and the features that NVRTC alone has are refused."""

    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if path is not None or code is None:
            raise NotImplementedError("the stand-in compiles source code only (no cubin/ptx path)")
        if backend != "nvrtc" or translate_cucomplex or enable_cooperative_groups or name_expressions or jitify:
            raise NotImplementedError("the stand-in supports RawModule(code=..., options=...) only")
        try:
            self._lib, self._signatures = _host.build(code, tuple(options))
        except _host.CompileError as exc:
            raise cuda.CompileException(str(exc)) from None
        self.code, self.options = code, tuple(options)

    def get_function(self, name):
        return RawKernel(None, name, _module=self)


class ElementwiseKernel:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("the stand-in has no ElementwiseKernel (only RawModule/RawKernel)")


ReductionKernel = ElementwiseKernel


def is_available():
    return True
