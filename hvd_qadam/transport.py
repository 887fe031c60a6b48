"""Topologies: how one group's frames travel and where its server side runs.

  allgather  every rank gathers every rank's frame (one asynchronous Horovod allgather per group)
             and runs the server side of the whole group itself (same seeds: same result).
  sharded    chunk c of every group goes to rank c (alltoall); rank c serves its chunk and the
             downlink chunks are allgathered. Per-rank traffic stays about constant in N.
  ps         one frame of every group goes point to point to a dedicated server rank, which
             answers with the downlink frame (:mod:`hvd_qadam.ps`); no overlap.

A transport has three calls: ``start`` (a group's payloads are ready: send), ``complete`` (wait
for everything, serve, return each group's result) and ``cancel`` (drain what is in flight after
an error). Results are written into persistent per-group buffers.
"""
from __future__ import annotations

import time

import torch

from .wire import split_frames


class Transport:
    overlaps = True          # groups may be started during backward
    local_downlink = False   # a full-precision downlink needs no message (every rank has it)

    def __init__(self, eng):
        self.eng = eng

    def start(self, g, payloads: list, error, st):
        raise NotImplementedError

    def complete(self, st) -> dict:
        raise NotImplementedError

    def cancel(self, st) -> None:
        for h in st.launched.values():
            if h is not None and h.get("handle") is not None:
                try:
                    self.eng.comm.wait(h["handle"])
                except Exception:  # noqa: BLE001 - draining after an error that is being raised
                    pass
                h["handle"] = None

    def _wait(self, h: dict, key: str, st):
        """The result of the collective ``h[key]`` (then forgotten), its wait timed as exchange."""
        t0 = time.perf_counter()
        result = self.eng.comm.wait(h[key])
        h[key] = None
        st.stats.exchange_s += time.perf_counter() - t0
        return result

    def _out(self, g) -> torch.Tensor:
        return self.eng.scratch(f"g{g.index}.out", g.numel, g.device, g.dtype)

    def _errors(self, frames, st) -> bool:
        errs = [f.error for f in frames if f is not None and f.error is not None]
        for e in errs:
            if e not in st.errors:
                st.errors.append(e)
        return bool(errs)

    def _check(self, frames, what: str) -> None:
        for src, f in enumerate(frames):
            if f is not None:
                self.eng.check_frame(src, f, what)


class AllgatherTransport(Transport):
    local_downlink = True

    def start(self, g, payloads, error, st):
        eng = self.eng
        data = eng.frame(payloads, error)
        st.stats.sent_bytes += len(data)
        return {"handle": eng.comm.allgather_async(data, f"hvd_qadam.up.{g.index}"), "data": data,
                "payloads": payloads, "error": error}

    def complete(self, st) -> dict:
        eng, results = self.eng, {}
        for g in eng.layout.groups:
            h = st.launched[g.index]
            gathered = self._wait(h, "handle", st)
            t1 = time.perf_counter()
            data = h["data"]
            st.stats.received_bytes += len(gathered) - len(data)
            views = split_frames(gathered)
            if len(views) != eng.size:
                from .engine import ConsistencyError
                raise ConsistencyError(f"expected {eng.size} frames in the allgather, got {len(views)}")
            # Peers' frames are parsed and validated; our own we already hold as objects.
            frames = eng.parse(views, "uplink", skip=eng.rank)
            self._check(frames, "uplink frame")
            if self._errors(frames, st) or h["error"] is not None:
                if h["error"] is not None and h["error"] not in st.errors:
                    st.errors.append(h["error"])
                continue
            if st.errors:
                continue
            payloads = [h["payloads"][0] if f is None else f.payloads[0] for f in frames]
            down = eng.serve(g, 0, g.numel, payloads, st)
            if isinstance(down, torch.Tensor):
                results[g.index] = down
            else:
                out = self._out(g)
                eng.decode_into(down, out)
                results[g.index] = out
            st.stats.decode_s += time.perf_counter() - t1
        return results


class ShardedTransport(Transport):
    def start(self, g, payloads, error, st):
        eng = self.eng
        per_dest = [eng.frame([payloads[c]] if error is None else [], error) for c in range(eng.size)]
        st.stats.sent_bytes += sum(len(b) for i, b in enumerate(per_dest) if i != eng.rank)
        return {"handle": eng.comm.alltoall_async(per_dest, f"hvd_qadam.up.{g.index}"), "error": error}

    def complete(self, st) -> dict:
        eng, downs = self.eng, {}
        for g in eng.layout.groups:
            h = st.launched[g.index]
            received = self._wait(h, "handle", st)
            t1 = time.perf_counter()
            st.stats.received_bytes += sum(len(b) for i, b in enumerate(received) if i != eng.rank)
            frames = eng.parse(received, "uplink")
            self._check(frames, "uplink frame")
            if self._errors(frames, st) or st.errors:
                continue
            a, b = eng.bounds[g.index][eng.rank]
            down = eng.serve(g, a, b, [f.payloads[0] for f in frames], st)
            data = eng.frame([down], None)
            st.stats.sent_bytes += len(data)
            h["down"] = eng.comm.allgather_async(data, f"hvd_qadam.down.{g.index}")
            h["down_len"] = len(data)
            st.stats.decode_s += time.perf_counter() - t1
        results = {}
        for g in eng.layout.groups:
            h = st.launched[g.index]
            if h.get("down") is None:
                continue
            gathered = self._wait(h, "down", st)
            t1 = time.perf_counter()
            st.stats.received_bytes += len(gathered) - h["down_len"]
            frames = eng.parse(split_frames(gathered), "downlink")
            self._check(frames, "downlink frame")
            out = self._out(g)
            for c, f in enumerate(frames):
                a, b = eng.bounds[g.index][c]
                eng.decode_into(f.payloads[0], out[a:b])
            results[g.index] = out
            st.stats.decode_s += time.perf_counter() - t1
        return results

    def cancel(self, st) -> None:
        super().cancel(st)
        for h in st.launched.values():
            if h is not None and h.get("down") is not None:
                try:
                    self.eng.comm.wait(h.pop("down"))
                except Exception:  # noqa: BLE001
                    pass


class PSTransport(Transport):
    overlaps = False

    def start(self, g, payloads, error, st):
        return {"payloads": payloads, "error": error}

    def complete(self, st) -> dict:
        from .engine import ConsistencyError
        eng = self.eng
        groups = eng.layout.groups
        error = next((st.launched[g.index]["error"] for g in groups if st.launched[g.index]["error"]), None)
        payloads = [] if error is not None else [st.launched[g.index]["payloads"][0] for g in groups]
        data = eng.frame(payloads, error)
        hyper = [{k: v for k, v in pg.items() if k != "params"} for pg in eng.hyper_groups()]
        t0 = time.perf_counter()
        status, reply = eng.comm.ps_request(("step", data, hyper))
        st.stats.exchange_s += time.perf_counter() - t0
        st.stats.sent_bytes += len(data)
        if status == "nonfinite":
            st.errors.append(reply)
            return {}
        if status == "error":
            from .comm import CommError
            raise CommError(f"parameter server: {reply}")
        if status != "ok":
            raise ConsistencyError(f"parameter server: {reply}")
        t1 = time.perf_counter()
        st.stats.received_bytes += len(reply)
        frame = eng.parse([reply], "downlink")[0]
        results = {}
        for g in groups:
            out = self._out(g)
            eng.decode_into(frame.payloads[g.index], out)
            results[g.index] = out
        st.stats.decode_s += time.perf_counter() - t1
        return results


def make_transport(topology: str, eng) -> Transport:
    return {"allgather": AllgatherTransport, "sharded": ShardedTransport, "ps": PSTransport}[topology](eng)
