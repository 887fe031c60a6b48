"""How parameters are fused into a few flat buffers, and how a buffer is sharded over ranks.

Groups never mix torch param_groups (each group has one lr, betas, ...); tensors smaller than
``min_compress_numel`` share one uncompressed group. Parameters are taken in *reverse*
registration order, as PyTorch DDP buckets them: backward produces the last layers' gradients
first, so the first group is complete (and its exchange can start) while earlier layers are
still in backward. Where float64 parameters travel uncompressed (``Config.exact_float64``) they get
groups of their own, held in float64, so they are averaged exactly as Horovod averages them; all
other groups are float32. Parameters whose full-precision values travel in another wire type
(``Config.passthrough_wire``: bf16 or fp16) are grouped apart from the others, so that a
group's pass-through payloads have one type (``Group.wire``) and a float32 parameter is never
rounded to 2 bytes because it shares a group with bf16 ones. The layout hash goes into every
frame, so ranks whose models differ are caught instead of exchanging misaligned bytes.
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
    dtype: torch.dtype = torch.float32     # of its buffers: float64 only for exact float64 groups
    wire: str = "none"               # the pass-through quantizer of its full-precision values

    def add(self, name: str, p: torch.Tensor) -> None:
        self.slots.append(Slot(name, p, self.numel, p.numel()))
        self.numel += p.numel()

    @property
    def device(self):
        return self.slots[0].param.device

    def flatten(self, tensors: dict) -> torch.Tensor:
        """Concatenate ``tensors[name]`` of every slot into one vector of the group's dtype."""
        return torch.cat([tensors[s.name].reshape(-1).to(self.dtype) for s in self.slots])

    def views(self, flat: torch.Tensor) -> dict:
        return {s.name: flat[s.offset:s.offset + s.numel].view_as(s.param) for s in self.slots}


class Layout:
    def __init__(self, param_groups: list, names: dict, min_compress_numel: int, fusion_threshold_bytes: int,
                 exact_float64=None, passthrough_wire=None):
        """``exact_float64(compressed) -> bool`` (``Config.exact_float64``): whether float64
        parameters of such a group are kept in float64 groups of their own (default: never).
        ``passthrough_wire(str(dtype)) -> quantizer`` (``Config.passthrough_wire``): how a
        parameter's full-precision values travel (default: ``"none"``, float32)."""
        self.groups: list[Group] = []
        limit = max(1, fusion_threshold_bytes // 4)
        self.names_by_group = [[names[p] for p in pg["params"] if p.requires_grad] for pg in param_groups]
        # (name, shape, dtype) in registration order: what a user compares when models differ
        self.param_signature = [(names[p], tuple(p.shape), str(p.dtype)) for pg in param_groups
                                for p in pg["params"] if p.requires_grad]
        def kind_of(p, compressed: bool) -> tuple:
            """(buffer dtype, wire) of the group parameter ``p`` belongs in."""
            if p.dtype == torch.float64 and exact_float64 is not None and exact_float64(compressed):
                return torch.float64, "none"
            return torch.float32, "none" if passthrough_wire is None else passthrough_wire(str(p.dtype))

        for gi, pg in reversed(list(enumerate(param_groups))):
            small = {}                   # (dtype, wire) -> the uncompressed group
            current = {}                 # (dtype, wire) -> the compressed group being filled
            for p in reversed(pg["params"]):
                if not p.requires_grad:
                    continue
                name = names[p]
                if p.numel() < min_compress_numel:
                    dt, wire = key = kind_of(p, False)
                    small.setdefault(key, Group(-1, gi, compressed=False, dtype=dt, wire=wire)).add(name, p)
                    continue
                dt, wire = key = kind_of(p, True)
                # the group's size limit counts float32 elements (fusion_threshold_bytes / 4)
                cur = current.get(key)
                if cur is None or (cur.numel and cur.numel + p.numel() > limit):
                    cur = current[key] = Group(-1, gi, compressed=True, dtype=dt, wire=wire)
                    self.groups.append(cur)
                cur.add(name, p)
            # float32 before float64 (the order of earlier releases), then by wire type
            self.groups.extend(small[k] for k in sorted(small, key=lambda k: (k[0] == torch.float64, k[1])))
        for i, g in enumerate(self.groups):
            g.index = i
        self.signature = [(s.name, tuple(s.param.shape), str(s.param.dtype), g.index, g.compressed)
                          + ((str(g.dtype),) if g.dtype != torch.float32 else ())
                          + ((g.wire,) if g.wire != "none" else ())
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
