"""Which path a step's compressible groups take: hvd_qadam's compressed exchange, or full
precision through Horovod's own allreduce (:class:`hvd_qadam.topology.AllreduceTransport`).

Compression pays only where the network is what a step waits for; on a fast link, or with few
ranks on one machine, encoding and decoding cost more than the bytes they save. The policy is
the ``exchange`` option:

  ``"compressed"``  every compressible group, every compressed step, through the topology.
  ``"horovod"``     every exchange in full precision through Horovod's allreduce (the algorithm's
                    math unchanged, e.g. ``qadam`` is then Adam on the exact mean gradient).
  ``"auto"``        measured while training, the same decision on every rank:

    settle   the first ``SETTLE`` steps are compressed and not measured (the first compressed
             steps load or compile the codec's kernels; the first collectives negotiate).
    probe    ``ROUNDS`` rounds alternate one step through Horovod and one compressed; a step's
             cost is its wall time, commit to commit (forward, backward with the exchanges it
             overlapped, the waits, decode, the apply): what the user pays, whatever hides
             behind what. Each rank's medians are allgathered and the slowest rank's count.
    decide   compressed when its median step is at least ``HYSTERESIS`` faster than Horovod's
             (and, once decided, a switch needs the other path ``HYSTERESIS`` faster than the
             current one): on a tie, Horovod (exact, and what the user compares against).
    watch    every ``CHECK_EVERY`` steps the slowest rank's median step on the chosen path is
             compared with the one it was chosen at; a change by more than ``CHANGE`` (a link
             shaped down or freed, other jobs on the network) starts a new probe, and so does
             every ``REVISIT``-th step.

Switching is safe for error feedback: a step through Horovod leaves every residual as it was
(worker and server), and the next compressed step carries it, so no mass is dropped; both paths
give every rank the same result, so replicas stay identical. The decision and its reason are in
``communication_stats.exchange`` / ``.exchange_reason``.
"""
from __future__ import annotations

import os
import statistics
import time

COMPRESSED, HOROVOD, AUTO = "compressed", "horovod", "auto"
DEFAULT = AUTO
ENV = "HVD_QADAM_EXCHANGE"          # the default for every optimizer of the job (e.g. set by a launcher)


def default() -> str:
    """``exchange=None``: HVD_QADAM_EXCHANGE if set, else :data:`DEFAULT`."""
    return os.environ.get(ENV) or DEFAULT


class ExchangePolicy:
    """``full_precision_at()``: whether the next compressed step sends its compressible groups in
    full precision through Horovod; ``observe`` sees each committed one."""
    name = ""
    reason = ""

    def full_precision_at(self) -> bool:
        """For the next compressed step."""
        raise NotImplementedError

    def observe(self, comm, full_precision: bool) -> None:
        """A compressed step committed (every rank calls this at the same steps; uncompressed
        steps, such as a warm-up, are not the policy's and are not counted)."""

    def restart(self) -> None:
        """The world or the state changed (elastic reset, checkpoint): measure again."""


class Compressed(ExchangePolicy):
    name = COMPRESSED
    reason = "exchange='compressed'"

    def full_precision_at(self):
        return False


class Horovod(ExchangePolicy):
    name = HOROVOD
    reason = "exchange='horovod'"

    def full_precision_at(self):
        return True


class Auto(ExchangePolicy):
    """Measured choice between the two paths (module docstring)."""
    name = AUTO
    SETTLE = 3              # first steps: compressed (warming the codec up), not measured
    ROUNDS = 3              # probe: this many (Horovod, compressed) pairs of steps
    HYSTERESIS = 0.05       # a path must be this much faster to be taken (to be switched to)
    CHECK_EVERY = 10        # steps between checks of the chosen path's step time
    CHANGE = 0.25           # relative change of that time that starts a new probe
    REVISIT = 500           # steps between probes when nothing changed

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.step = 0                          # compressed steps committed since the restart
        self.choice = True                     # full precision (Horovod) until measured
        self.probe_at = self.SETTLE            # first step of the next probe
        self.reference = None                  # slowest rank's median step on the choice
        self.samples = {True: [], False: []}
        self.recent = []
        self._last = None                      # monotonic time of the last commit
        self.decisions = []                    # (step, full precision?, {path: seconds})
        self.reason = (f"measuring: {self.SETTLE} compressed steps to warm up, then {self.ROUNDS} on each path")

    def _probing(self, step: int) -> bool:
        return 0 <= step - self.probe_at < 2 * self.ROUNDS

    def full_precision_at(self):
        if self.step < self.SETTLE:
            return False
        if self._probing(self.step):
            return (self.step - self.probe_at) % 2 == 0
        return self.choice

    def observe(self, comm, full_precision):
        step = self.step
        self.step += 1
        now = time.monotonic()
        seconds, self._last = (None if self._last is None else now - self._last), now
        if step < self.probe_at or seconds is None:
            return
        if self._probing(step):
            self.samples[full_precision].append(seconds)
            if step - self.probe_at == 2 * self.ROUNDS - 1:
                self._decide(comm, step)
            return
        self.recent.append(seconds)
        if len(self.recent) < self.CHECK_EVERY:
            return
        median = _slowest(comm, statistics.median(self.recent))
        self.recent = []
        if step + 1 - self.probe_at >= self.REVISIT:
            self._next_probe(step, f"revisit every {self.REVISIT} steps")
        elif abs(median - self.reference) > self.CHANGE * self.reference:
            self._next_probe(step, f"the step time on the chosen path moved from {self.reference:.3g} s "
                                   f"to {median:.3g} s")

    def _next_probe(self, step: int, why: str) -> None:
        self.probe_at = step + 1
        self.samples = {True: [], False: []}
        self.reason = f"probing again ({why}); {self.reason}"

    def _decide(self, comm, step: int) -> None:
        mine = [statistics.median(self.samples[True]), statistics.median(self.samples[False])]
        gathered = comm.allgather_object(mine, name="hvd_qadam.exchange")
        horovod, compressed = (max(r[i] for r in gathered) for i in (0, 1))
        h = self.HYSTERESIS
        if self.choice:            # on Horovod: compression must be clearly faster
            choice = not compressed < (1 - h) * horovod
        else:                      # compressing: Horovod must be clearly faster to switch back
            choice = horovod < (1 - h) * compressed
        self.choice = choice
        self.reference = horovod if choice else compressed
        self.samples = {True: [], False: []}
        self.recent = []
        self.decisions.append((step, choice, {HOROVOD: horovod, COMPRESSED: compressed}))
        path = "Horovod's allreduce (full precision)" if choice else "compressed"
        self.reason = (f"{path}: median step {horovod:.3g} s through Horovod, "
                       f"{compressed:.3g} s compressed (slowest rank, {self.ROUNDS} steps each)")


def _slowest(comm, seconds: float) -> float:
    return max(comm.allgather_object(seconds, name="hvd_qadam.exchange"))


POLICIES = {cls.name: cls for cls in (Compressed, Horovod, Auto)}


def make(name: str) -> ExchangePolicy:
    return POLICIES[name]()
