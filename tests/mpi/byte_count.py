"""The exact bytes a rank sends in one step, counted from the frame layout (wire.py), so that a
test can read off the bytes per element of the pass-through payloads from ``communication_stats``.

A group through Horovod's allreduce sends a ring's volume, 2 (N - 1)/N x n x (bytes per element).
A frame is a 36-byte header and its payloads (sharded: a frame per group and peer on the uplink,
one frame with every group's chunk on the downlink); a payload is a 36-byte header, 8 bytes per
dimension (the engine's are flat: 1) and its body: ``n x (bytes per element)`` for a
pass-through, one float32 scale per bucket and ``ceil(n bits / 8)`` code bytes otherwise.
"""
from __future__ import annotations

from types import SimpleNamespace

FRAME_HEADER = 36
PAYLOAD_HEADER = 36 + 8


def _payload(link, n: int, passthrough_bpe: float) -> float:
    if link.passthrough:
        return PAYLOAD_HEADER + n * passthrough_bpe
    return PAYLOAD_HEADER + 4 * -(-n // link.bucket_size) + -(-n * link.bits // 8)


def sent_bytes(opt, passthrough_bpe: float) -> float:
    """What ``opt``'s rank sent in its last step if pass-through values took ``passthrough_bpe``
    bytes each (allgather and sharded topologies)."""
    eng = opt.engine
    stats = opt.communication_stats
    n_ranks, me = eng.size, eng.rank
    total, downlink_frame = 0.0, False
    for g in eng.layout.groups:
        up, down = eng.links(g, SimpleNamespace(compress=stats.compressed, full_precision=stats.exchange == "horovod"))
        if stats.group_paths.get(g.index) == "horovod":     # Horovod's allreduce: a ring's volume
            total += 2 * (n_ranks - 1) * g.numel * int(passthrough_bpe) // n_ranks
        elif stats.topology == "allgather":
            total += (n_ranks - 1) * (FRAME_HEADER + _payload(up, g.numel, passthrough_bpe))
        elif stats.topology == "sharded":
            bounds = eng.bounds[g.index]
            total += sum(FRAME_HEADER + _payload(up, b - a, passthrough_bpe)
                         for c, (a, b) in enumerate(bounds) if c != me)
            a, b = bounds[me]
            total += (n_ranks - 1) * _payload(down, b - a, passthrough_bpe)
            downlink_frame = True
        else:
            raise NotImplementedError(f"byte count for topology {stats.topology!r}")
    # the sharded downlink: one frame holds every group's chunk
    return total + (n_ranks - 1) * FRAME_HEADER * downlink_frame


def passthrough_bytes_per_element(opt) -> float:
    """Bytes per element of the last step's pass-through payloads, from ``communication_stats``:
    the width (1, 2, 4 or 8 bytes) whose exact count is what the rank sent."""
    if sent_bytes(opt, 1.0) == sent_bytes(opt, 0.0):
        raise ValueError("the last step sent no pass-through payload")
    sent = opt.communication_stats.sent_bytes
    for width in (1.0, 2.0, 4.0, 8.0):
        if sent_bytes(opt, width) == sent:
            return width
    raise ValueError(f"{sent} bytes sent match no pass-through width")
