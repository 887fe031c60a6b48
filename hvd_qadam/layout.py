"""How parameters are fused into a few flat buffers, and how a buffer is sharded over ranks.

Groups never mix torch param_groups (each group has one lr, betas, ...); tensors smaller than
``min_compress_numel`` share one uncompressed group. Parameters are taken in *reverse*
registration order, as PyTorch DDP buckets them: backward produces the last layers' gradients
first, so the first group is complete (and its exchange can start) while earlier layers are
still in backward. The layout hash goes into every frame, so
ranks whose models differ are caught instead of exchanging misaligned bytes.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from math import lcm

import torch


@dataclass
class Slot:
    name: str
    param: torch.Tensor
    offset: int
    numel: int


@dataclass
class Group:
    index: int
    param_group: int                 # index into optimizer.param_groups
    compressed: bool
    slots: list = field(default_factory=list)
    numel: int = 0

    def add(self, name: str, p: torch.Tensor) -> None:
        self.slots.append(Slot(name, p, self.numel, p.numel()))
        self.numel += p.numel()

    @property
    def device(self):
        return self.slots[0].param.device

    def flatten(self, tensors: dict) -> torch.Tensor:
        """Concatenate ``tensors[name]`` of every slot into one float32 vector."""
        return torch.cat([tensors[s.name].reshape(-1).to(torch.float32) for s in self.slots])

    def views(self, flat: torch.Tensor) -> dict:
        return {s.name: flat[s.offset:s.offset + s.numel].view_as(s.param) for s in self.slots}


class Layout:
    def __init__(self, param_groups: list, names: dict, min_compress_numel: int, fusion_threshold_bytes: int):
        self.groups: list[Group] = []
        limit = max(1, fusion_threshold_bytes // 4)
        self.names_by_group = [[names[p] for p in pg["params"] if p.requires_grad] for pg in param_groups]
        # (name, shape, dtype) in registration order: what a user compares when models differ
        self.param_signature = [(names[p], tuple(p.shape), str(p.dtype)) for pg in param_groups
                                for p in pg["params"] if p.requires_grad]
        for gi, pg in reversed(list(enumerate(param_groups))):
            small = Group(-1, gi, compressed=False)
            current = None
            for p in reversed(pg["params"]):
                if not p.requires_grad:
                    continue
                name = names[p]
                if p.numel() < min_compress_numel:
                    small.add(name, p)
                    continue
                if current is None or (current.numel and current.numel + p.numel() > limit):
                    current = Group(-1, gi, compressed=True)
                    self.groups.append(current)
                current.add(name, p)
            if small.slots:
                self.groups.append(small)
        for i, g in enumerate(self.groups):
            g.index = i
        self.signature = [(s.name, tuple(s.param.shape), str(s.param.dtype), g.index, g.compressed)
                          for g in self.groups for s in g.slots]
        self.hash = zlib.crc32(repr(self.signature).encode())

    def params(self):
        for g in self.groups:
            for s in g.slots:
                yield s.name, s.param


def shard_bounds(numel: int, world_size: int, align: int) -> list:
    """[(start, stop)] of each rank's chunk: bucket-aligned so that chunked quantization equals
    quantizing the whole vector; chunks at the end may be empty."""
    per = -(-numel // world_size)
    per = -(-per // align) * align
    return [(min(r * per, numel), min((r + 1) * per, numel)) for r in range(world_size)]


def shard_alignment(*bucket_sizes: int) -> int:
    return lcm(*[max(1, b) for b in bucket_sizes])
