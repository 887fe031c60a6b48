"""Topologies: how one group's frames travel, where its server side runs, and which to choose.

  allgather     every rank gathers every rank's frame (one asynchronous Horovod allgather per
                group) and runs the server side of the whole group itself (same seeds: same
                result). Per-rank bytes grow as (N - 1) payloads.
  sharded       chunk c of every group goes to rank c (alltoall); rank c averages its chunk, runs
                the server side on it and quantizes the result with server error feedback; the
                downlink chunks of every group are allgathered together (one collective).
                Per-rank bytes ~ (N - 1)/N (uplink + downlink): flat in N, as a ring
                allreduce's 2 (N - 1)/N of the model.
  hierarchical  two levels for hosts with several ranks (L per host, H hosts, N = H L): the ranks
                of a host reduce-scatter in full precision over the host's fast links (chunk l of
                the host's mean to local rank l); local rank l of every host then runs the
                sharded exchange above on chunk l, with its peers of the same local rank on the
                other hosts; the downlink frames come back to the column (alltoall) and then to
                the host's other ranks. The host exchange is per group; the three exchanges
                after it carry every group at once. Each rank carries 1/L of its host's
                inter-host traffic: (H - 1)/H (uplink + downlink) / L of the model, L times less
                than ``sharded``.
  ps            one frame of every group goes point to point to a dedicated server rank, which
                answers with the downlink frame (:mod:`hvd_qadam.ps`); no overlap.

Every collective is a Horovod allgather or alltoall on stable names (Horovod's response cache
hits); the two-level exchange needs no process sets: its host and column exchanges are alltoalls
in which every other rank gets zero bytes. Each collective is a meeting point of all ranks
(Horovod negotiates it, then it runs), so only the first exchange of a group starts from its
backward hook, alone; the exchanges after backward carry every group of the step at once.

A topology has three calls: ``start`` (a group's uplink vector is ready: encode, send),
``complete`` (wait for everything, serve, return each group's result) and ``cancel`` (drain what
is in flight after an error). Results are written into persistent per-group buffers. Its policy
(which element ranges a rank serves, whether a downlink travels, how many bytes a rank moves) is
on its class; :func:`choose` picks one for ``topology="auto"`` from those byte counts.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from . import codec
from .errors import CommError, ConsistencyError, TopologyError  # noqa: F401 - TopologyError re-exported
from .functional import all_finite, nonfinite_note
from .layout import shard_bounds
from .statekey import RESIDUAL, StateKey
from .wire import Frame, PayloadError, split_frames

LOCAL_SIZE_ENV = "HVD_QADAM_LOCAL_SIZE"


@dataclass(frozen=True)
class Hosts:
    """How the ``size`` ranks sit on hosts: ``local_size`` consecutive ranks per host (rank
    r = host * local_size + local rank, the order Open MPI and horovodrun give by default)."""
    size: int
    local_size: int = 1

    def __post_init__(self):
        if self.local_size < 1 or self.size % self.local_size:
            raise TopologyError(f"{self.size} ranks cannot sit {self.local_size} per host")

    @property
    def count(self) -> int:
        return self.size // self.local_size

    def host(self, rank: int) -> int:
        return rank // self.local_size

    def local(self, rank: int) -> int:
        return rank % self.local_size

    def rank(self, host: int, local: int) -> int:
        return host * self.local_size + local

    def same_host(self, rank: int) -> list:
        h = self.host(rank)
        return [self.rank(h, l) for l in range(self.local_size)]

    def column(self, rank: int) -> list:
        """The ranks with ``rank``'s local rank, one per host, in host order."""
        loc = self.local(rank)
        return [self.rank(h, loc) for h in range(self.count)]


def horovod_hosts(hvd, size: int) -> Hosts:
    """The host layout Horovod sees (``HVD_QADAM_LOCAL_SIZE`` overrides it: e.g. containers
    that hide their host, or a test that runs several "hosts" on one machine). Ranks must be
    numbered host by host with the same count on every host; otherwise one rank per host is
    assumed (the flat topologies)."""
    forced = os.environ.get(LOCAL_SIZE_ENV)
    if forced:
        loc = int(forced)
        if loc < 1 or size % loc:
            raise TopologyError(f"{LOCAL_SIZE_ENV}={forced} does not divide the {size} ranks")
        return Hosts(size, loc)
    try:
        loc = hvd.local_size()
        contiguous = hvd.rank() == hvd.cross_rank() * loc + hvd.local_rank()
        # every host holds loc ranks (Horovod's own test, where this Horovod exposes it)
        homogeneous = hvd.cross_size() * loc == size
        basics = getattr(getattr(hvd, "mpi_ops", None), "_basics", None)
        if basics is not None and hasattr(basics, "is_homogeneous"):
            homogeneous = homogeneous and bool(basics.is_homogeneous())
    except Exception:  # noqa: BLE001 - an older Horovod or a process set: treat as flat
        return Hosts(size, 1)
    if loc <= 1 or not homogeneous or not contiguous or size % loc:
        return Hosts(size, 1)
    return Hosts(size, loc)


# ------------------------------------------------------------------------------ byte model
def payload_bytes_per_element(link) -> float:
    """Wire bytes per element of a link's payloads (codes plus one fp32 scale per bucket)."""
    if link.passthrough:
        return {"none": 4.0, "fp16": 2.0, "bf16": 2.0}.get(link.quantizer, 4.0)
    return link.bits / 8.0 + 4.0 / link.bucket_size


class TopologyContext(Protocol):
    """Everything a topology may use of the step engine (:class:`hvd_qadam.engine.Engine` is the
    one implementation; ``tests/test_topology_context.py`` checks that the topologies use nothing
    else). The codec, the state bank, the algorithm and the step counter stay behind it: a
    topology moves frames and says which elements a rank serves; encoding, serving and the frame
    checks are the engine's."""
    comm: object             # hvd_qadam.comm: the collectives (allgather/alltoall/allreduce, waits)
    rank: int
    size: int
    hosts: Hosts             # where the ranks sit
    align: int               # shard boundaries are multiples of this (both links' bucket sizes)
    bounds: dict             # {group index: [(start, stop)] served by each rank}

    def scratch(self, key, numel: int, device, dtype=torch.float32) -> torch.Tensor:
        """A persistent work buffer, by key."""

    def links(self, g, st) -> tuple:
        """(uplink, downlink) LinkSpec of group ``g`` in step ``st``."""

    def wire_link(self, g, link):
        """The link ``g``'s payloads actually travel by (pass-through type for full precision)."""

    def tensorwise(self, g, st) -> bool:
        """Whether ``g`` goes through Horovod's allreduce tensor by tensor this step."""

    def encode_uplink(self, g, vec, st, ranges, base: int = 0, residual=None) -> tuple:
        """(payloads per range, any non-finite?), with worker error feedback."""

    def uplink_error(self, g, grad, notes: list | None = None) -> str:
        """The message for a non-finite uplink of ``g`` (``notes``: its non-finite tensors, where
        ``grad`` no longer holds them)."""

    def frame(self, payloads, error) -> bytes:
        """This rank's frame for this step."""

    def parse(self, views, what: str, skip=None) -> list:
        """Frames from received bytes (PayloadError / ConsistencyError on malformed ones)."""

    def check_frame(self, src: int, frame, what: str) -> None:
        """Raise ConsistencyError where ``frame`` is for another step or model."""

    def serve(self, g, a: int, b: int, payloads: list, st):
        """Server side of elements [a, b) of ``g`` from the uplink payloads: the downlink."""

    def server_transform(self, g, a: int, b: int, mean, st):
        """The algorithm's server side of elements [a, b) of ``g`` on an exact mean."""

    def hyper_groups(self) -> list:
        """The optimizer's hyper-parameters per param group (for the ps server)."""


class Transport:
    name = ""
    overlaps = True          # groups may be started during backward
    dedicated_server = False  # a server rank outside the workers holds the server state (needs MPI)
    two_level = False        # the exchange inside hosts, then between them (``hierarchical=True``)
    local_downlink = False   # a full-precision downlink needs no message (every rank has it)
    downlink_travels = True  # whether the server's result crosses the network (so a downlink
                             # quantizer saves bytes; under allgather every rank computes it)
    shards_server = True     # each rank runs the server side of part of a group only
    full_precision_allreduce = True   # full-precision exchanges may go through Horovod's allreduce

    def __init__(self, ctx: TopologyContext):
        self.ctx = ctx

    # --------------------------------------------------------------- policy
    @classmethod
    def served_ranges(cls, numel: int, hosts: Hosts, align: int) -> list:
        """[(start, stop)] of group elements each rank serves (runs the server side of)."""
        return [(0, numel)]

    @classmethod
    def bytes_per_rank(cls, numel: int, up: float, down: float, hosts: Hosts) -> dict:
        """Bytes one rank sends per step (``total``) and how many of them leave its host
        (``inter_host``: the bytes that leave its host, divided by the ranks on the host: its
        share of the host's link), for ``numel`` elements at ``up``/``down`` bytes per element; a ring
        collective's count (what Open MPI's and NCCL's large-message algorithms move)."""
        raise NotImplementedError

    # --------------------------------------------------------------- protocol
    def start(self, g, vec, grad, st):
        raise NotImplementedError

    def complete(self, st, groups: list) -> dict:
        """Wait for ``groups`` (those this topology started this step), serve them, and return
        {group index: flat result}."""
        raise NotImplementedError

    def cancel(self, st) -> None:
        for h in [*st.launched.values(), *({f"handle.{i}": x for i, x in e.items()} for e in st.early_tensors.values()),
                  st.shared]:
            if h is None:
                continue
            for k, v in list(h.items()):
                if k.startswith("handle") and v is not None:
                    try:
                        self.ctx.comm.wait(v)
                    except Exception:  # noqa: BLE001 - draining after an error that is being raised
                        pass
                    h[k] = None

    # --------------------------------------------------------------- helpers
    def _uplink(self, g, vec, grad, st, ranges, base: int = 0, residual: str | None = None):
        """(payloads, error): the uplink payloads of ``vec`` (elements [base, base + len) of the
        group) for ``ranges``, with worker error feedback; error is a message on NaN/Inf."""
        payloads, bad = self.ctx.encode_uplink(g, vec, st, ranges, base, residual)
        return ([], self.ctx.uplink_error(g, grad)) if bad else (payloads, None)

    def _wait(self, h: dict, key: str, st):
        """The result of the collective ``h[key]`` (then forgotten), its wait timed as exchange."""
        t0 = time.perf_counter()
        result = self.ctx.comm.wait(h[key])
        h[key] = None
        st.stats.exchange_s += time.perf_counter() - t0
        return result

    def _out(self, g) -> torch.Tensor:
        return self.ctx.scratch(StateKey.worker(g.index, "out"), g.numel, g.device, g.dtype)

    def _errors(self, frames, st) -> bool:
        errs = [f.error for f in frames if f is not None and f.error is not None]
        for e in errs:
            if e not in st.errors:
                st.errors.append(e)
        return bool(errs)

    def _several(self, frame, count: int, what: str, src: int) -> list:
        """The payloads of ``frame``, which must hold exactly ``count`` (one per group it carries)."""
        if len(frame.payloads) != count:
            raise PayloadError(f"rank {self.ctx.rank}: {what} frame from rank {src} holds {len(frame.payloads)} "
                               f"payloads, expected {count}")
        return frame.payloads

    def _single(self, frame, what: str, src: int):
        return self._several(frame, 1, what, src)[0]

    def _check(self, frames, what: str, sources=None) -> None:
        for i, f in enumerate(frames):
            if f is not None:
                self.ctx.check_frame(i if sources is None else sources[i], f, what)


class AllgatherTransport(Transport):
    name = "allgather"
    local_downlink = True
    downlink_travels = False
    shards_server = False

    @classmethod
    def bytes_per_rank(cls, numel, up, down, hosts):
        # A ring allgather forwards every other rank's frame once; the ring crosses between
        # hosts H times, so a host's link carries N - 1 frames (1/L of that per rank).
        total = (hosts.size - 1) * numel * up
        return {"total": total, "inter_host": total / hosts.local_size if hosts.count > 1 else 0.0}

    def start(self, g, vec, grad, st):
        ctx = self.ctx
        payloads, error = self._uplink(g, vec, grad, st, ctx.bounds[g.index])
        data = ctx.frame(payloads, error)
        # whatever the allgather's algorithm, N - 1 frames of this size leave every rank (its own
        # to each peer, or a ring's N - 1 forwarded ones)
        st.stats.sent_bytes += (ctx.size - 1) * len(data)
        return {"handle": ctx.comm.allgather_async(data, f"hvd_qadam.up.{g.index}"), "data": data,
                "payloads": payloads, "error": error}

    def complete(self, st, groups) -> dict:
        ctx, results = self.ctx, {}
        for g in groups:
            h = st.launched[g.index]
            gathered = self._wait(h, "handle", st)
            t1 = time.perf_counter()
            data = h["data"]
            st.stats.received_bytes += len(gathered) - len(data)
            views = split_frames(gathered)
            if len(views) != ctx.size:
                raise ConsistencyError(f"expected {ctx.size} frames in the allgather, got {len(views)}")
            # Peers' frames are parsed and validated; our own we already hold as objects.
            frames = ctx.parse(views, "uplink", skip=ctx.rank)
            self._check(frames, "uplink frame")
            if self._errors(frames, st) or h["error"] is not None:
                if h["error"] is not None and h["error"] not in st.errors:
                    st.errors.append(h["error"])
                continue
            if st.errors:
                continue
            payloads = [h["payloads"][0] if f is None else self._single(f, "uplink", c) for c, f in enumerate(frames)]
            down = ctx.serve(g, 0, g.numel, payloads, st)
            if isinstance(down, torch.Tensor):
                results[g.index] = down
            else:
                out = self._out(g)
                codec.decode_into(down, out)
                results[g.index] = out
            st.stats.decode_s += time.perf_counter() - t1
        return results


class ShardedTransport(Transport):
    name = "sharded"

    @classmethod
    def served_ranges(cls, numel, hosts, align):
        return shard_bounds(numel, hosts.size, align)

    @classmethod
    def bytes_per_rank(cls, numel, up, down, hosts):
        n = hosts.size
        total = (n - 1) / n * numel * (up + down)
        # of the N - 1 peers, N - L are on other hosts
        return {"total": total, "inter_host": (n - hosts.local_size) / n * numel * (up + down)}

    def start(self, g, vec, grad, st):
        ctx = self.ctx
        payloads, error = self._uplink(g, vec, grad, st, ctx.bounds[g.index])
        per_dest = [ctx.frame([payloads[c]] if error is None else [], error) for c in range(ctx.size)]
        st.stats.sent_bytes += sum(len(b) for i, b in enumerate(per_dest) if i != ctx.rank)
        return {"handle": ctx.comm.alltoall_async(per_dest, f"hvd_qadam.up.{g.index}"), "error": error}

    def complete(self, st, groups) -> dict:
        ctx = self.ctx
        downs = []
        for g in groups:
            h = st.launched[g.index]
            received = self._wait(h, "handle", st)
            t1 = time.perf_counter()
            st.stats.received_bytes += sum(len(b) for i, b in enumerate(received) if i != ctx.rank)
            frames = ctx.parse(received, "uplink")
            self._check(frames, "uplink frame")
            if self._errors(frames, st) or st.errors:
                continue
            a, b = ctx.bounds[g.index][ctx.rank]
            downs.append(ctx.serve(g, a, b, [self._single(f, "uplink", c) for c, f in enumerate(frames)], st))
            st.stats.decode_s += time.perf_counter() - t1
        if st.errors:        # every rank read the same error frames: none sends a downlink
            return {}
        # One allgather carries every group's downlink chunk (module docstring: why).
        data = ctx.frame(downs, None)
        st.stats.sent_bytes += (ctx.size - 1) * len(data)      # N - 1 frames leave every rank
        st.shared["handle_down"] = ctx.comm.allgather_async(data, "hvd_qadam.down")
        gathered = self._wait(st.shared, "handle_down", st)
        t1 = time.perf_counter()
        st.stats.received_bytes += len(gathered) - len(data)
        frames = ctx.parse(split_frames(gathered), "downlink")
        if len(frames) != ctx.size:
            raise ConsistencyError(f"expected {ctx.size} frames in the downlink allgather, got {len(frames)}")
        self._check(frames, "downlink frame")
        results = {g.index: self._out(g) for g in groups}
        for c, f in enumerate(frames):
            for g, p in zip(groups, self._several(f, len(groups), "downlink", c)):
                a, b = ctx.bounds[g.index][c]
                codec.decode_into(p, results[g.index][a:b])
        st.stats.decode_s += time.perf_counter() - t1
        return results


class HierarchicalTransport(Transport):
    """The two-level exchange (module docstring). With N = H L ranks, rank (h, l) = h L + l:

        host reduce-scatter  m_{h,l} = (1/L) sum_{l'} v_{h,l'}[chunk l]          fp32, intra-host
        uplink               send Q_w(m_{h,l}[part h'] + e_{h,l}) to (h', l)     inter-host
        server               u[part h of chunk l] = S((1/H) sum_{h'} Q_w(...))   on rank (h, l)
                             d = Q_s(u + e_s)                                    server EF
        downlink             d to every (h', l) (column), then every host's ranks
                             forward their column's H frames to each other       intra-host

    Chunk l of a group is the union of the served ranges of column l, so (1/H) sum of host
    means is the mean over all N ranks. Every rank decodes the same N downlink frames, so
    replicas stay identical. The worker residual e_{h,l} covers chunk l only (the host's mean
    is what the rank quantizes); it is this rank's state, as under the flat topologies."""
    name = "hierarchical"
    two_level = True

    @property
    def hosts(self) -> Hosts:
        return self.ctx.hosts          # re-read: an elastic reset may move the ranks

    @classmethod
    def _split(cls, numel, hosts, align):
        return shard_bounds(numel, hosts.size, align)

    @classmethod
    def served_ranges(cls, numel, hosts, align):
        split = cls._split(numel, hosts, align)
        return [split[hosts.local(r) * hosts.count + hosts.host(r)] for r in range(hosts.size)]

    @classmethod
    def bytes_per_rank(cls, numel, up, down, hosts):
        L, H = hosts.local_size, hosts.count
        inter = (H - 1) / H * numel * (up + down) / L
        # host reduce-scatter (fp32) and the forwarding of the column's downlink frames
        intra = (L - 1) / L * numel * (4.0 + down)
        return {"total": inter + intra, "inter_host": inter}

    def _chunk(self, g, local: int) -> tuple:
        split = self._split(g.numel, self.hosts, self.ctx.align)
        H = self.hosts.count
        return split[local * H][0], split[local * H + H - 1][1]

    def _send(self, peers: dict, name: str, st):
        """Alltoall where only ``peers`` ({rank: bytes}) get anything."""
        ctx = self.ctx
        per_dest = [peers.get(r, b"") for r in range(ctx.size)]
        st.stats.sent_bytes += sum(len(b) for r, b in peers.items() if r != ctx.rank)
        return ctx.comm.alltoall_async(per_dest, name)

    def _receive(self, h, key, sources: list, what: str, st) -> list:
        """The frames ``sources`` sent in the collective ``h[key]`` (in that order), checked;
        every other rank must have sent nothing."""
        ctx = self.ctx
        received = self._wait(h, key, st)
        want = set(sources)
        for r, b in enumerate(received):
            if r not in want and len(b):
                raise PayloadError(f"rank {ctx.rank}: {what} exchange: rank {r} sent {len(b)} bytes, expected none")
        st.stats.received_bytes += sum(len(received[r]) for r in sources if r != ctx.rank)
        return [received[r] for r in sources]

    def _parse(self, views, sources, what):
        ctx, frames = self.ctx, []
        for r, v in zip(sources, views):
            try:
                frames.append(Frame.from_bytes(v, source=f"{what} frame from rank {r}"))
            except PayloadError as e:
                raise PayloadError(f"rank {ctx.rank}: {e}") from None
        self._check(frames, f"{what} frame", sources)
        return frames

    def start(self, g, vec, grad, st):
        ctx, hs = self.ctx, self.hosts
        # NaN/Inf anywhere in this rank's vector: every local peer hears it, and they tell the
        # other hosts in the uplink, so every rank fails the step together.
        error = None if all_finite(vec) else ctx.uplink_error(g, grad)
        peers = {}
        for r in hs.same_host(ctx.rank):
            a, b = self._chunk(g, hs.local(r))
            # full precision inside the host (the payload of config.NONE_LINK)
            peers[r] = ctx.frame([] if error else [codec.quantize(vec[a:b], "none", check_finite=False)], error)
        return {"handle": self._send(peers, f"hvd_qadam.host.{g.index}", st)}

    def complete(self, st, groups) -> dict:
        ctx, hs = self.ctx, self.hosts
        me = ctx.rank
        local, column = hs.same_host(me), hs.column(me)
        H, loc = hs.count, hs.local(me)
        # Phases 2-4 carry every group in one collective each (module docstring: why); phase 1,
        # the host exchange, is per group, started during backward.
        # 2. host means of chunk `loc`, quantized to the column peers (worker EF)
        parts_of, errors = {k: [] for k in range(H)}, []
        for g in groups:
            h = st.launched[g.index]
            frames = self._parse(self._receive(h, "handle", local, "host", st), local, "host")
            t0 = time.perf_counter()
            ca, cb = self._chunk(g, loc)
            group_errors = [f.error for f in frames if f.error is not None]
            if not group_errors and not errors:
                host_mean = codec.mean_into([self._single(f, "host", r) for r, f in zip(local, frames)],
                                            ctx.scratch(StateKey.host(g.index, ca, "hostmean"), cb - ca, g.device))
                split = self._split(g.numel, hs, ctx.align)
                parts = [split[loc * H + k] for k in range(H)]
                payloads, bad = ctx.encode_uplink(g, host_mean, st, parts, ca, StateKey.host(g.index, ca, RESIDUAL))
                if bad:
                    group_errors = [f"rank {me}, step {st.step}: the host mean of group {g.index} overflowed "
                                    f"(non-finite after error feedback)"]
                else:
                    for k in range(H):
                        parts_of[k].append(payloads[k])
            errors += [e for e in group_errors if e not in errors]
            st.stats.encode_s += time.perf_counter() - t0
        msg = "; ".join(errors) if errors else None
        h = st.shared
        h["handle_up"] = self._send({r: ctx.frame([] if msg else parts_of[k], msg) for k, r in enumerate(column)},
                                    "hvd_qadam.up", st)
        # 3. serve this rank's part of every group; its downlink frame to the column. An error
        # travels on in place of the downlink (only this column heard it so far), so that every
        # rank takes part in every collective and learns it by the end of phase 4.
        frames = self._parse(self._receive(h, "handle_up", column, "uplink", st), column, "uplink")
        t0 = time.perf_counter()
        if self._errors(frames, st):
            down = ctx.frame([], "; ".join(st.errors))
        else:
            received = [self._several(f, len(groups), "uplink", r) for r, f in zip(column, frames)]
            down = ctx.frame([ctx.serve(g, *ctx.bounds[g.index][me], [p[i] for p in received], st)
                              for i, g in enumerate(groups)], None)
        h["handle_col"] = self._send({r: down for r in column}, "hvd_qadam.down", st)
        st.stats.decode_s += time.perf_counter() - t0
        # 4. the column's frames to the host's other ranks, then every rank's parts decoded
        views = self._receive(h, "handle_col", column, "downlink", st)
        blob = b"".join(bytes(v) for v in views)
        h["handle_host"] = self._send({r: blob for r in local}, "hvd_qadam.fwd", st)
        blobs = self._receive(h, "handle_host", local, "forwarded downlink", st)
        t0 = time.perf_counter()
        results = {g.index: self._out(g) for g in groups}
        for l2, blob in zip(range(hs.local_size), blobs):
            sources = hs.column(hs.rank(0, l2))
            views = split_frames(blob)
            if len(views) != H:
                raise PayloadError(f"rank {me}: forwarded downlink of local rank {l2} holds {len(views)} "
                                   f"frames, expected {H}")
            frames = self._parse(views, sources, "downlink")
            if self._errors(frames, st) or st.errors:
                continue
            for r, f in zip(sources, frames):
                for g, p in zip(groups, self._several(f, len(groups), "downlink", r)):
                    a, b = ctx.bounds[g.index][r]
                    codec.decode_into(p, results[g.index][a:b])
        st.stats.decode_s += time.perf_counter() - t0
        return {} if st.errors else results


class PSTransport(Transport):
    """Every group's uplink payload in one frame to the server rank (:mod:`hvd_qadam.ps`), which
    answers with the downlink frame of every group; it is sent after the last group is ready."""
    name = "ps"
    overlaps = False
    full_precision_allreduce = False   # the workers reach the server rank only, over mpi4py
    dedicated_server = True

    @classmethod
    def bytes_per_rank(cls, numel, up, down, hosts):
        """Each worker's frame to the server and its answer, counted as crossing hosts (the server
        rank is taken to sit on another host)."""
        total = numel * (up + down)
        return {"total": total, "inter_host": total}

    def start(self, g, vec, grad, st):
        payloads, error = self._uplink(g, vec, grad, st, self.ctx.bounds[g.index])
        return {"payloads": payloads, "error": error}

    def complete(self, st, groups) -> dict:
        ctx = self.ctx
        error = next((st.launched[g.index]["error"] for g in groups if st.launched[g.index]["error"]), None)
        payloads = [] if error is not None else [st.launched[g.index]["payloads"][0] for g in groups]
        data = ctx.frame(payloads, error)
        hyper = [{k: v for k, v in pg.items() if k != "params"} for pg in ctx.hyper_groups()]
        t0 = time.perf_counter()
        status, reply = ctx.comm.ps_request(("step", data, hyper))
        st.stats.exchange_s += time.perf_counter() - t0
        st.stats.sent_bytes += len(data)
        if status == "nonfinite":
            st.errors.append(reply)
            return {}
        if status == "error":
            raise CommError(f"parameter server: {reply}")
        if status != "ok":
            raise ConsistencyError(f"parameter server: {reply}")
        t1 = time.perf_counter()
        st.stats.received_bytes += len(reply)
        frame = ctx.parse([reply], "downlink")[0]
        results = {}
        for g in groups:
            out = self._out(g)
            codec.decode_into(frame.payloads[g.index], out)
            results[g.index] = out
        st.stats.decode_s += time.perf_counter() - t1
        return results


class AllreduceTransport(Transport):
    """Full precision through Horovod's own allreduce: what ``hvd.DistributedOptimizer`` sends.

        mean = (1/N) allreduce_sum(v_i)        (fp32, float64, or fp16 for an fp16 uplink)
        u    = S(mean) on the whole group      every rank, locally: nothing travels down

    It carries every exchange made in full precision (warm-up and v-refresh steps, tensors below
    ``min_compress_numel``, ``quantizer="none"``/``"fp16"``, and the steps where
    ``exchange="auto"`` chose Horovod), so such steps cost what Horovod costs (fused, on its
    response cache, overlapped with backward) rather than a full-precision frame through a
    topology built for small payloads. Every rank runs the server side S of the whole group, so
    it serves algorithms whose server keeps state only under a topology where every rank holds
    all of it (:meth:`carries`). Worker residuals are not touched: error feedback's mass waits
    for the next compressed step. A NaN/Inf on any rank reaches every rank in the sum, and every
    rank fails the step together."""
    name = "horovod"
    shards_server = False

    # Horovod's allreduce of CPU tensors takes these; bf16 and the codes do not.
    WIRE_DTYPES = {"none": None, "fp16": torch.float16}

    @staticmethod
    def carries(topology_class, algorithm, comm) -> bool:
        """Whether a full-precision exchange under ``topology_class`` may go through the allreduce."""
        if getattr(comm, "excluded", False):      # outside the process set: it exchanges nothing
            return False
        return (topology_class.full_precision_allreduce and hasattr(comm, "allreduce_async")
                and (not algorithm.server_state or not topology_class.shards_server))

    @classmethod
    def takes(cls, link) -> bool:
        return link.passthrough and link.quantizer in cls.WIRE_DTYPES

    def _wire_dtype(self, g, st, vec):
        return self.WIRE_DTYPES[self.ctx.wire_link(g, self.ctx.links(g, st)[0]).quantizer] or vec.dtype

    @staticmethod
    def _in_place(vec, dtype) -> bool:
        """Whether the sums land in ``vec`` itself (as ``hvd.DistributedOptimizer``'s land in
        ``p.grad``: no output tensor allocated, nothing copied back): in ``vec``'s own dtype, and on
        the CPU. Each tensor must then be checked for NaN/Inf before its sum overwrites it, which on
        the CPU costs nothing more; on a GPU every check would synchronise the device inside a
        backward hook, so there the sums go out of place and the group is checked once."""
        return vec.dtype == dtype and vec.device.type == "cpu"

    def _allreduce_tensor(self, g, slot: int, vec, dtype, st):
        """Start tensor ``slot``'s allreduce: in place where :meth:`_in_place` (the tensor checked
        first, its note kept for the step's error), else out of place in the wire type."""
        s = g.slots[slot]
        part = vec[s.offset:s.offset + s.numel]
        name = f"hvd_qadam.fp.{g.index}.{slot}"
        if not self._in_place(part, dtype):
            return self.ctx.comm.allreduce_async(part.to(dtype), name)      # .to: no copy in its own dtype
        note = nonfinite_note(s.name, part)
        if note is not None:
            st.nonfinite_notes.setdefault(g.index, []).append(note)
        return self.ctx.comm.allreduce_inplace_async(part, name)

    def start_tensor(self, g, slot: int, grad, st) -> None:
        """One tensor's allreduce, from its backward hook (``Engine.tensorwise`` groups), reading
        the group's gradient buffer (an fp32 sum then lands in place; nothing else writes it
        before the step completes)."""
        early = st.early_tensors.setdefault(g.index, {})
        if slot not in early:
            early[slot] = self._allreduce_tensor(g, slot, grad, self._wire_dtype(g, st, grad), st)

    def start(self, g, vec, grad, st):
        ctx = self.ctx
        dtype = self._wire_dtype(g, st, vec)
        nbytes = 2 * (ctx.size - 1) * g.numel * (torch.finfo(dtype).bits // 8) // ctx.size   # a ring's volume
        st.stats.sent_bytes += nbytes
        st.stats.received_bytes += nbytes
        if not ctx.tensorwise(g, st):
            send = vec.to(dtype) if vec.dtype != dtype else vec
            # Said only if the sum comes back non-finite (then every rank hears who, see complete).
            error = None if all_finite(send) else ctx.uplink_error(g, grad)
            return {"handle": ctx.comm.allreduce_async(send, f"hvd_qadam.fp.{g.index}"), "error": error}
        # tensor by tensor, in slot order: those the hooks have not started yet start now (every
        # rank allreduces the same names whichever started where)
        early = st.early_tensors.pop(g.index, {})
        h = {f"handle.{i}": early[i] if i in early else self._allreduce_tensor(g, i, vec, dtype, st)
             for i in range(len(g.slots))}
        if self._in_place(vec, dtype):
            notes = st.nonfinite_notes.pop(g.index, None)
            h["in_place"], h["error"] = vec, None if notes is None else ctx.uplink_error(g, grad, notes)
        else:      # checked as sent (an fp16 cast may overflow what was finite in fp32)
            h["in_place"], h["error"] = None, None if all_finite(vec.to(dtype)) else ctx.uplink_error(g, grad)
        return h

    def complete(self, st, groups) -> dict:
        ctx, results = self.ctx, {}
        for g in groups:
            h = st.launched[g.index]
            if "handle" in h:
                mean = ctx.scratch(StateKey.worker(g.index, "mean"), g.numel, g.device, g.dtype)
                mean.copy_(self._wait(h, "handle", st))
            elif h["in_place"] is not None:
                mean = h["in_place"]                 # the sums are already there
                for i in range(len(g.slots)):
                    self._wait(h, f"handle.{i}", st)
            else:
                mean = ctx.scratch(StateKey.worker(g.index, "mean"), g.numel, g.device, g.dtype)
                for i, s in enumerate(g.slots):
                    mean[s.offset:s.offset + s.numel].copy_(self._wait(h, f"handle.{i}", st))
            t1 = time.perf_counter()
            mean.div_(float(ctx.size))
            if not all_finite(mean):
                # Every rank got the same non-finite sum and is here: one more collective, on this
                # path only, tells every rank which ranks sent what.
                notes = [n for n in ctx.comm.allgather_object(h["error"], name=f"hvd_qadam.fp.{g.index}.error") if n]
                msg = "; ".join(notes) or (f"step {st.step}: the allreduced sum of group {g.index} overflowed "
                                           f"(every rank's values were finite)")
                if msg not in st.errors:
                    st.errors.append(msg)
                continue
            results[g.index] = ctx.server_transform(g, 0, g.numel, mean, st)
            st.stats.decode_s += time.perf_counter() - t1
        return results


TOPOLOGIES = {cls.name: cls for cls in (AllgatherTransport, ShardedTransport, HierarchicalTransport, PSTransport)}
AUTO = "auto"


def make_transport(topology: str, ctx) -> Transport:
    return TOPOLOGIES[topology](ctx)


def choose(hosts: Hosts, uplink, downlink_for, hierarchical: bool | None = None) -> tuple[str, str]:
    """(topology, reason) for ``topology="auto"``: of the flat topologies, the one whose ranks
    send the fewest bytes across hosts per element (then in all), preferring ``allgather`` on a
    tie (one collective, and a downlink computed locally, without a second quantization).
    ``downlink_for(topology_class)`` is the downlink link that topology would run with.

    The two-level exchange moves 1/L of the flat exchange's bytes across hosts but runs four
    collective rounds per group instead of two, which costs more than it saves where a round is
    expensive (docs/scaling.md). So ``hierarchical=None`` takes it only where the flat exchange
    would load a host's link more than Horovod's fp16 ring allreduce does (2 (N - 1)/N x 2 bytes
    per element: a ring crosses each host's link once), which happens with several ranks per host
    (from 4 per host at 12 ranks, 3 per host at 15: the multi-GPU nodes). True always takes it,
    False never."""
    if hierarchical:
        return "hierarchical", "hierarchical=True"
    candidates = ["allgather", "sharded"]
    up = payload_bytes_per_element(uplink)
    costs = {}
    for name in candidates:
        cls = TOPOLOGIES[name]
        down = payload_bytes_per_element(downlink_for(cls)) if cls.downlink_travels else 0.0
        b = cls.bytes_per_rank(1, up, down, hosts)
        costs[name] = (round(b["inter_host"], 9), round(b["total"], 9))
    best = min(candidates, key=lambda n: costs[n])
    where = (f"{hosts.size} ranks" if hosts.local_size == 1 else
             f"{hosts.size} ranks on one host" if hosts.count == 1 else
             f"{hosts.size} ranks on {hosts.count} hosts of {hosts.local_size}")
    detail = ", ".join(f"{n} {c[0]:.3g} across hosts / {c[1]:.3g} in all" for n, c in costs.items())
    if hierarchical is None and hosts.local_size > 1 and hosts.count > 1:
        n = hosts.size
        host_link = costs[best][0] * hosts.local_size
        fp16_ring = 2 * (n - 1) / n * 2.0
        if host_link > fp16_ring:
            two = TOPOLOGIES["hierarchical"].bytes_per_rank(1, up, payload_bytes_per_element(downlink_for(
                TOPOLOGIES["hierarchical"])), hosts)["inter_host"] * hosts.local_size
            return "hierarchical", (f"{where}: {best} would put {host_link:.3g} bytes per element on each host's "
                                    f"link, more than Horovod's fp16 ring ({fp16_ring:.3g}); the two-level "
                                    f"exchange puts {two:.3g}")
        detail += f"; per host link {host_link:.3g} <= Horovod fp16 ring {fp16_ring:.3g}"
    return best, f"{where}: fewest bytes per element a rank sends across hosts, then in all ({detail})"
