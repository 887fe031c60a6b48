"""The pipeline every algorithm runs, group by group, overlapped with backward where it can:

    worker transform W -> uplink quantizer Q_w (+ worker EF) -> mean over workers
      -> server transform S -> downlink (full / Q_s + server EF / quantized weights) -> apply

The engine owns the algorithm state of one rank (worker residuals and moments, and the server
state of the shards it serves, in a double-buffered :class:`~hvd_qadam.memory.StateBank`) and
talks to its peers only through a comm object that moves bytes (:mod:`hvd_qadam.comm`), so real
ranks and the simulator run this same code. What W and S are is the algorithm's
(:mod:`hvd_qadam.algorithms`); how frames travel is the topology's (:mod:`hvd_qadam.topology`);
how values become payloads and back is the codec's (:mod:`hvd_qadam.codec`).

A step has two halves. :meth:`Engine.launch` runs the worker side of one fused group (transform,
error feedback and quantization in one pass, see ``cpu_numba.encode_ef``) and starts its uplink
collective asynchronously; the optimizer calls it from backward hooks as soon as a group's
gradients are complete, so late layers travel while early ones are still in backward.
:meth:`Engine.finish` launches what is left, then per group waits, averages the payloads, runs the
server side and the downlink, and only when every group of every rank succeeded commits the new
state (swapping spare and current buffers) and returns the results. An error anywhere (NaN/Inf on
any rank, a bad payload, a peer that disagrees about the step or the model) changes nothing.

Collective names are stable (``hvd_qadam.up.<group>``), so Horovod's response cache hits; each
frame carries the step and the layout hash, so ranks whose step counters differ get a
``ConsistencyError`` instead of a deadlock.

Shards are bucket-aligned and the random stream of a vector is indexed by global element
position, so the ``allgather`` and ``sharded`` topologies produce bit-identical results.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import algorithms, codec
from . import exchange as exchange_policies
from .algorithms import OUT_GRAD, OUT_UPDATE, OUT_WEIGHTS  # noqa: F401 - re-exported
from .adaptive import LevelAdapter
from .errors import CommError, ConsistencyError, NonFiniteGradientError  # noqa: F401 - re-exported
from .config import NONE_LINK, Config, LinkSpec
from .functional import all_finite, nonfinite_note  # noqa: F401 - all_finite re-exported
from .layout import Layout, shard_alignment
from .memory import StateBank, persistent_buffer
from .statekey import RESIDUAL, StateKey
from .quant import codebooks as cb
from .quant import rng
from .topology import TOPOLOGIES, AllreduceTransport, Hosts, make_transport
from .wire import Frame, PayloadError

SERVER_RANK = 2 ** 31 - 1     # the rank used in the server's random-stream keys
STATE_KEY = "hvd_qadam"        # the engine's state in an optimizer's state_dict
_PASSTHROUGH_LINKS = {q: LinkSpec(q, None) for q in ("fp16", "bf16")}     # Engine.wire_link


@dataclass
class StepStats:
    """Bytes this rank put on the wire (and received) in the last exchange, and timings.

    ``sent_bytes`` counts every frame byte that leaves the rank, an allgather's N - 1 copies
    included (what its network interface carries, less TCP/IP headers)."""
    step: int = -1
    sent_bytes: int = 0
    received_bytes: int = 0
    fp32_bytes: int = 0            # what Horovod's fp32 ring allreduce sends per rank for the same
                                   # tensors, 2 (N - 1)/N x 4 bytes per element (``ratio`` divides it)
    encode_s: float = 0.0          # worker side: transform + EF + quantize (in hooks or in step)
    exchange_s: float = 0.0        # waiting for collectives inside step() (what overlap did not hide)
    decode_s: float = 0.0          # server side, downlink and decoding
    levels_s: float = 0.0          # adaptive quantizers: time spent refitting levels this step
    overlapped_groups: int = 0     # groups whose exchange started during backward
    compressed: bool = True        # a compressed step of the algorithm (not a warm-up / v refresh)
    topology: str = ""             # the topology that ran the exchange (``topology="auto"``'s choice)
    topology_reason: str = ""      # why: "given", or the byte counts ``auto`` compared
    exchange: str = ""             # "compressed" or "horovod": the path of the compressible groups
    exchange_reason: str = ""      # why (``exchange="auto"``: what it measured)
    group_paths: dict = field(default_factory=dict)   # group index -> "horovod" or "<quantizer>:<bits>"
    totals: dict = field(default_factory=lambda: {"sent_bytes": 0, "received_bytes": 0, "fp32_bytes": 0, "steps": 0,
                                                  "levels_s": 0.0, "level_refits": 0})

    @property
    def ratio(self) -> float:
        """How many times fewer bytes than Horovod's fp32 ring allreduce this rank sent."""
        return self.fp32_bytes / self.sent_bytes if self.sent_bytes else float("nan")


@dataclass
class PendingStep:
    """One step in flight: what was launched, and the state it will commit on success."""
    bank: StateBank
    step: int
    compress: bool                 # the algorithm's compressed stage (False: warm-up, v refresh)
    stats: StepStats
    full_precision: bool = False   # the exchange policy sends compressible groups in full precision
    paths: dict = field(default_factory=dict)           # group index -> the transport that carries it
    launched: dict = field(default_factory=dict)        # group index -> transport handle
    # group index -> {slot index: handle}: tensors whose allreduce started from their backward
    # hook before the group was complete (AllreduceTransport.start_tensor)
    early_tensors: dict = field(default_factory=dict)
    tensorwise: dict = field(default_factory=dict)      # group index -> allreduced tensor by tensor
    # group index -> [note]: tensors found non-finite before their in-place allreduce overwrote them
    nonfinite_notes: dict = field(default_factory=dict)
    # phase name -> handle: collectives that carry every group of the step at once (e.g. the
    # sharded downlink), drained by Transport.cancel like the per-group ones
    shared: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    commit_keys: list = field(default_factory=list)
    worker_adam_step: dict = field(default_factory=dict)
    server_adam_step: dict = field(default_factory=dict)
    codebook: object = None

    def spare(self, key: StateKey, numel: int, device) -> torch.Tensor:
        """A buffer for the new value of state ``key``; it becomes current at commit."""
        if key not in self.commit_keys:
            self.commit_keys.append(key)
        return self.bank.spare(key, numel, device)


class Engine:
    """One rank's side of the pipeline for a fixed :class:`~hvd_qadam.layout.Layout`.

    ``hyper(param_group_index) -> dict`` reads lr, betas, eps, weight_decay, momentum live from
    the optimizer's param_groups (lr schedulers keep working). ``comm`` moves bytes; its
    ``rank``/``size`` are this rank's place among the workers."""

    def __init__(self, config: Config, layout: Layout, comm, hyper):
        self.layout, self.comm, self.hyper = layout, comm, hyper
        self.rank, self.size = comm.rank, comm.size
        self.alg = algorithms.make(config)
        self.cfg = config
        self.kind = self.alg.output
        self.bank = StateBank()
        self._scratch: dict[str, torch.Tensor] = {}     # str(key) -> work buffer
        self._flat_params: dict[int, torch.Tensor] = {}
        self.counters = {"step": 0, "worker_adam_step": {}, "server_adam_step": {}}
        self.stats = StepStats()
        self.skipped_steps = 0
        self.pending: PendingStep | None = None
        self.uplink_levels = None    # adaptive quantizers: hvd_qadam.adaptive.LevelAdapter
        if cb.kind(config.uplink.quantizer).adaptive:
            self.uplink_levels = LevelAdapter(config.uplink.quantizer, config.uplink.bits,
                                              config.uplink.bucket_size, schedule=tuple(config.level_schedule),
                                              every=config.level_every)
        if cb.kind(config.downlink.quantizer).adaptive:
            raise ValueError("adaptive quantizers (alq/amq) are supported on the uplink; use a fixed "
                             "quantizer for the downlink")
        self.align = shard_alignment(config.uplink.bucket_size, config.downlink.bucket_size)
        self.hosts = None
        self.bounds = self._shard_bounds()
        self.topology_reason = "given"
        self._use_topology()
        self._params_source = None

    @property
    def cfg(self) -> Config:
        """The live configuration: one object that this engine, its algorithm and the optimizer
        read. It is replaced (never edited) when a topology or the algorithm's warm-up changes at
        run time, and replacing it here replaces it for all of them."""
        return self._cfg

    @cfg.setter
    def cfg(self, config: Config) -> None:
        self._cfg = self.alg.cfg = config

    def _use_topology(self) -> None:
        """The transports of ``cfg.topology``: the topology's own, Horovod's allreduce for full
        precision wherever it can carry it under that topology, and the exchange policy that
        depends on both."""
        self.transport = make_transport(self.cfg.topology, self)
        self.allreduce = (AllreduceTransport(self) if AllreduceTransport.carries(
            TOPOLOGIES[self.cfg.topology], self.alg, self.comm) else None)
        self.exchange = self._exchange_policy()

    def _shard_bounds(self) -> dict:
        """{group index: [(start, stop)] per rank}: the elements each rank serves, as the topology
        lays them out over the hosts (one whole-group range where nothing is sharded)."""
        # Where ranks sit on hosts (the simulator and Horovod's comm say; one per host otherwise).
        hosts = getattr(self.comm, "hosts", None)
        self.hosts = hosts if hosts is not None and hosts.size == self.size else Hosts(self.size, 1)
        topology = TOPOLOGIES[self.cfg.topology]
        return {g.index: topology.served_ranges(g.numel, self.hosts, self.align) for g in self.layout.groups}

    def _exchange_policy(self) -> exchange_policies.ExchangePolicy:
        name = self.cfg.exchange
        if name == exchange_policies.COMPRESSED:
            return exchange_policies.make(name)
        why = None
        if self.cfg.uplink.passthrough:
            why = f"the uplink is already full precision (quantizer={self.cfg.uplink.quantizer!r})"
        elif self.allreduce is None:
            why = (f"Horovod's allreduce cannot carry algorithm {self.cfg.algorithm!r} under topology "
                   f"{self.cfg.topology!r}" + (" (its server state is sharded over the ranks)"
                                               if self.alg.server_state else ""))
        if why is None:
            return exchange_policies.make(name)
        if name == exchange_policies.HOROVOD:
            raise ValueError(f"exchange='horovod': {why}")
        policy = exchange_policies.make(exchange_policies.COMPRESSED)
        policy.reason = f"exchange='auto' compresses every step: {why}"
        return policy

    def set_world(self, rank: int, size: int) -> None:
        """This rank's place after an elastic reset (Horovod re-initialised on another world): the
        step in flight is forgotten and the shards recomputed. The server state keyed by the old
        shards is the caller's to re-partition (:mod:`hvd_qadam.elastic`)."""
        self.abort(drain=False)
        self.rank, self.size = rank, size
        self.bounds = self._shard_bounds()
        self.exchange.restart()
        # The two-level exchange's worker residuals cover this rank's chunk of its host's mean;
        # in another world the chunks differ, so they cannot be carried over: said, not dropped.
        host_residuals = [k for k, _ in self.bank.items() if k.is_host_residual]
        if host_residuals:
            warnings.warn(f"rank {rank}: the world changed under topology {self.cfg.topology!r}; this rank's "
                          f"error-feedback residuals of its host's chunks ({len(host_residuals)} groups) "
                          f"cannot be mapped onto the new chunks and are reset", RuntimeWarning, stacklevel=2)
            self.bank.clear(lambda k: k.is_host_residual)

    def set_topology(self, topology: str, downlink: LinkSpec) -> None:
        """Run another topology (and its downlink) from the next step on: ``topology="auto"``
        after an elastic resize. The step in flight is forgotten; the server state keyed by the
        old layout is the caller's to re-partition (:mod:`hvd_qadam.elastic`)."""
        self.abort(drain=False)
        self.cfg = dataclasses.replace(self.cfg, topology=topology, downlink=downlink)
        self.align = shard_alignment(self.cfg.uplink.bucket_size, downlink.bucket_size)
        self.bounds = self._shard_bounds()
        self._use_topology()
        self.stats.topology = topology

    def served_range(self, g) -> tuple:
        """(start, stop) of group ``g`` whose server side this rank runs."""
        bounds = self.bounds[g.index]
        return bounds[self.rank] if len(bounds) > 1 else bounds[0]

    # ------------------------------------------------------------------ small helpers
    @property
    def step_count(self) -> int:
        return self.counters["step"]

    def scratch(self, key: StateKey | str, numel: int, device, dtype=torch.float32) -> torch.Tensor:
        """A persistent work buffer (not state: its content does not outlive a step), by key or
        any name unique to its use."""
        return persistent_buffer(self._scratch, str(key), numel, device, dtype)

    def set_params_source(self, fn) -> None:
        """``fn(group) -> iterable of parameter tensors`` in slot order (the live weights)."""
        self._params_source = fn

    def flat_params(self, g) -> torch.Tensor:
        """The group's current weights as one float32 vector (a persistent buffer, filled once per step)."""
        flat = self._flat_params.get(g.index)
        if flat is None:
            flat = self.scratch(StateKey.worker(g.index, "x"), g.numel, g.device)
            torch.cat([p.detach().reshape(-1).to(torch.float32) for p in self._params_source(g)], out=flat)
            self._flat_params[g.index] = flat
        return flat

    def links(self, g, st) -> tuple[LinkSpec, LinkSpec]:
        """(uplink, downlink) of group ``g`` in step ``st``: full precision for small groups, in
        the algorithm's uncompressed steps, and where the exchange policy chose Horovod."""
        if not (g.compressed and st.compress) or st.full_precision:
            return NONE_LINK, NONE_LINK
        return self.cfg.uplink, self.cfg.downlink

    @staticmethod
    def wire_link(g, link: LinkSpec) -> LinkSpec:
        """The link group ``g``'s payloads travel by: ``link``, except that full precision
        (``"none"``) goes in the group's pass-through type (``Group.wire``, chosen by
        ``Config.passthrough_wire``: 2 bytes per element for bf16/fp16 parameters)."""
        if link.quantizer != "none" or g.wire == "none":
            return link
        return _PASSTHROUGH_LINKS[g.wire]

    def key(self, rank: int, group: int, direction: int) -> int:
        return rng.stream_key(self.cfg.seed, rank, self.step_count, group, direction)

    def can_launch_early(self) -> bool:
        """Whether the worker side may run from backward hooks this step: not when an adaptive
        level refit needs every group's statistics first, not for local SGD, not for ``ps``."""
        if not self.alg.overlap or not self.transport.overlaps:
            return False
        lv = self.uplink_levels
        return lv is None or not self.alg.compress_at(self, self.step_count) or not lv.due(self.step_count)

    # ------------------------------------------------------------------ worker side
    def begin(self) -> PendingStep:
        if self.pending is None:
            t = self.step_count
            compress = self.alg.compress_at(self, t)
            full = compress and self.exchange.full_precision_at()
            self.pending = PendingStep(self.bank, t, compress,
                                       StepStats(step=t, compressed=compress, topology=self.cfg.topology,
                                                 topology_reason=self.topology_reason,
                                                 exchange=AllreduceTransport.name if full else
                                                 exchange_policies.COMPRESSED,
                                                 exchange_reason=self.exchange.reason, totals=self.stats.totals),
                                       full_precision=full)
            self._flat_params = {}
        return self.pending

    def tensorwise(self, g, st) -> bool:
        """Whether group ``g`` travels through Horovod's allreduce tensor by tensor in step ``st``:
        where the allreduce carries it and the algorithm's uplink is the gradient itself, each
        tensor's allreduce starts when its gradient is ready (Horovod fuses what is ready), as
        ``hvd.DistributedOptimizer`` does; a group-sized allreduce would start only once the
        group's last gradient arrived. The same answer on every rank (config and step only)."""
        known = st.tensorwise.get(g.index)
        if known is None:
            known = st.tensorwise[g.index] = (
                self.allreduce is not None and self.alg.uplink_is_gradient(st)
                and AllreduceTransport.takes(self.wire_link(g, self.links(g, st)[0])))
        return known

    def launch_tensor(self, g, slot: int, grad: torch.Tensor) -> None:
        """Start the allreduce of tensor ``slot`` of group ``g`` (``grad``: the group's flat
        gradient, that tensor's part filled) from its backward hook, where :meth:`tensorwise`."""
        st = self.begin()
        if g.index in st.launched or not self.tensorwise(g, st):
            return
        t0 = time.perf_counter()
        self.allreduce.start_tensor(g, slot, grad, st)
        st.stats.encode_s += time.perf_counter() - t0

    def launch(self, g, grad: torch.Tensor, early: bool = False) -> None:
        """Worker side of group ``g`` from its flat gradient, then start its uplink exchange
        (the topology encodes: under ``hierarchical`` only after the host's reduce-scatter)."""
        st = self.begin()
        if g.index in st.launched:
            raise RuntimeError(f"group {g.index} was already exchanged in step {st.step}")
        t0 = time.perf_counter()
        vec = self.alg.worker(self, g, grad, st)
        up = self.wire_link(g, self.links(g, st)[0])
        # Horovod's allreduce for a full-precision group where it can carry it, else the topology
        if self.allreduce is not None and AllreduceTransport.takes(up):
            transport, path = self.allreduce, self.allreduce.name
        else:
            transport, path = self.transport, f"{up.quantizer}:{up.bits}"
        st.paths[g.index] = transport
        st.stats.group_paths[g.index] = path
        st.launched[g.index] = transport.start(g, vec, grad, st)
        st.stats.fp32_bytes += 8 * (self.size - 1) * g.numel // self.size
        st.stats.encode_s += time.perf_counter() - t0
        st.stats.overlapped_groups += int(early)

    def encode_uplink(self, g, vec: torch.Tensor, st, ranges, base: int = 0, residual: StateKey | None = None):
        """(payloads, nonfinite): ``vec`` holds elements [base, base + len(vec)) of group ``g``;
        one uplink payload per (start, stop) in ``ranges`` (global element positions, which key
        the rounding streams), with worker error feedback on residual ``residual`` (default the
        group's, ``g<i>.e``; it covers ``vec``). ``nonfinite``: NaN/Inf met (payloads unusable)."""
        up = self.wire_link(g, self.links(g, st)[0])
        key = self.key(self.rank, g.index, rng.UPLINK)
        if st.codebook is None and self.uplink_levels is not None:
            st.codebook = self.uplink_levels.codebook       # no refit due at this step
        codebook = st.codebook if not up.passthrough else None
        if self.cfg.error_feedback and not up.passthrough:
            name = residual or StateKey.worker(g.index, RESIDUAL)
            n = vec.numel()
            resid = self.bank.get_or_zeros(name, n, vec.device)
            resid_new = st.spare(name, n, vec.device)
            payloads, bad = [], False
            for a, b in ranges:
                q, nonfinite = codec.encode_ef(vec[a - base:b - base], resid[a - base:b - base],
                                               resid_new[a - base:b - base], up, key, a, codebook)
                payloads.append(q)
                bad |= nonfinite
            return payloads, bad
        if not all_finite(vec) or (up.quantizer in ("fp16", "bf16") and not codec.fits_passthrough(vec, up.quantizer)):
            return [], True
        return [codec.encode(vec[a - base:b - base], up, key, a, codebook) for a, b in ranges], False

    def uplink_error(self, g, grad, notes: list | None = None) -> str:
        """The message every rank raises when this rank's uplink of group ``g`` is not finite.
        ``notes``: the non-finite tensors, described before ``grad`` was overwritten (an in-place
        allreduce), instead of reading them from ``grad``."""
        if notes is None:
            notes = [n for s in g.slots if (n := nonfinite_note(s.name, grad[s.offset:s.offset + s.numel]))]
        if not notes:
            return (f"rank {self.rank}, step {self.step_count}: the update of group {g.index} overflowed "
                    f"(non-finite after the worker transform and error feedback, or beyond the range of "
                    f"its 2-byte wire type)")
        return f"rank {self.rank}, step {self.step_count}: non-finite gradient in {', '.join(notes)}"

    def refit_levels(self, grads_for) -> None:
        """Adaptive quantizers: refit the levels from every group's uplink vector (after the worker
        transform and error feedback), before any group is encoded (so this step does not overlap)."""
        st = self.begin()
        lv = self.uplink_levels
        if lv is None or not st.compress or st.full_precision or st.codebook is not None:
            return
        tl = time.perf_counter()
        due = lv.due(st.step)
        if due:
            vectors = []
            for g in self.layout.groups:
                if not g.compressed:
                    continue
                v = self.alg.worker(self, g, grads_for(g), st)      # pure: launch recomputes it
                if self.cfg.error_feedback:
                    v = v + self.bank.get_or_zeros(StateKey.worker(g.index, RESIDUAL), g.numel, v.device)
                vectors.append(v.detach().cpu().numpy())
            local = lv.local_stats(vectors)
            gathered = self.comm.allgather_object(local, name="hvd_qadam.levels")
            total = gathered[0].copy()
            for s in gathered[1:]:
                total += s                    # rank order: identical on every rank
            lv.update(total, step=st.step)
            # Every rank fitted the same statistics; adopt rank 0's result anyway, since libm's
            # exp/erf may differ in the last bit between CPU models and codebooks must agree.
            states = self.comm.allgather_object(lv.state_dict(), name="hvd_qadam.levels_fit")
            lv.load_state_dict(states[0])
            st.stats.levels_s = time.perf_counter() - tl
            st.stats.totals["levels_s"] += st.stats.levels_s
            st.stats.totals["level_refits"] += 1
        st.codebook = lv.codebook

    # ------------------------------------------------------------------ server side, commit
    def check_frame(self, src: int, frame, what: str) -> None:
        t = self.step_count
        if frame.step != t or frame.layout != self.layout.hash:
            raise ConsistencyError(
                f"{what} from rank {src} is for step {frame.step} / layout {frame.layout:#010x}, rank {self.rank} "
                f"is at step {t} / layout {self.layout.hash:#010x}: ranks disagree about their step count or "
                f"the model (e.g. only some ranks restored a checkpoint)")

    def serve(self, g, a: int, b: int, payloads: list, st: PendingStep):
        """Server side of elements [a, b) of group ``g``: mean, server transform, downlink.
        Returns the downlink as a payload, or as a tensor where it is full precision and
        every rank computes it itself (``allgather`` with no downlink quantizer)."""
        mean = codec.mean_into(payloads, self.scratch(StateKey.server(g.index, a, "mean"), b - a, g.device, g.dtype))
        u = self.server_transform(g, a, b, mean, st)
        _, down = self.links(g, st)
        if down.passthrough:
            if down.quantizer == "none" and self.transport.local_downlink:
                return u
            return codec.encode(u, self.wire_link(g, down), 0, a)
        key = self.key(SERVER_RANK, g.index, rng.DOWNLINK)
        if self.cfg.server_error_feedback and self.alg.server_ef:
            name = StateKey.server(g.index, a, RESIDUAL)
            q, _ = codec.encode_ef(u, self.bank.get_or_zeros(name, b - a, u.device),
                                   st.spare(name, b - a, u.device), down, key, a)
            return q
        return codec.encode(u, down, key, a)

    def server_transform(self, g, a: int, b: int, mean: torch.Tensor, st: PendingStep) -> torch.Tensor:
        """The algorithm's server side of elements [a, b) of group ``g`` on their mean."""
        return self.alg.server(self, g, a, b, mean, st)

    def finish(self, grads_for) -> dict | None:
        """Complete the step: launch every group not launched yet (``grads_for(g)`` gives its flat
        gradient), wait, serve, and commit. Returns {group index: flat result} (see ``self.kind``),
        or None when the step was skipped (``nonfinite="skip"``); raises on errors, with no
        state changed."""
        st = self.begin()
        try:
            if self.uplink_levels is not None and st.compress and not st.full_precision and st.codebook is None:
                self.refit_levels(grads_for)
            for g in self.layout.groups:
                if g.index not in st.launched:
                    self.launch(g, grads_for(g))
            results = {}
            for transport in (self.allreduce, self.transport):     # the same order on every rank
                groups = [g for g in self.layout.groups if st.paths[g.index] is transport]
                if groups:
                    results.update(transport.complete(st, groups))
        except CommError as e:
            self.abort(drain=False)      # the collectives in flight will not complete
            raise type(e)(f"step {st.step}: {e}") from None
        except BaseException:
            self.abort()
            raise
        if st.errors:
            self.abort()
            return self._fail(st.errors)
        out = {g.index: self.alg.finish(self, g, results[g.index], st) for g in self.layout.groups}
        self.commit(st)
        return out

    def abort(self, drain: bool = True) -> None:
        """Forget the step in flight (its spare buffers are simply reused next time), after
        waiting for its collectives that are still in flight (``drain``)."""
        if self.pending is not None and drain:
            self.transport.cancel(self.pending)
        self.pending = None

    def commit(self, st: PendingStep) -> None:
        """Make step ``st`` the current state: called once every group of every rank succeeded."""
        self.bank.commit(st.commit_keys)
        self.counters["worker_adam_step"].update(st.worker_adam_step)
        self.counters["server_adam_step"].update(st.server_adam_step)
        self.counters["step"] += 1
        stats = st.stats
        for k in ("sent_bytes", "received_bytes", "fp32_bytes"):
            stats.totals[k] += getattr(stats, k)
        stats.totals["steps"] += 1
        self.stats = stats
        self.pending = None
        if st.compress:
            self.exchange.observe(self.comm, st.full_precision)

    def _fail(self, errors: list):
        msg = "; ".join(errors)
        if self.cfg.nonfinite == "skip":
            self.skipped_steps += 1
            return None
        raise NonFiniteGradientError(f"{msg}. No state was changed (residuals, moments, weights).")

    def hyper_groups(self) -> list:
        n = 1 + max((g.param_group for g in self.layout.groups), default=0)
        return [self.hyper(i) for i in range(n)]

    # ------------------------------------------------------------------ frames
    def frame(self, payloads, error) -> bytes:
        return Frame(self.rank, self.step_count, self.layout.hash, payloads, error).to_bytes()

    def parse(self, views, what: str, skip: int | None = None) -> list:
        frames = []
        for src, v in enumerate(views):
            if src == skip:
                frames.append(None)
                continue
            try:
                frames.append(Frame.from_bytes(v, source=f"{what} frame from rank {src}"))
            except PayloadError as e:
                raise PayloadError(f"rank {self.rank}: {e}") from None
        return frames

    # ------------------------------------------------------------------ state
    def start(self, params: dict) -> None:
        """Called before the first step with the initial parameters (identical on all ranks)."""
        self.alg.start(self, params)

    def reset_state(self, step: int) -> None:
        """Start the algorithm state afresh at ``step`` (residuals, moments, server state; the
        local SGD anchors are kept: they are the current weights, identical on every rank)."""
        self.abort()
        self.bank.clear(lambda k: not k.is_anchor)
        self.counters = {"step": int(step), "worker_adam_step": {}, "server_adam_step": {}}
        self.exchange.restart()
        self.alg.restore(self)           # what the algorithm decided from the state is undone with it

    def state_dict(self) -> dict:
        return {"config": self.cfg.as_dict(), "layout_hash": self.layout.hash, "world_size": self.size,
                "rank": self.rank, "state": self.bank.state_dict(),
                "counters": {"step": self.counters["step"],
                             "worker_adam_step": dict(self.counters["worker_adam_step"]),
                             "server_adam_step": dict(self.counters["server_adam_step"])},
                "skipped_steps": self.skipped_steps,
                "levels": None if self.uplink_levels is None else self.uplink_levels.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout_hash") != self.layout.hash:
            raise ConsistencyError("checkpoint was saved for a different model layout (parameter names, shapes "
                                   "or fusion settings differ)")
        self.abort()
        self.counters = {"step": state["counters"]["step"],
                         "worker_adam_step": dict(state["counters"]["worker_adam_step"]),
                         "server_adam_step": dict(state["counters"]["server_adam_step"])}
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bank.load_state_dict(state["state"])
        same_world = state.get("world_size") == self.size and state["config"]["topology"] == self.cfg.topology
        if not same_world:
            warnings.warn(f"error-feedback residuals and server state were saved for world size "
                          f"{state.get('world_size')} / topology {state['config']['topology']!r}; this run has "
                          f"{self.size} / {self.cfg.topology!r}: they are sharded differently here and are reset",
                          RuntimeWarning, stacklevel=2)
            self.bank.clear(lambda k: k.is_server_state or k.is_residual)
            self.counters["server_adam_step"] = {}
        elif state.get("rank") != self.rank:
            warnings.warn(f"this checkpoint holds rank {state.get('rank')}'s error-feedback residuals and is "
                          f"loaded on rank {self.rank}; residuals are per rank, so they are reset here (save "
                          f"one file per rank to resume the exact trajectory)", RuntimeWarning, stacklevel=2)
            self.bank.clear(lambda k: k.is_residual)
        if self.uplink_levels is not None and state.get("levels") is not None:
            self.uplink_levels.load_state_dict(state["levels"])

