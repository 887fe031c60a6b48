"""A single-process simulation of N data-parallel workers running the real code path.

Each simulated rank is a thread with its own model replica, its own optimizer and a
:class:`~hvd_qadam.comm.SimComm`; collectives meet at a barrier. Because the engine only moves
bytes through its comm, a simulated run performs the same arithmetic in the same order as a run
on real MPI ranks with the same seeds, and the tests compare the two bit for bit.
"""
from __future__ import annotations

import threading

import torch

from .comm import SimWorld
from .errors import CommError


def simulate(world_size: int, worker, timeout: float = 300.0, local_size: int = 1) -> list:
    """Run ``worker(rank, comm)`` for every rank concurrently; return their results in rank order.

    The first exception raised by any rank is re-raised here (the others are released from
    their collectives instead of hanging). ``local_size``: simulated hosts of that many
    consecutive ranks (what the ``hierarchical`` topology and ``topology="auto"`` see).
    """
    world = SimWorld(world_size, timeout=timeout, local_size=local_size)
    results, errors = [None] * world_size, [None] * world_size
    torch_threads = torch.get_num_threads()

    def run(rank):
        torch.set_num_threads(1)
        try:
            results[rank] = worker(rank, world.comm(rank))
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors[rank] = e
            world.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"sim-rank-{r}", daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    torch.set_num_threads(torch_threads)
    if any(t.is_alive() for t in threads):
        world.abort()
        raise TimeoutError(f"simulated ranks did not finish within {timeout} s")
    first = next((e for e in errors if e is not None and not _is_peer_abort(e)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def _is_peer_abort(e: BaseException) -> bool:
    return isinstance(e, CommError)
