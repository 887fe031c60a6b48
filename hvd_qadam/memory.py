"""Error-feedback residual memory: p = v + e; q = Q(p); e = p - decode(q).

Residuals are fp32 and keyed by name (a parameter name for worker memory, a group/chunk key for
server memory). They live outside ``optimizer.state`` on purpose: Horovod elastic and
``broadcast_optimizer_state`` broadcast that, and residuals are per rank. A step first computes
new residuals, and commits them only once the exchange succeeded, so a failed step (NaN/Inf, a
malformed payload, a dead peer) leaves the memory exactly as it was.
"""
from __future__ import annotations

import warnings

import torch


class ResidualMemory:
    def __init__(self, world_size: int, topology: str = "allgather"):
        self.world_size = world_size
        self.topology = topology
        self._residuals: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._residuals

    def __len__(self) -> int:
        return len(self._residuals)

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The residual for ``name`` (zeros of ``like``'s shape the first time; not stored until commit)."""
        e = self._residuals.get(name)
        if e is None:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        if e.shape != like.shape:
            raise ValueError(f"residual {name!r} has shape {tuple(e.shape)} but the tensor now has "
                             f"{tuple(like.shape)}; reset the memory after changing the model")
        return e

    def compensate(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """p = v + e (a new tensor; the memory is not changed)."""
        return v.to(torch.float32) + self.get(name, v)

    def commit(self, updates: dict[str, torch.Tensor]) -> None:
        """Store new residuals, all or nothing."""
        for name, e in updates.items():
            self._residuals[name] = e.detach().to(torch.float32)

    def reset(self) -> None:
        self._residuals.clear()

    def norm(self) -> float:
        return float(sum(float(e.double().pow(2).sum()) for e in self._residuals.values()) ** 0.5)

    def state_dict(self) -> dict:
        return {"world_size": self.world_size, "topology": self.topology,
                "residuals": {k: v.clone() for k, v in self._residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        ws, topo = state.get("world_size"), state.get("topology", self.topology)
        if ws != self.world_size or topo != self.topology:
            warnings.warn(f"error-feedback residuals were saved for world size {ws} / topology {topo!r}; "
                          f"this run has {self.world_size} / {self.topology!r}: residuals reset to zero",
                          RuntimeWarning, stacklevel=2)
            self._residuals.clear()
            return
        self._residuals = {k: v.detach().to(torch.float32).clone() for k, v in state["residuals"].items()}
