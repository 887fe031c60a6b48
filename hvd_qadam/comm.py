"""Transports for bytes: Horovod collectives, and an in-process world of N simulated ranks.

The engine only ever moves ``bytes`` (frames), so the same engine code runs on real ranks and in
the simulator. Collective calls return peers' data in rank order.
"""
from __future__ import annotations

import atexit
import os
import pickle
import sys
import threading
import time

import numpy as np
import torch

from .errors import CollectiveTimeout, CommError  # noqa: F401 - re-exported
from .quant.backend import share_cores
from .topology import Hosts, horovod_hosts

TIMEOUT_ENV = "HVD_QADAM_TIMEOUT"
EXIT_GRACE_ENV = "HVD_QADAM_TIMEOUT_EXIT_GRACE"
_ALIVE_TAG = 7412


def collective_timeout(timeout: float | None = None) -> float:
    """The deadline of every collective the library issues: ``timeout``, else the environment
    variable HVD_QADAM_TIMEOUT, else 300 s."""
    if timeout is not None:
        return float(timeout)
    return float(os.environ.get(TIMEOUT_ENV, "300"))


def gloo_controller() -> bool:
    """Whether Horovod runs its Gloo controller (``horovodrun --gloo``, elastic): then there is no
    MPI world to ask or to abort, and mpi4py would only start a singleton of its own."""
    try:
        import horovod.torch as hvd  # optional here: the simulator and the NumPy API run without it
        return hvd.is_initialized() and hvd.gloo_enabled()
    except Exception:  # noqa: BLE001 - Horovod absent or shut down: not Gloo as far as we know
        return False


def _missing_ranks(size: int, grace: float = 2.0):
    """Ranks of MPI_COMM_WORLD that do not answer within ``grace`` seconds (None if unknown):
    every live rank that timed out announces itself to every other."""
    if gloo_controller():
        return None
    try:
        from mpi4py import MPI  # optional: only launches with mpirun have it, and it starts MPI
        comm = MPI.COMM_WORLD
        if comm.Get_size() != size:
            return None
        me = comm.Get_rank()
        reqs = [comm.isend(me, dest=r, tag=_ALIVE_TAG) for r in range(size) if r != me]
        heard = {me}
        deadline = time.monotonic() + grace
        status = MPI.Status()
        while time.monotonic() < deadline and len(heard) < size:
            if comm.iprobe(source=MPI.ANY_SOURCE, tag=_ALIVE_TAG, status=status):
                heard.add(comm.recv(source=status.Get_source(), tag=_ALIVE_TAG))
            else:
                time.sleep(0.01)
        del reqs
        return sorted(set(range(size)) - heard)
    except Exception:  # noqa: BLE001 - best effort diagnosis while failing anyway
        return None


_timed_out = []


def _end_job(message: str) -> None:
    print(f"hvd_qadam: {message}; ending the job", file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        if not gloo_controller():      # under Gloo the launcher sees the exit (elastic: a failure)
            from mpi4py import MPI  # optional: only launches with mpirun have it, and it starts MPI
            MPI.COMM_WORLD.Abort(1)
    finally:
        os._exit(1)


def _at_exit() -> None:
    if _timed_out:
        _end_job(_timed_out[0])


def _abort_later(message: str) -> None:
    """After a collective timeout Horovod's background thread is stuck in the collective, so the
    process could never exit cleanly (Horovod's own exit handler would wait for it): the job
    ends at interpreter exit, or after a grace period (to log, to save a checkpoint) if the
    caller carries on, with a non-zero status."""
    grace = float(os.environ.get(EXIT_GRACE_ENV, "10"))
    if not _timed_out:
        atexit.register(_at_exit)      # registered after Horovod's: runs before it
        _timed_out.append(message)

    def run():
        time.sleep(grace)
        _end_job(message)
    threading.Thread(target=run, name="hvd_qadam-timeout-exit", daemon=True).start()


class HorovodComm:
    """Collectives over Horovod (MPI or Gloo controller), optionally on a process set.

    Under Horovod Elastic the world changes at every reset (``hvd.shutdown(); hvd.init()``):
    :meth:`refresh_world` re-reads this rank's place, and a collective that a reset or a lost peer
    interrupts raises Horovod's own ``HorovodInternalError`` (what ``hvd.elastic.run`` recovers
    from), from ``hvd.synchronize`` as soon as ``hvd.poll`` sees the failed operation."""

    def __init__(self, process_set=None, timeout: float | None = None):
        import horovod.torch as hvd  # optional: only this comm needs Horovod
        self.hvd = hvd
        self.timeout = collective_timeout(timeout)
        kw = {} if process_set is None else {"process_set": process_set}
        self._kw = kw
        self._process_set = process_set
        self.rank, self.size = self._place()
        self.hosts = self._hosts()
        share_cores(hvd.local_size())

    def _place(self) -> tuple:
        ps_ = self._process_set
        return (self.hvd.rank(), self.hvd.size()) if ps_ is None else (ps_.rank(), ps_.size())

    def _hosts(self):
        # Horovod's local/cross ranks describe the global world; a process set is taken as flat.
        return horovod_hosts(self.hvd, self.size) if self._process_set is None else Hosts(self.size, 1)

    def world_changed(self) -> bool:
        """Whether Horovod now runs another world than the one this comm last read (an elastic
        reset that removed or added ranks). Two calls into Horovod: cheap enough for every step."""
        return self._place() != (self.rank, self.size)

    def refresh_world(self) -> bool:
        """Re-read rank and size from Horovod (after an elastic reset); True if they changed."""
        place = self._place()
        changed = place != (self.rank, self.size)
        self.rank, self.size = place
        if changed:
            self.hosts = self._hosts()
            share_cores(self.hvd.local_size())
        return changed

    @staticmethod
    def _tensor(data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())

    def allgather_object(self, obj, name: str = "hvd_qadam.object") -> list:
        data = pickle.dumps(obj)
        sizes = self.wait(("raw", self.hvd.allgather_async(torch.tensor([len(data)], dtype=torch.int64),
                                                          name=name + ".n", **self._kw), name))
        gathered = self.wait(self.allgather_async(data, name))
        out, pos = [], 0
        for n in sizes.tolist():
            out.append(pickle.loads(gathered[pos:pos + n]))
            pos += n
        return out

    # Asynchronous collectives run on Horovod's background thread while backward goes on.
    def allgather_async(self, data: bytes, name: str):
        return ("allgather", self.hvd.allgather_async(self._tensor(data), name=name, **self._kw), name)

    def alltoall_async(self, per_dest: list, name: str):
        splits = torch.tensor([len(b) for b in per_dest], dtype=torch.int32)
        return ("alltoall", self.hvd.alltoall_async(self._tensor(b"".join(per_dest)), splits=splits, name=name,
                                                    **self._kw), name)

    def allreduce_async(self, tensor: torch.Tensor, name: str):
        """The sum of ``tensor`` over the ranks, through Horovod's own allreduce (fused, on its
        response cache): what ``hvd.DistributedOptimizer`` sends, at what it costs."""
        return ("raw", self.hvd.allreduce_async(tensor, op=self.hvd.Sum, name=name, **self._kw), name)

    def allreduce_inplace_async(self, tensor: torch.Tensor, name: str):
        """As :meth:`allreduce_async`, the sum written into ``tensor`` itself (Horovod's
        ``allreduce_async_``, what ``hvd.DistributedOptimizer`` does to ``p.grad``)."""
        return ("raw", self.hvd.allreduce_async_(tensor, op=self.hvd.Sum, name=name, **self._kw), name)

    def wait(self, handle):
        """The collective's result, or CollectiveTimeout after the deadline (the job then ends)."""
        kind, h, name = handle
        deadline = time.monotonic() + self.timeout
        pause = 2e-5
        while not self.hvd.poll(h):
            if time.monotonic() > deadline:
                missing = _missing_ranks(self.size) if self._kw == {} else None
                who = ("unknown" if missing is None else
                       ", ".join(map(str, missing)) if missing else "none (all answered the probe)")
                msg = (f"collective {name!r} did not complete within {self.timeout:.0f} s ({TIMEOUT_ENV}) on rank "
                       f"{self.rank}; ranks that did not answer: {who}")
                _abort_later(msg)
                raise CollectiveTimeout(msg)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        out = self.hvd.synchronize(h)
        if kind == "raw":
            return out
        if kind == "allgather":
            return memoryview(out.numpy())
        out, recv_splits = out
        buf, pos, res = memoryview(out.numpy()), 0, []
        for n in recv_splits.tolist():
            res.append(buf[pos:pos + n])
            pos += n
        return res


class ExcludedComm:
    """The comm of a rank outside the optimizer's process set: it takes part in nothing (its
    optimizer steps locally, as Horovod's does)."""
    excluded = True
    rank, size = 0, 1
    hosts = None

    def __getattr__(self, name):
        raise RuntimeError("this rank is not in the optimizer's process set; it does not communicate")


class SimWorld:
    """Shared state of N simulated ranks that run as threads of one process."""

    def __init__(self, size: int, timeout: float = 120.0, local_size: int = 1):
        self.size = size
        self.hosts = Hosts(size, local_size)     # simulated hosts of local_size consecutive ranks
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
        self.hosts = world.hosts

    def allgather_bytes(self, data: bytes, name: str) -> memoryview:
        return memoryview(b"".join(self.world._exchange(self.rank, bytes(data))))

    def alltoall_bytes(self, per_dest: list, name: str) -> list:
        everything = self.world._exchange(self.rank, [bytes(b) for b in per_dest])
        return [memoryview(everything[src][self.rank]) for src in range(self.size)]

    def allgather_object(self, obj, name: str = "hvd_qadam.object") -> list:
        return self.world._exchange(self.rank, obj)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """The sum over ranks in rank order, in the tensor's dtype (Horovod sums in the dtype it is
        given; the order is MPI's there)."""
        tensors = self.world._exchange(self.rank, tensor)
        out = tensors[0].clone()
        for t in tensors[1:]:
            out.add_(t)
        return out

    # Deferred: the exchange happens at wait(), which every rank calls in the same order, so the
    # barrier-based world stays in step however the hooks interleaved.
    def allgather_async(self, data: bytes, name: str):
        data = bytes(data)
        return lambda: self.allgather_bytes(data, name)

    def alltoall_async(self, per_dest: list, name: str):
        per_dest = [bytes(b) for b in per_dest]
        return lambda: self.alltoall_bytes(per_dest, name)

    def allreduce_async(self, tensor: torch.Tensor, name: str):
        tensor = tensor.clone()
        return lambda: self.allreduce_sum(tensor, name)

    def allreduce_inplace_async(self, tensor: torch.Tensor, name: str):
        sent = tensor.clone()      # what this rank sent, whatever happens to ``tensor`` meanwhile
        return lambda: tensor.copy_(self.allreduce_sum(sent, name))

    @staticmethod
    def wait(handle):
        return handle()
