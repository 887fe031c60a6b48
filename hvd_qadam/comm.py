"""Transports for bytes: Horovod collectives, and an in-process world of N simulated ranks.

The engine only ever moves ``bytes`` (frames), so the same engine code runs on real ranks and in
the simulator. Collective calls return peers' data in rank order.
"""
from __future__ import annotations

import threading

import numpy as np
import torch


class CommError(RuntimeError):
    """A collective could not complete (a peer failed or left)."""


class HorovodComm:
    """Collectives over Horovod (MPI controller), optionally on a process set."""

    def __init__(self, process_set=None):
        import horovod.torch as hvd
        self.hvd = hvd
        kw = {} if process_set is None else {"process_set": process_set}
        self._kw = kw
        self.rank = hvd.rank() if process_set is None else process_set.rank()
        self.size = hvd.size() if process_set is None else process_set.size()
        from .quant.backend import share_cores
        share_cores(hvd.local_size())

    @staticmethod
    def _tensor(data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())

    def allgather_bytes(self, data: bytes, name: str) -> memoryview:
        out = self.hvd.allgather(self._tensor(data), name=name, **self._kw)
        return memoryview(out.numpy())

    def alltoall_bytes(self, per_dest: list, name: str) -> list:
        splits = torch.tensor([len(b) for b in per_dest], dtype=torch.int32)
        out, recv_splits = self.hvd.alltoall(self._tensor(b"".join(per_dest)), splits=splits, name=name, **self._kw)
        buf, pos, res = memoryview(out.numpy()), 0, []
        for n in recv_splits.tolist():
            res.append(buf[pos:pos + n])
            pos += n
        return res

    def allgather_object(self, obj, name: str = "hvd_qadam.object") -> list:
        return self.hvd.allgather_object(obj, name=name)

    # Asynchronous collectives run on Horovod's background thread while backward goes on.
    def allgather_async(self, data: bytes, name: str):
        return ("allgather", self.hvd.allgather_async(self._tensor(data), name=name, **self._kw))

    def alltoall_async(self, per_dest: list, name: str):
        splits = torch.tensor([len(b) for b in per_dest], dtype=torch.int32)
        return ("alltoall", self.hvd.alltoall_async(self._tensor(b"".join(per_dest)), splits=splits, name=name,
                                                    **self._kw))

    def wait(self, handle):
        kind, h = handle
        out = self.hvd.synchronize(h)
        if kind == "allgather":
            return memoryview(out.numpy())
        out, recv_splits = out
        buf, pos, res = memoryview(out.numpy()), 0, []
        for n in recv_splits.tolist():
            res.append(buf[pos:pos + n])
            pos += n
        return res


class SimWorld:
    """Shared state of N simulated ranks that run as threads of one process."""

    def __init__(self, size: int, timeout: float = 120.0):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots = [None] * size

    def _exchange(self, rank: int, value):
        self._slots[rank] = value
        try:
            self._barrier.wait()
            out = list(self._slots)
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise CommError("a simulated peer failed during a collective") from None
        return out

    def abort(self) -> None:
        self._barrier.abort()

    def comm(self, rank: int) -> "SimComm":
        return SimComm(self, rank)


class SimComm:
    """The in-process counterpart of :class:`HorovodComm` (same methods, same semantics)."""

    def __init__(self, world: SimWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def allgather_bytes(self, data: bytes, name: str) -> memoryview:
        return memoryview(b"".join(self.world._exchange(self.rank, bytes(data))))

    def alltoall_bytes(self, per_dest: list, name: str) -> list:
        everything = self.world._exchange(self.rank, [bytes(b) for b in per_dest])
        return [memoryview(everything[src][self.rank]) for src in range(self.size)]

    def allgather_object(self, obj, name: str = "hvd_qadam.object") -> list:
        return self.world._exchange(self.rank, obj)

    # Deferred: the exchange happens at wait(), which every rank calls in the same order, so the
    # barrier-based world stays in step however the hooks interleaved.
    def allgather_async(self, data: bytes, name: str):
        data = bytes(data)
        return lambda: self.allgather_bytes(data, name)

    def alltoall_async(self, per_dest: list, name: str):
        per_dest = [bytes(b) for b in per_dest]
        return lambda: self.alltoall_bytes(per_dest, name)

    @staticmethod
    def wait(handle):
        return handle()
