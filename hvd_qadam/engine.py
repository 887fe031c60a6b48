"""One pipeline for every algorithm:

    worker transform W -> uplink quantizer Q_w (+ worker EF) -> mean over workers
      -> server transform S -> downlink (full / Q_s + server EF / quantized weights) -> apply

The engine owns the algorithm state of one rank (worker residuals and moments, and the server
state of the shards it serves) and talks to its peers only through a comm object that moves
bytes (:mod:`hvd_qadam.comm`), so real ranks and the simulator run this same code. A step is
transactional: every new residual and moment is computed aside and committed only after the
whole exchange succeeded, so an error (NaN/Inf, a bad payload, a failed peer) changes nothing.

Shards are bucket-aligned and the random stream of a vector is indexed by global element
position, so the ``allgather`` and ``sharded`` topologies produce bit-identical results.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import functional as F
from .api import decode_flat, quantize
from .config import NONE_LINK, Config, LinkSpec
from .layout import Layout, shard_alignment, shard_bounds
from .memory import ResidualMemory
from .quant import rng
from .quant.backend import cpu_backend
from .wire import Frame, PayloadError, split_frames

SERVER_RANK = 2 ** 31 - 1     # the rank used in the server's random-stream keys

# What the optimizer does with the engine's output.
OUT_GRAD, OUT_UPDATE, OUT_WEIGHTS = "grad", "update", "weights"
OUTPUT_KIND = {"qsgd": OUT_GRAD, "efficient_adam": OUT_UPDATE, "qadam": OUT_UPDATE, "ef_sgd": OUT_UPDATE,
               "qadam_weights": OUT_WEIGHTS, "local_sgd": OUT_WEIGHTS}


class NonFiniteGradientError(FloatingPointError):
    """Some rank had NaN/Inf in a gradient; the step was not taken and no state changed."""


class ConsistencyError(RuntimeError):
    """Ranks disagree about the model, the configuration or the step they are in."""


@dataclass
class StepStats:
    """Bytes this rank put on the wire (and received) in the last exchange, and timings."""
    step: int = -1
    sent_bytes: int = 0
    received_bytes: int = 0
    fp32_bytes: int = 0            # what the same exchange costs uncompressed (uplink, fp32)
    encode_s: float = 0.0
    exchange_s: float = 0.0
    decode_s: float = 0.0
    levels_s: float = 0.0          # adaptive quantizers: time spent refitting levels this step
    compressed: bool = True
    totals: dict = field(default_factory=lambda: {"sent_bytes": 0, "received_bytes": 0, "fp32_bytes": 0, "steps": 0,
                                                  "levels_s": 0.0, "level_refits": 0})

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.sent_bytes if self.sent_bytes else float("nan")


class Engine:
    def __init__(self, config: Config, layout: Layout, comm, hyper):
        """``hyper(param_group_index) -> dict`` reads lr, betas, eps, weight_decay, momentum live
        from the optimizer's param_groups, so lr schedulers keep working."""
        self.cfg, self.layout, self.comm, self.hyper = config, layout, comm, hyper
        self.rank, self.size = comm.rank, comm.size
        self.kind = OUTPUT_KIND[config.algorithm]
        self.worker_memory = ResidualMemory(self.size, config.topology)
        self._flat_residuals: dict[int, torch.Tensor] = {}   # group -> flat residual (views live in memory)
        self.server_memory = ResidualMemory(self.size, config.topology)
        self.worker_state: dict[str, torch.Tensor] = {}   # flat per-group tensors, e.g. "g0.m"
        self.server_state: dict[str, torch.Tensor] = {}   # flat per-chunk tensors, e.g. "g0@512.m"
        self.counters = {"step": 0, "worker_adam_step": {}, "server_adam_step": {}}
        self.stats = StepStats()
        self.skipped_steps = 0
        self.uplink_levels = None    # adaptive quantizers: hvd_qadam.adaptive.LevelAdapter
        if cb_adaptive(config.uplink):
            from .adaptive import LevelAdapter
            self.uplink_levels = LevelAdapter(config.uplink.quantizer, config.uplink.bits,
                                              config.uplink.bucket_size, schedule=tuple(config.level_schedule),
                                              every=config.level_every)
        if cb_adaptive(config.downlink):
            raise ValueError("adaptive quantizers (alq/amq) are supported on the uplink; use a fixed "
                             "quantizer for the downlink")
        align = shard_alignment(config.uplink.bucket_size, config.downlink.bucket_size)
        self.bounds = {g.index: (shard_bounds(g.numel, self.size, align) if config.topology == "sharded"
                                 else [(0, g.numel)]) for g in layout.groups}

    @property
    def step_count(self) -> int:
        return self.counters["step"]

    # ------------------------------------------------------------------ helpers
    def _links(self, group, compress: bool) -> tuple[LinkSpec, LinkSpec]:
        if not (group.compressed and compress):
            return NONE_LINK, NONE_LINK
        return self.cfg.uplink, self.cfg.downlink

    def _encode(self, vec: torch.Tensor, link: LinkSpec, key: int, offset: int, codebook=None):
        return quantize(vec, link.quantizer, link.bits, link.bucket_size, rounding=link.rounding, key=key,
                        offset=offset, codebook=codebook, check_finite=False)

    @staticmethod
    def _decode(payload) -> torch.Tensor:
        out = decode_flat(payload)
        return torch.from_numpy(np.ascontiguousarray(out)) if isinstance(out, np.ndarray) else torch.from_dlpack(out)

    def _mean(self, payloads: list, n: int) -> torch.Tensor:
        """Average of the decoded payloads, summed in rank order (the same order on every topology)."""
        be = cpu_backend()
        acc = np.zeros(n, dtype=np.float32)
        for p in payloads:
            if p.kind.passthrough or not hasattr(be, "decode_add"):
                acc += decode_flat(p)
            else:
                be.decode_add(acc, p.scales, p.codes, p.levels, p.bits, p.bucket_size, p.numel)
        acc /= np.float32(len(payloads))
        return torch.from_numpy(acc)

    def _key(self, rank: int, group: int, direction: int) -> int:
        return rng.stream_key(self.cfg.seed, rank, self.step_count, group, direction)

    def _worker_residual(self, g) -> torch.Tensor:
        flat = self._flat_residuals.get(g.index)
        if flat is None:         # first step, or after load_state_dict: gather by parameter name
            flat = g.flatten({s.name: self.worker_memory.get(s.name, s.param) for s in g.slots})
        return flat

    # ------------------------------------------------------------------ worker transform
    def _worker_transform(self, g, grad: torch.Tensor, x: torch.Tensor, pending: dict) -> torch.Tensor:
        alg, h, key = self.cfg.algorithm, self.hyper(g.param_group), f"g{g.index}"
        if alg in ("qsgd", "qadam", "qadam_weights"):
            return grad
        if alg == "efficient_adam":
            beta1, beta2 = h["betas"]
            m = self.worker_state.get(key + ".m", torch.zeros_like(grad))
            v = self.worker_state.get(key + ".v", torch.zeros_like(grad))
            m, v = F.adam_moments(m, v, grad, beta1, beta2)
            t = self.counters["worker_adam_step"].get(key, 0) + 1
            d = F.adam_step(m, v, t, h["lr"], beta1, beta2, h["eps"], self.cfg.bias_correction)
            if h.get("weight_decay", 0.0):
                d = F.decoupled_weight_decay(d, x(), h["lr"], h["weight_decay"])
            pending["worker_state"].update({key + ".m": m, key + ".v": v})
            pending["worker_adam_step"][key] = t
            return d
        if alg == "ef_sgd":
            wd = h.get("weight_decay", 0.0)
            if wd:
                grad = grad + x() * wd
            mom = h.get("momentum", 0.0)
            early = self.cfg.momentum_steps
            if early is not None and self.step_count >= early:
                mom = 0.0               # early momentum: plain SGD after E steps
            buf = F.momentum_buffer(self.worker_state.get(key + ".buf"), grad, mom)
            if mom:
                pending["worker_state"][key + ".buf"] = buf
            return buf * h["lr"]
        if alg == "local_sgd":
            anchor = self.worker_state[key + ".anchor"]
            return x() - anchor
        raise AssertionError(alg)

    # ------------------------------------------------------------------ server transform
    def _server_transform(self, g, a: int, b: int, mean: torch.Tensor, x: torch.Tensor, pending: dict):
        alg, h, key = self.cfg.algorithm, self.hyper(g.param_group), f"g{g.index}@{a}"
        if alg in ("qsgd", "efficient_adam", "ef_sgd"):
            return mean
        if alg == "local_sgd":
            return mean                       # the averaged model delta
        if alg in ("qadam", "qadam_weights"):
            beta1, beta2 = h["betas"]
            m = self.server_state.get(key + ".m", torch.zeros_like(mean))
            v = self.server_state.get(key + ".v", torch.zeros_like(mean))
            m, v = F.adam_moments(m, v, mean, beta1, beta2)
            t = self.counters["server_adam_step"].get(key, 0) + 1
            if alg == "qadam_weights":
                xs = self.server_state.get(key + ".x")
                xs = x()[a:b] if xs is None else xs
            d = F.adam_step(m, v, t, h["lr"], beta1, beta2, h["eps"], self.cfg.bias_correction)
            if h.get("weight_decay", 0.0):
                d = F.decoupled_weight_decay(d, xs if alg == "qadam_weights" else x()[a:b], h["lr"],
                                             h["weight_decay"])
            pending["server_state"].update({key + ".m": m, key + ".v": v})
            pending["server_adam_step"][key] = t
            if alg == "qadam":
                return d
            xs = xs - d                       # full-precision latent weights live on the server
            pending["server_state"][key + ".x"] = xs
            return xs
        raise AssertionError(alg)

    def _downlink(self, g, a: int, u: torch.Tensor, link: LinkSpec, pending: dict):
        """Server output -> downlink payload (+ server EF for update-type outputs)."""
        if link.passthrough:
            # allgather: every rank already holds u, nothing travels; else it is sent as fp32/fp16
            return u if self.cfg.topology == "allgather" and link.quantizer == "none" else self._encode(u, link, 0, a)
        key = self._key(SERVER_RANK, g.index, rng.DOWNLINK)
        ef = self.cfg.server_error_feedback and self.kind in (OUT_UPDATE, OUT_GRAD)
        name = f"g{g.index}@{a}"
        p = self.server_memory.compensate(name, u) if ef else u
        q = self._encode(p, link, key, a)
        if ef:
            pending["server_residuals"][name] = p - self._decode(q)
        return q

    # ------------------------------------------------------------------ the step
    def step(self, grads: dict, params: dict):
        """Run one exchange. Returns {name: tensor} to apply (see ``self.kind``), or None when the
        step was skipped (``nonfinite="skip"``)."""
        cfg, t = self.cfg, self.step_count
        compress = t >= cfg.warmup_steps
        pending = {"worker_residuals": {}, "server_residuals": {}, "worker_state": {}, "server_state": {},
                   "worker_adam_step": {}, "server_adam_step": {}}
        stats = StepStats(step=t, compressed=compress, totals=self.stats.totals)
        t0 = time.perf_counter()

        # 1. worker side: transform, error feedback, quantize (per chunk of each group)
        error = None
        uplink_vectors = []
        for g in self.layout.groups:
            grad = g.flatten(grads)
            # A sum is ~5x cheaper than isfinite().all() and is non-finite whenever an element is
            # (or, rarely, when finite values overflow: then the exact check clears it).
            if not math.isfinite(float(grad.sum())) and not bool(torch.isfinite(grad).all()):
                bad = [f"{s.name} ({int(torch.isnan(grads[s.name]).sum())} NaN, "
                       f"{int(torch.isinf(grads[s.name]).sum())} Inf)"
                       for s in g.slots if not bool(torch.isfinite(grads[s.name]).all())]
                error = f"rank {self.rank}, step {t}: non-finite gradient in {', '.join(bad)}"
                break
            x = _Lazy(g.flatten, params)
            v = self._worker_transform(g, grad, x, pending)
            up, _ = self._links(g, compress)
            use_ef = cfg.error_feedback and not up.passthrough
            p = v + self._worker_residual(g) if use_ef else v    # a new tensor: becomes the residual
            uplink_vectors.append((g, p, up, use_ef))
        codebook = None
        if error is None and self.uplink_levels is not None and compress:
            tl = time.perf_counter()
            due = self.uplink_levels.due(t)
            codebook = self._refit_levels([p for (g, p, up, _) in uplink_vectors if not up.passthrough], due)
            if due:
                stats.levels_s = time.perf_counter() - tl
                stats.totals["levels_s"] += stats.levels_s
                stats.totals["level_refits"] += 1
        chunk_payloads = {}          # (group, chunk) -> payload
        if error is None:
            for g, p, up, use_ef in uplink_vectors:
                key = self._key(self.rank, g.index, rng.UPLINK)
                for c, (a, b) in enumerate(self.bounds[g.index]):
                    q = self._encode(p[a:b], up, key, a, codebook if not up.passthrough else None)
                    chunk_payloads[(g.index, c)] = q
                    if use_ef:
                        p[a:b].sub_(self._decode(q))      # e = p - decode(Q(p)), in place
                if use_ef:
                    pending["worker_residuals"][g.index] = p
                stats.fp32_bytes += 4 * g.numel
        stats.encode_s = time.perf_counter() - t0

        # 2. uplink exchange, 3. server side on the chunks this rank serves, 4. downlink
        t1 = time.perf_counter()
        if cfg.topology == "ps":
            out_flat = self._ps_exchange(chunk_payloads, error, stats)
            if out_flat is None:
                return None
            stats.exchange_s = time.perf_counter() - t1
        else:
            frames = self._uplink_exchange(chunk_payloads, error, stats)
            stats.exchange_s = time.perf_counter() - t1
            errors = [f.error for f in frames if f.error is not None]
            if errors:
                return self._fail(errors)
            self._check_frames(frames)
            t2 = time.perf_counter()
            down_payloads = self._serve(frames, self._served_chunks(), params, compress, pending)
            out_flat = self._downlink_exchange(down_payloads, stats)
            stats.decode_s = time.perf_counter() - t2

        # 5. commit, then hand the result to the optimizer
        for gi, resid in pending["worker_residuals"].items():
            # Stored per parameter name as views of the flat buffer (no copy), which is kept too.
            self.worker_memory.commit(self.layout.groups[gi].views(resid))
            self._flat_residuals[gi] = resid
        self.worker_state.update(pending["worker_state"])
        self.counters["worker_adam_step"].update(pending["worker_adam_step"])
        self._commit_server(pending)
        self.counters["step"] += 1
        for k in ("sent_bytes", "received_bytes", "fp32_bytes"):
            stats.totals[k] += getattr(stats, k)
        stats.totals["steps"] += 1
        self.stats = stats
        out = {}
        for g in self.layout.groups:
            flat = out_flat[g.index]
            if cfg.algorithm == "local_sgd":
                anchor = self.worker_state[f"g{g.index}.anchor"]
                flat = anchor + flat
                self.worker_state[f"g{g.index}.anchor"] = flat.clone()
            out.update(g.views(flat))
        return out

    def _check_frames(self, frames: list) -> None:
        t = self.step_count
        for src, f in enumerate(frames):
            if f.step != t or f.layout != self.layout.hash:
                raise ConsistencyError(
                    f"rank {src} sent step {f.step} / layout {f.layout:#010x}, rank {self.rank} expected step {t} / "
                    f"layout {self.layout.hash:#010x}: ranks disagree about the model or their step count")

    def _serve(self, frames: list, served: list, params: dict, compress: bool, pending: dict) -> dict:
        """Server side: average the workers' payloads of each served chunk, apply the server
        transform and encode the downlink. Returns {(group, chunk): payload}."""
        down_payloads = {}
        for gi, c in served:
            g = self.layout.groups[gi]
            a, b = self.bounds[gi][c]
            pos = [i for i, (gj, _) in enumerate(self._frame_order(c)) if gj == gi][0]
            payloads = [f.payloads[pos] for f in frames]
            for src, p in enumerate(payloads):
                if p.numel != b - a:
                    raise ConsistencyError(f"rank {src} sent {p.numel} elements for group {gi} chunk {c}, "
                                           f"expected {b - a}")
            mean = self._mean(payloads, b - a)
            _, down = self._links(g, compress)
            u = self._server_transform(g, a, b, mean, _Lazy(g.flatten, params), pending)
            down_payloads[(gi, c)] = self._downlink(g, a, u, down, pending)
        return down_payloads

    def _commit_server(self, pending: dict) -> None:
        self.server_memory.commit(pending["server_residuals"])
        self.server_state.update(pending["server_state"])
        self.counters["server_adam_step"].update(pending["server_adam_step"])

    # ------------------------------------------------------------------ parameter server (ps topology)
    def _ps_exchange(self, chunk_payloads: dict, error, stats: StepStats):
        """Worker side of ``ps``: send the frame to the server rank, get the downlink frame back."""
        data = self._frame([chunk_payloads[k] for k in self._frame_order(0)] if error is None else [], error)
        hyper = [{k: v for k, v in pg.items() if k != "params"} for pg in self.hyper_groups()]
        status, reply = self.comm.ps_request(("step", data, hyper))
        stats.sent_bytes += len(data)
        if status == "nonfinite":
            return self._fail([reply])
        if status != "ok":
            raise ConsistencyError(f"parameter server: {reply}")
        stats.received_bytes += len(reply)
        frame = self._parse([reply], "downlink")[0]
        return {g.index: self._decode(frame.payloads[g.index]) for g in self.layout.groups}

    def server_step(self, frames_data: list, params: dict):
        """Server rank of ``ps``: one step from the workers' frames. Returns (status, reply) where
        reply is the downlink frame for status "ok", else an error message. The server's copy of
        the parameters (``params``) is updated the way the workers update theirs."""
        frames = self._parse(frames_data, "uplink")
        errors = [f.error for f in frames if f.error is not None]
        if errors:
            return "nonfinite", "; ".join(errors)
        try:
            self._check_frames(frames)
        except ConsistencyError as e:
            return "consistency", str(e)
        pending = {"server_residuals": {}, "server_state": {}, "server_adam_step": {}}
        compress = self.step_count >= self.cfg.warmup_steps
        down = self._serve(frames, [(g.index, 0) for g in self.layout.groups], params, compress, pending)
        self._commit_server(pending)
        self.counters["step"] += 1
        with torch.no_grad():
            for g in self.layout.groups:
                value = self._decode(down[(g.index, 0)])
                for name, v in g.views(value).items():
                    if self.kind == OUT_UPDATE:
                        params[name].sub_(v.to(params[name].dtype))
                    elif self.kind == OUT_WEIGHTS and self.cfg.algorithm != "local_sgd":
                        params[name].copy_(v)
        return "ok", self._frame([down[(g.index, 0)] for g in self.layout.groups], None)

    def hyper_groups(self) -> list:
        n = 1 + max((g.param_group for g in self.layout.groups), default=0)
        return [self.hyper(i) for i in range(n)]

    def _refit_levels(self, vectors: list, due: bool):
        lv = self.uplink_levels
        if due:
            local = lv.local_stats([v.detach().cpu().numpy() for v in vectors])
            gathered = self.comm.allgather_object(local, name=f"hvd_qadam.levels.{self.step_count}")
            total = gathered[0].copy()
            for s in gathered[1:]:
                total += s                    # rank order: identical on every rank
            lv.update(total, self.size, step=self.step_count)
            # Every rank fitted the same statistics; adopt rank 0's result anyway, since libm's
            # exp/erf may differ in the last bit between CPU models and codebooks must agree.
            states = self.comm.allgather_object(lv.state_dict(), name=f"hvd_qadam.levels_fit.{self.step_count}")
            lv.load_state_dict(states[0])
        return lv.codebook

    def _fail(self, errors: list):
        msg = "; ".join(errors)
        if self.cfg.nonfinite == "skip":
            self.skipped_steps += 1
            return None
        raise NonFiniteGradientError(f"{msg}. No state was changed (residuals, moments, weights).")

    # ------------------------------------------------------------------ topologies
    def _frame_order(self, chunk: int) -> list:
        """The (group, chunk) order of payloads in a frame destined to the server of ``chunk``."""
        if self.cfg.topology in ("allgather", "ps"):
            return [(g.index, 0) for g in self.layout.groups]
        return [(g.index, chunk) for g in self.layout.groups]

    def _served_chunks(self) -> list:
        if self.cfg.topology == "allgather":
            return [(g.index, 0) for g in self.layout.groups]
        if self.cfg.topology == "ps":
            return []
        return [(g.index, self.rank) for g in self.layout.groups]

    def _frame(self, payloads, error):
        return Frame(self.rank, self.step_count, self.layout.hash, payloads, error).to_bytes()

    def _parse(self, views, what: str, skip: int | None = None) -> list:
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

    def _uplink_exchange(self, chunk_payloads: dict, error, stats: StepStats) -> list:
        name = f"hvd_qadam.up.{self.step_count}"
        if self.cfg.topology == "allgather":
            data = self._frame([chunk_payloads[k] for k in self._frame_order(0)] if error is None else [], error)
            gathered = self.comm.allgather_bytes(data, name)
            stats.sent_bytes += len(data)
            stats.received_bytes += len(gathered) - len(data)
            views = split_frames(gathered)
            if len(views) != self.size:
                raise ConsistencyError(f"expected {self.size} frames in the allgather, got {len(views)}")
            if len(views[self.rank]) != len(data) or bytes(views[self.rank][:64]) != data[:64]:
                raise ConsistencyError(f"rank {self.rank}: the allgather returned a different frame at its own slot")
            # Peers' frames are parsed and validated; our own we already hold as objects.
            frames = self._parse(views, "uplink", skip=self.rank)
            frames[self.rank] = Frame(self.rank, self.step_count, self.layout.hash,
                                      [chunk_payloads[k] for k in self._frame_order(0)] if error is None else [], error)
            return frames
        # sharded: chunk c of every group goes to rank c
        per_dest = [self._frame([chunk_payloads[k] for k in self._frame_order(c)] if error is None else [], error)
                    for c in range(self.size)]
        received = self.comm.alltoall_bytes(per_dest, name)
        stats.sent_bytes += sum(len(b) for i, b in enumerate(per_dest) if i != self.rank)
        stats.received_bytes += sum(len(b) for i, b in enumerate(received) if i != self.rank)
        return self._parse(received, "uplink")

    def _downlink_exchange(self, down_payloads: dict, stats: StepStats) -> dict:
        """Every rank ends with the full downlink vector of every group."""
        if self.cfg.topology == "allgather":
            # Every rank computed the server side itself (same seeds): nothing to send.
            return {gi: p if isinstance(p, torch.Tensor) else self._decode(p) for (gi, _), p in down_payloads.items()}
        data = self._frame([down_payloads[(g.index, self.rank)] for g in self.layout.groups], None)
        gathered = self.comm.allgather_bytes(data, f"hvd_qadam.down.{self.step_count}")
        stats.sent_bytes += len(data)
        stats.received_bytes += len(gathered) - len(data)
        frames = self._parse(split_frames(gathered), "downlink")
        out = {}
        for g in self.layout.groups:
            out[g.index] = torch.cat([self._decode(frames[c].payloads[g.index]) for c in range(self.size)])
        return out

    # ------------------------------------------------------------------ state
    def start(self, params: dict) -> None:
        """Called before the first step with the initial parameters (identical on all ranks)."""
        if self.cfg.algorithm == "local_sgd":
            for g in self.layout.groups:
                self.worker_state.setdefault(f"g{g.index}.anchor", g.flatten(params).clone())

    def state_dict(self) -> dict:
        return {"config": self.cfg.as_dict(), "layout_hash": self.layout.hash, "world_size": self.size,
                "rank": self.rank,
                "worker_memory": self.worker_memory.state_dict(), "server_memory": self.server_memory.state_dict(),
                "worker_state": {k: v.clone() for k, v in self.worker_state.items()},
                "server_state": {k: v.clone() for k, v in self.server_state.items()},
                "counters": {"step": self.counters["step"],
                             "worker_adam_step": dict(self.counters["worker_adam_step"]),
                             "server_adam_step": dict(self.counters["server_adam_step"])},
                "skipped_steps": self.skipped_steps,
                "levels": None if self.uplink_levels is None else self.uplink_levels.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        import warnings
        if state.get("layout_hash") != self.layout.hash:
            raise ConsistencyError("checkpoint was saved for a different model layout (parameter names, shapes "
                                   "or fusion settings differ)")
        self.counters = {"step": state["counters"]["step"],
                         "worker_adam_step": dict(state["counters"]["worker_adam_step"]),
                         "server_adam_step": dict(state["counters"]["server_adam_step"])}
        self.skipped_steps = state.get("skipped_steps", 0)
        self.worker_state = {k: v.clone() for k, v in state["worker_state"].items()}
        same_world = state.get("world_size") == self.size and state["config"]["topology"] == self.cfg.topology
        self.worker_memory.load_state_dict(state["worker_memory"])
        self._flat_residuals = {}
        self.server_memory.load_state_dict(state["server_memory"])
        if same_world:
            self.server_state = {k: v.clone() for k, v in state["server_state"].items()}
        else:
            warnings.warn(f"server state was saved for world size {state.get('world_size')} / topology "
                          f"{state['config']['topology']!r}; it is sharded differently here and is reset",
                          RuntimeWarning, stacklevel=2)
            self.server_state = {}
            self.counters["server_adam_step"] = {}
        if self.uplink_levels is not None and state.get("levels") is not None:
            self.uplink_levels.load_state_dict(state["levels"])


class _Lazy:
    """A value computed on first use (e.g. the flat parameters, which most algorithms never need)."""

    def __init__(self, fn, *args):
        self._fn, self._args, self._value = fn, args, None

    def __call__(self):
        if self._value is None:
            self._value = self._fn(*self._args)
        return self._value


def cb_adaptive(link: LinkSpec) -> bool:
    from .quant.codebooks import kind
    return kind(link.quantizer).adaptive
