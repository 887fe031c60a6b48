"""Persistent, double-buffered state: error-feedback residuals, moments, momentum buffers.

Every piece of per-rank algorithm state is a flat float32 buffer with a key (``"g0.e"``: worker
residual of fused group 0; ``"g0.m"``: worker Adam moment; ``"g0@512.v"``: the server's second
moment of the shard starting at element 512). A step never writes the current buffers: it writes
the new values into a spare buffer of the same size (allocated once, then reused), and
:meth:`StateBank.commit` swaps current and spare only after the whole exchange succeeded. A failed
step (NaN/Inf, a malformed payload, a failed peer) therefore leaves the state exactly as it was,
and a steady-state step allocates nothing of the model's size.

Residuals live outside ``optimizer.state`` on purpose: Horovod's ``broadcast_optimizer_state``
broadcasts that, and residuals are per rank.
"""
from __future__ import annotations

import torch


def persistent_buffer(store: dict, key: str, numel: int, device, dtype=torch.float32) -> torch.Tensor:
    """``store[key]``: a ``dtype`` (float32) buffer of ``numel`` elements on ``device``, allocated
    the first time (or when the size, device or dtype changed) and reused after that."""
    t = store.get(key)
    if t is None or t.numel() != numel or t.device != torch.device(device) or t.dtype != dtype:
        t = store[key] = torch.empty(numel, dtype=dtype, device=device)
    return t


class StateBank:
    def __init__(self):
        self.current: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        return self.current.get(key)

    def get_or_zeros(self, key: str, numel: int, device) -> torch.Tensor:
        """The current buffer, or zeros the first time (kept as the current value: zeros are
        what an absent residual or moment means, and they are never written in place)."""
        t = self.current.get(key)
        if t is None:
            t = self.current[key] = torch.zeros(numel, dtype=torch.float32, device=device)
        elif t.numel() != numel:
            raise ValueError(f"state {key!r} has {t.numel()} elements, this model needs {numel}; the checkpoint "
                             "or the model changed")
        return t

    def spare(self, key: str, numel: int, device) -> torch.Tensor:
        """The buffer the next value of ``key`` is written into (not the current one)."""
        return persistent_buffer(self._spare, key, numel, device)

    def commit(self, keys) -> None:
        """Make the spare buffers of ``keys`` current (all or nothing: called after success)."""
        for k in keys:
            new = self._spare.pop(k)
            old = self.current.get(k)
            self.current[k] = new
            if old is not None:
                self._spare[k] = old

    def set(self, key: str, value: torch.Tensor) -> None:
        self.current[key] = value

    def clear(self, prefix_filter=None) -> None:
        for k in [k for k in self.current if prefix_filter is None or prefix_filter(k)]:
            del self.current[k]
            self._spare.pop(k, None)

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.current.items()}

    def load_state_dict(self, state: dict) -> None:
        self.current = {k: v.detach().to(torch.float32).clone().reshape(-1) for k, v in state.items()}
        self._spare = {}
