"""cupy.cuda of the stand-in: one emulated device (id 0), a current device, and streams whose
work is already done when it was launched (the stand-in runs every kernel synchronously)."""
from __future__ import annotations

import types

DEVICE_COUNT = 1
_current = [0]


class CUDARuntimeError(RuntimeError):
    pass


class CUDADriverError(RuntimeError):
    pass


class CompileException(Exception):
    pass


def _check_id(device_id: int) -> int:
    device_id = int(device_id)
    if not 0 <= device_id < DEVICE_COUNT:
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: the stand-in emulates {DEVICE_COUNT} device, not "
                               f"device {device_id}")
    return device_id


class Device:
    def __init__(self, device=None):
        self.id = _current[0] if device is None else _check_id(device)
        self._saved = []

    def __enter__(self):
        self._saved.append(_current[0])
        _current[0] = self.id
        return self

    def __exit__(self, *exc):
        _current[0] = self._saved.pop()
        return False

    def use(self):
        _current[0] = self.id

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (CuPy stand-in)>"


def _get_device():
    return _current[0]


def _get_device_count():
    return DEVICE_COUNT


runtime = types.SimpleNamespace(getDevice=_get_device, getDeviceCount=_get_device_count,
                                CUDARuntimeError=CUDARuntimeError)
compiler = types.SimpleNamespace(CompileException=CompileException)
driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)


class Stream:
    """Kernels launched "on" a stream have finished when the launch returns."""

    null = None

    def __init__(self, non_blocking=False):
        self.non_blocking = non_blocking

    def synchronize(self):
        pass

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()
        return False


Stream.null = Stream()
_streams = [Stream.null]


def get_current_stream():
    return _streams[-1]
