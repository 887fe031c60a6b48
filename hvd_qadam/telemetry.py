"""Per-step telemetry of the exchange, written by rank 0: what a user watches to see whether
compression pays on their job.

One record per exchange (every ``every``-th): bytes this rank sent and received, the ratio to
Horovod's fp32 ring allreduce for the same tensors (:attr:`~hvd_qadam.engine.StepStats.ratio`),
the time spent encoding (worker side), waiting for the exchange inside ``step()``, decoding
(server side and downlink) and applying the result, the path each fused group took (where the
engine reports one, ``StepStats.group_paths``), whether the step was compressed, the topology,
and a compression-error signal:

    residual_ratio = sqrt(sum_i ||e_i||^2) / sqrt(sum_i ||g_i||^2)

over the worker error-feedback residuals ``e_i`` after the step (the state bank's ``g<i>.e``
keys, and the two-level exchange's per-chunk ones) and the step's flat local gradients ``g_i``
of the compressed groups. Error feedback sends late what the quantizer does not send now; the
ratio says how much is waiting: well below 1 for a setting that keeps up, about 1 for a ternary
grid, and growing step after step where training stalls (the rule of :mod:`hvd_qadam.stall`
predicts its steady state for Gaussian gradients). It is ``null`` without error feedback.

Sinks: a path ending in ``.jsonl`` gets JSON lines (one object per line: a ``"config"`` header,
then one per step; non-finite numbers as ``null``); any other path is a directory that gets
TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter`` when TensorBoard is
installed, else ``telemetry.jsonl`` inside it. ``scripts/plot_telemetry.py`` plots a JSON-lines
log. Nothing is opened, computed or written on other ranks, or when telemetry is off (the
optimizer then holds ``None`` and skips every call).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import time
import weakref

import torch

ENV = "HVD_QADAM_TELEMETRY"
JSONL_NAME = "telemetry.jsonl"
FLUSH_EVERY_S = 5                # TensorBoard: the longest an event waits before it reaches the file


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - optional: needs the tensorboard package
    except ImportError:
        return False
    return True


def from_options(path, every: int = 1):
    """The :class:`Telemetry` for the optimizer's ``telemetry=`` option (``None``: the
    ``HVD_QADAM_TELEMETRY`` environment variable; unset, empty or ``False``: off), or None."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"telemetry_every must be a positive integer, got {every!r}")
    if path is None:
        path = os.environ.get(ENV) or None
    if path is None or path is False:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"telemetry must be a directory or a .jsonl file path, got {path!r}")
    return Telemetry(os.fspath(path), every)


class Telemetry:
    """Records an optimizer's exchanges on its rank 0 (see the module). Opened lazily by the
    first record on rank 0. A JSON line reaches the file with its step (a run that dies keeps
    every step it logged); TensorBoard events within ``FLUSH_EVERY_S`` seconds. Closed by
    :meth:`close`, when the optimizer is freed, or at interpreter exit."""

    def __init__(self, path: str, every: int = 1):
        if not path:
            raise ValueError("telemetry needs a path (a directory, or a file ending in .jsonl)")
        self.path = path
        self.every = every
        self.sink = "jsonl" if path.endswith(".jsonl") else ("tensorboard" if tensorboard_available() else "jsonl")
        self.file_path = path if path.endswith(".jsonl") else (
            path if self.sink == "tensorboard" else os.path.join(path, JSONL_NAME))
        self._file = None
        self._writer = None
        self._last_paths = None
        self._closed = False
        self.records = 0
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    # ------------------------------------------------------------------ what the optimizer calls
    def wants(self, step: int, rank: int) -> bool:
        """Whether the exchange of ``step`` on ``rank`` is recorded."""
        return rank == 0 and not self._closed and step % self.every == 0

    def record(self, stats, apply_s: float, residual_ratio: float | None, world_size: int, config=None) -> dict:
        """Write one step's record (``stats``: the engine's :class:`~hvd_qadam.engine.StepStats`)."""
        rec = {"step": stats.step, "rank": 0, "world_size": world_size, "time": time.time(),
               "sent_bytes": stats.sent_bytes, "received_bytes": stats.received_bytes,
               "fp32_bytes": stats.fp32_bytes, "ratio": stats.ratio,
               "encode_s": stats.encode_s, "exchange_s": stats.exchange_s, "decode_s": stats.decode_s,
               "apply_s": apply_s, "levels_s": stats.levels_s, "overlapped_groups": stats.overlapped_groups,
               "compressed": bool(stats.compressed), "topology": stats.topology,
               "residual_ratio": residual_ratio,
               "total_sent_bytes": stats.totals["sent_bytes"], "total_received_bytes": stats.totals["received_bytes"]}
        paths = getattr(stats, "group_paths", None)
        if paths:
            rec["group_paths"] = {str(k): str(v) for k, v in paths.items()}
        self._open(config, stats)
        if self.sink == "tensorboard":
            self._write_tensorboard(rec, stats)
        else:
            self._file.write(json.dumps(_finite(rec)) + "\n")
            self._file.flush()
        self.records += 1
        return rec

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ sinks
    def _open(self, config, stats) -> None:
        if self._file is not None or self._writer is not None:
            return
        header = {"config": config.as_dict() if config is not None else None, "topology": stats.topology,
                  "topology_reason": stats.topology_reason, "sink": self.sink}
        if self.sink == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
            self._writer = SummaryWriter(self.path, flush_secs=FLUSH_EVERY_S)
            self._writer.add_text("hvd_qadam/config", "```\n" + json.dumps(_finite(header), indent=1) + "\n```", 0)
            return
        folder = os.path.dirname(self.file_path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._file = open(self.file_path, "a", encoding="utf-8")
        self._file.write(json.dumps(_finite(header)) + "\n")

    def _write_tensorboard(self, rec: dict, stats) -> None:
        w, t = self._writer, rec["step"]
        for key in ("sent_bytes", "received_bytes", "fp32_bytes"):
            w.add_scalar(f"bytes/{key}", rec[key], t)
        if math.isfinite(rec["ratio"]):
            w.add_scalar("bytes/ratio_to_fp32", rec["ratio"], t)
        for key in ("encode_s", "exchange_s", "decode_s", "apply_s", "levels_s"):
            w.add_scalar(f"time/{key}", rec[key], t)
        w.add_scalar("exchange/compressed", int(rec["compressed"]), t)
        w.add_scalar("exchange/overlapped_groups", rec["overlapped_groups"], t)
        if rec["residual_ratio"] is not None and math.isfinite(rec["residual_ratio"]):
            w.add_scalar("error/residual_ratio", rec["residual_ratio"], t)
        paths = rec.get("group_paths")
        if paths:
            for g, path in paths.items():
                w.add_scalar(f"path/group_{g}_bits", path_bits(path), t)
            if paths != self._last_paths:
                w.add_text("hvd_qadam/group_paths", json.dumps(paths), t)
                self._last_paths = paths


def path_bits(path: str) -> float:
    """Bits per element a group's path sends: ``"qsgdinf:6"`` -> 6, ``"horovod"`` -> 32,
    ``"horovod:fp16"`` / ``"fp16"`` -> 16; NaN for a path it cannot read."""
    name, _, tail = path.partition(":")
    if tail.isdigit():
        return float(tail)
    if "fp16" in path:
        return 16.0
    if name in ("horovod", "none", "fp32"):
        return 32.0
    return float("nan")


def residual_ratio(engine, grad_bufs: dict) -> float | None:
    """||worker EF residuals|| / ||this step's local gradients of the compressed groups||
    (None without a residual; see the module). After a step through Horovod's allreduce in fp32
    the gradient buffers hold the mean (summed in place), so the ratio is against the mean there."""
    residuals = [e for key, e in engine.bank.items() if key.is_worker_residual]
    grads = [grad_bufs[g.index] for g in engine.layout.groups if g.compressed]
    if not residuals or not grads:
        return None
    # one float32 norm per buffer (no float64 copy of the model), one host sync for all of them
    norms = torch.stack([torch.linalg.vector_norm(t.float()).double() for t in residuals + grads]).square()
    res2, grad2 = (float(x) for x in (norms[:len(residuals)].sum(), norms[len(residuals):].sum()))
    return math.sqrt(res2 / grad2) if grad2 > 0 else float("inf")


def _finite(obj):
    """``obj`` with NaN/Inf floats as None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
