"""Persistent, double-buffered state: error-feedback residuals, moments, momentum buffers.

Every piece of per-rank algorithm state is a flat float32 buffer named by a
:class:`~hvd_qadam.statekey.StateKey` (``g0.e``: worker residual of fused group 0; ``g0.m``: worker
Adam moment; ``g0@512.v``: the server's second moment of the shard starting at element 512). A step never writes the current buffers: it writes
the new values into a spare buffer of the same size (allocated once, then reused), and
:meth:`StateBank.commit` swaps current and spare only after the whole exchange succeeded. A failed
step (NaN/Inf, a malformed payload, a failed peer) therefore leaves the state exactly as it was,
and a steady-state step allocates nothing of the model's size.

Residuals live outside ``optimizer.state`` on purpose: Horovod's ``broadcast_optimizer_state``
broadcasts that, and residuals are per rank.
"""
from __future__ import annotations

import torch

from .statekey import StateKey


def persistent_buffer(store: dict, key: str, numel: int, device, dtype=torch.float32) -> torch.Tensor:
    """``store[key]``: a ``dtype`` (float32) buffer of ``numel`` elements on ``device``, allocated
    the first time (or when the size, device or dtype changed) and reused after that."""
    t = store.get(key)
    if t is None or t.numel() != numel or t.device != torch.device(device) or t.dtype != dtype:
        t = store[key] = torch.empty(numel, dtype=dtype, device=device)
    return t


def _name(key: StateKey | str) -> str:
    """The string form of ``key``; a string (an algorithm registered from outside the package may
    name its state so) must be a state key's name, so that what it is can be read back."""
    return key.name if isinstance(key, StateKey) else StateKey.parse(key).name


class StateBank:
    """Current and spare buffers by :class:`StateKey` (or its name). ``current`` maps each key's string form
    (:attr:`StateKey.name`, the form ``state_dict()`` writes) to its current buffer."""

    def __init__(self):
        self.current: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}

    def get(self, key: StateKey) -> torch.Tensor | None:
        return self.current.get(_name(key))

    def get_or_zeros(self, key: StateKey, numel: int, device) -> torch.Tensor:
        """The current buffer, or zeros the first time (kept as the current value: zeros are
        what an absent residual or moment means, and they are never written in place)."""
        name = _name(key)
        t = self.current.get(name)
        if t is None:
            t = self.current[name] = torch.zeros(numel, dtype=torch.float32, device=device)
        elif t.numel() != numel:
            raise ValueError(f"state {name!r} has {t.numel()} elements, this model needs {numel}; the checkpoint "
                             "or the model changed")
        return t

    def spare(self, key: StateKey, numel: int, device) -> torch.Tensor:
        """The buffer the next value of ``key`` is written into (not the current one)."""
        return persistent_buffer(self._spare, _name(key), numel, device)

    def commit(self, keys) -> None:
        """Make the spare buffers of ``keys`` current (all or nothing: called after success)."""
        for k in map(_name, keys):
            new = self._spare.pop(k)
            old = self.current.get(k)
            self.current[k] = new
            if old is not None:
                self._spare[k] = old

    def set(self, key: StateKey, value: torch.Tensor) -> None:
        self.current[_name(key)] = value

    def items(self):
        """(StateKey, current buffer) of every piece of state."""
        return [(StateKey.parse(k), v) for k, v in self.current.items()]

    def clear(self, where=None) -> None:
        """Drop the state whose key satisfies ``where(StateKey)`` (all of it without ``where``)."""
        for k in [k for k in self.current if where is None or where(StateKey.parse(k))]:
            del self.current[k]
            self._spare.pop(k, None)

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.current.items()}

    def load_state_dict(self, state: dict) -> None:
        for k in state:
            StateKey.parse(k)            # a clear error for a key this version does not know
        self.current = {k: v.detach().to(torch.float32).clone().reshape(-1) for k, v in state.items()}
        self._spare = {}
