"""Fuzzing the wire format: hostile bytes never escape as anything but PayloadError, never take
long, and never decode into something else than what was sent.

Three kinds of input, all from a fixed seed (every run sees the same inputs):

* random mutations of valid payloads (every quantizer) and frames (payloads, error texts, empty):
  byte flips, overwrites, bursts, insertions, deletions, truncations, extensions, splices. A
  mutated input differs from the original, so every one must be rejected -- or, were one ever
  accepted, decode to exactly the original content (the parser is canonical: what it accepts
  re-serialises to the same bytes, so "accepted" and "unchanged content" cannot both hold for
  changed bytes; the check is written out anyway);
* crafted inputs with VALID checksums (recomputed after editing fields): huge element counts,
  shape products that wrap around int64, bucket sizes 0 and > 2^31, bit widths, quantizer ids,
  flags, codebook lengths, dtypes, reserved fields, non-finite or negative scales, bad codebooks,
  out-of-range codes and padding bits, non-finite pass-through values (for bf16: every inf/NaN
  bit pattern refused, every finite one accepted), frame counts, lengths,
  flags and error texts. A checksum cannot tell a forged well-formed input from a genuine one, so
  the check is: inputs known to be invalid (out-of-range fields, wrapping shapes, non-finite
  values, bad codebooks, wrong lengths or counts, ...) are rejected, and anything accepted
  re-serialises to exactly the input and decodes quickly to finite values of its declared shape;
* gathered buffers (concatenated frames) with mutations, through ``split_frames``. Cutting the
  buffer exactly between two frames leaves fewer intact frames, which only the caller can notice
  (the engine compares the number of frames with the world size); anything else is rejected.

Each parse must take less than ``PARSE_BOUND_S``. The counts are printed (``pytest -s``).
"""
from __future__ import annotations

import math
import struct
import time
import zlib

import numpy as np
import pytest

from hvd_qadam import wire
from hvd_qadam.codec import dequantize, quantize
from hvd_qadam.quant import codebooks
from hvd_qadam.wire import Frame, Payload, PayloadError, split_frames

SEED = 20240611
PARSE_BOUND_S = 1.0
HDR = struct.Struct("<4sBBBBIQBBBBHHII")
(F_MAGIC, F_VERSION, F_QID, F_BITS, F_FLAGS, F_BUCKET, F_NUMEL, F_SCALE_DT, F_DTYPE, F_NDIM, F_R1, F_CBLEN, F_R2,
 F_BODY_CRC, F_HEAD_CRC) = range(15)
FRAME_HDR = struct.Struct("<4sBBHIQIQI")


# ------------------------------------------------------------------------------------------------
# inputs

def _payloads() -> list:
    """Valid payloads of every quantizer, at several widths, shapes, dtypes and buckets."""
    g = np.random.default_rng(SEED)
    out = []
    for name, k in sorted(codebooks.KINDS.items()):
        widths = [None] if k.fixed_bits is not None else sorted({k.min_bits, 3, k.max_bits})
        for bits in widths:
            b = k.check_bits(bits)
            cbk = codebooks.default_adaptive_codebook(b) if k.adaptive else None
            for shape, bucket, dtype in (((3, 7), 4, np.float32), ((13,), 5, np.float16), ((), 8, np.float64),
                                         ((2, 0, 3), 16, np.float32)):
                x = (g.standard_normal(shape) * 3).astype(dtype)
                out.append(quantize(x, name, bits, bucket, seed=int(g.integers(1 << 30)), codebook=cbk,
                                    rounding="nearest" if len(out) % 2 else "stochastic", backend="numpy"))
    return out


def _frames(payloads) -> list:
    g = np.random.default_rng(SEED + 1)
    frames = [Frame(rank=0, step=0, layout=0),
              Frame(rank=1, step=7, layout=0xABCDEF01, error="rank 1, step 7: non-finite gradient in fc.weight"),
              Frame(rank=2, step=2 ** 40, layout=5, error="gradient ✗ non-finite: ÿ€"),
              Frame(rank=3, step=1, layout=9, error="")]
    for _ in range(8):
        idx = g.choice(len(payloads), size=int(g.integers(1, 6)), replace=False)
        frames.append(Frame(rank=int(g.integers(64)), step=int(g.integers(1 << 40)), layout=int(g.integers(1 << 32)),
                            payloads=[payloads[i] for i in idx]))
    return frames


def _mutate(data: bytes, g: np.random.Generator) -> bytes:
    """One random mutation; the result always differs from ``data``."""
    n = len(data)
    while True:
        op = int(g.integers(10))
        b = bytearray(data)
        if op == 0:                                            # flip bits of one byte
            i = int(g.integers(n))
            b[i] ^= int(g.integers(1, 256))
        elif op == 1:                                          # overwrite a few random bytes
            for i in g.integers(n, size=int(g.integers(1, 5))):
                b[int(i)] = int(g.integers(256))
        elif op == 2:                                          # burst of random bytes
            i = int(g.integers(n))
            m = int(g.integers(1, 17))
            b[i:i + m] = g.integers(256, size=len(b[i:i + m]), dtype=np.uint8).tobytes()
        elif op == 3:                                          # truncate
            b = b[:int(g.integers(n))]
        elif op == 4:                                          # extend with random or zero bytes
            m = int(g.integers(1, 65))
            b += g.integers(256, size=m, dtype=np.uint8).tobytes() if g.integers(2) else bytes(m)
        elif op == 5:                                          # insert bytes
            i = int(g.integers(n + 1))
            b[i:i] = g.integers(256, size=int(g.integers(1, 9)), dtype=np.uint8).tobytes()
        elif op == 6:                                          # delete bytes
            i = int(g.integers(n))
            del b[i:i + int(g.integers(1, 9))]
        elif op == 7:                                          # swap two segments
            i, j = sorted(int(v) for v in g.integers(n, size=2))
            m = int(g.integers(1, 9))
            if j - i >= m:
                b[i:i + m], b[j:j + m] = data[j:j + m], data[i:i + m]
        elif op == 8:                                          # repeat a segment (extension from itself)
            i = int(g.integers(n))
            b[i:i] = data[i:i + int(g.integers(1, 64))]
        else:                                                  # set a 4/8-byte word to an extreme
            i = int(g.integers(max(1, n - 7)))
            b[i:i + 8] = (b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\xff",
                          b"\x00\x00\x80\x7f\x00\x00\xc0\x7f")[int(g.integers(4))][:len(b[i:i + 8])]
        if bytes(b) != data:
            return bytes(b)


# ------------------------------------------------------------------------------------------------
# checks

class Stats:
    def __init__(self, what):
        self.what, self.total, self.rejected, self.accepted, self.slowest = what, 0, 0, 0, 0.0
        self.must_reject = 0

    def __str__(self):
        known = f" ({self.must_reject} of them known-invalid, all rejected)" if self.must_reject else ""
        return (f"{self.what}: {self.total} inputs, {self.rejected} rejected with PayloadError{known}, "
                f"{self.accepted} accepted; slowest parse {1e3 * self.slowest:.2f} ms")


def _timed(stats: Stats, fn, *args, **kw):
    """fn(*args): the result, or None for a PayloadError (anything else propagates: a test failure)."""
    stats.total += 1
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kw)
    except PayloadError:
        out = None
    dt = time.perf_counter() - t0
    stats.slowest = max(stats.slowest, dt)
    assert dt < PARSE_BOUND_S, f"{stats.what}: a parse took {dt:.3f} s"
    if out is None:
        stats.rejected += 1
    else:
        stats.accepted += 1
    return out


def _decoded(p: Payload) -> np.ndarray:
    """The decoded values (reference decoder), which must be finite, of the payload's shape, and
    quick to get (a valid payload may declare buckets 2^31 wide over a few elements)."""
    t0 = time.perf_counter()
    y = np.asarray(dequantize(p, backend="numpy"))
    dt = time.perf_counter() - t0
    assert dt < PARSE_BOUND_S, f"decoding {p.numel} elements took {dt:.3f} s"
    assert y.shape == tuple(p.shape)
    assert np.isfinite(y).all()
    return y


def _same_payload(a: Payload, b: Payload) -> bool:
    if (a.quantizer, a.bits, a.bucket_size, a.numel, tuple(a.shape), a.stochastic, a.orig_dtype) != \
            (b.quantizer, b.bits, b.bucket_size, b.numel, tuple(b.shape), b.stochastic, b.orig_dtype):
        return False
    for f in ("scales", "codes", "codebook"):
        va, vb = getattr(a, f), getattr(b, f)
        na = va is None or va.size == 0
        nb = vb is None or vb.size == 0
        if na or nb:
            if not (na and nb):
                return False
        elif not (va.dtype == vb.dtype and va.tobytes() == vb.tobytes()):
            return False
    return np.array_equal(_decoded(a), _decoded(b))


def _same_frame(a: Frame, b: Frame) -> bool:
    return ((a.rank, a.step, a.layout, a.error, len(a.payloads)) == (b.rank, b.step, b.layout, b.error, len(b.payloads))
            and all(_same_payload(x, y) for x, y in zip(a.payloads, b.payloads)))


def _check_crafted_payload(stats, data, must_reject=False):
    """A PayloadError (required when ``must_reject``), or a well-formed payload after all: then it
    re-serialises to exactly ``data`` (the parser is canonical) and decodes cleanly."""
    p = _timed(stats, Payload.from_bytes, data)
    if must_reject:
        stats.must_reject += 1
        assert p is None, f"{stats.what}: accepted an input that must be rejected: {p}"
    if p is not None:
        assert p.to_bytes() == data
        _decoded(p)
    return p


def _check_crafted_frame(stats, data, must_reject=False):
    f = _timed(stats, Frame.from_bytes, data)
    if must_reject:
        stats.must_reject += 1
        assert f is None, f"{stats.what}: accepted a frame that must be rejected: {f}"
    if f is not None:
        assert f.to_bytes() == data
        for p in f.payloads:
            _decoded(p)
    return f


# ------------------------------------------------------------------------------------------------
# random mutations

@pytest.fixture(scope="module")
def corpus():
    payloads = _payloads()
    return payloads, _frames(payloads)


def test_random_mutations_of_payloads(corpus):
    payloads, _ = corpus
    g = np.random.default_rng(SEED + 2)
    stats = Stats("payload mutations")
    changed = 0
    for p in payloads:
        data = p.to_bytes()
        orig = Payload.from_bytes(data)
        for _ in range(250):
            q = _timed(stats, Payload.from_bytes, _mutate(data, g))
            if q is not None:
                changed += not _same_payload(q, orig)
    print(stats)
    assert changed == 0, f"{changed} mutated payloads accepted with changed content"
    assert stats.total >= 20000


def test_random_mutations_of_frames(corpus):
    _, frames = corpus
    g = np.random.default_rng(SEED + 3)
    stats = Stats("frame mutations")
    changed = 0
    for f in frames:
        data = f.to_bytes()
        orig = Frame.from_bytes(data)
        for _ in range(1500):
            h = _timed(stats, Frame.from_bytes, _mutate(data, g), source="fuzzed frame")
            if h is not None:
                changed += not _same_frame(h, orig)
    print(stats)
    assert changed == 0, f"{changed} mutated frames accepted with changed content"
    assert stats.total >= 15000


def test_random_mutations_of_gathered_buffers(corpus):
    """split_frames (by the frame headers) and then every frame."""
    _, frames = corpus
    g = np.random.default_rng(SEED + 4)
    blobs = [f.to_bytes() for f in frames]
    stats = Stats("gathered-buffer mutations")
    changed = 0

    def parse_all(buf):
        return [Frame.from_bytes(v) for v in split_frames(buf)]

    cut_at_boundary = 0
    for _ in range(400):
        idx = g.choice(len(blobs), size=int(g.integers(1, 5)), replace=False)
        buf = b"".join(blobs[i] for i in idx)
        want = [Frame.from_bytes(blobs[i]) for i in idx]
        for _ in range(10):
            m = _mutate(buf, g)
            got = _timed(stats, parse_all, m)
            if got is None:
                continue
            # Cutting the buffer exactly between frames leaves fewer, intact frames: split_frames
            # cannot tell; the caller compares the count with the world size.
            if len(got) < len(want) and m == buf[:len(m)]:
                cut_at_boundary += 1
            elif len(got) != len(want):
                changed += 1
                continue
            changed += not all(_same_frame(a, b) for a, b in zip(got, want))
    print(stats, f"({cut_at_boundary} of the accepted: cut between frames, every remaining frame intact)")
    assert changed == 0
    assert stats.accepted == cut_at_boundary


# ------------------------------------------------------------------------------------------------
# crafted inputs with valid checksums

def reseal(data: bytes, fields=None, body=None) -> bytes:
    f = list(HDR.unpack(data[:HDR.size]))
    for i, v in (fields or {}).items():
        f[i] = v
    if body is None:
        body = data[HDR.size:]
    f[F_BODY_CRC] = zlib.crc32(body)
    f[F_HEAD_CRC] = 0
    head = HDR.pack(*f)
    return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4])) + body


def _sections(p: Payload, data: bytes):
    """Offsets (in the body) of the dims, scales, codebook and codes sections."""
    s0 = 8 * len(p.shape)
    s1 = s0 + (p.scales.nbytes if p.scales is not None else 0)
    s2 = s1 + (p.codebook.nbytes if p.codebook is not None else 0)
    return data[HDR.size:], s0, s1, s2


U64 = [0, 1, 2, 3, 7, 131, 132, 133, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 60, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
U32 = [0, 1, 2, 3, 4, 5, 32, 511, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 32 - 1]
F32_BAD = [np.nan, np.inf, -np.inf, -1.0, -0.0, 3.4e38, 1e-45, -1e-45, 2.0, -2.0]


def test_crafted_payload_headers(corpus):
    payloads, _ = corpus
    g = np.random.default_rng(SEED + 5)
    stats = Stats("crafted payload headers")
    for p in payloads:
        data = p.to_bytes()
        edits = [{F_NUMEL: v} for v in U64] + [{F_BUCKET: v} for v in U32]
        edits += [{F_BITS: v} for v in range(0, 34)] + [{F_BITS: 255}]
        edits += [{F_QID: v} for v in range(0, 13)] + [{F_QID: 255}]
        edits += [{F_FLAGS: v} for v in range(0, 9)] + [{F_FLAGS: 255}]
        edits += [{F_CBLEN: v} for v in (0, 1, 2, 3, 4, 7, 8, 9, 255, 256, 257, 65535)]
        edits += [{F_NDIM: v} for v in (0, 1, 2, 3, 4, 255)]
        edits += [{F_SCALE_DT: v} for v in (1, 255)] + [{F_DTYPE: v} for v in range(0, 6)] + [{F_DTYPE: 255}]
        edits += [{F_R1: 1}, {F_R2: 1}, {F_R2: 65535}, {F_VERSION: 0}, {F_VERSION: 2}]
        edits += [{F_NUMEL: 0, F_NDIM: 0}, {F_BUCKET: 0, F_NUMEL: 0}]
        # random combinations of fields, still with valid checksums
        for _ in range(40):
            e = {}
            for field, lo, hi in ((F_QID, 0, 12), (F_BITS, 0, 40), (F_FLAGS, 0, 8), (F_BUCKET, 0, 1 << 32),
                                  (F_NUMEL, 0, 1 << 64), (F_NDIM, 0, 256), (F_CBLEN, 0, 300), (F_DTYPE, 0, 5)):
                if g.integers(3) == 0:
                    e[field] = int(g.integers(lo, hi, dtype=np.uint64)) if hi > 1 << 62 else int(g.integers(lo, hi))
            edits.append(e)
        head = HDR.unpack(data[:HDR.size])
        for e in edits:
            _check_crafted_payload(stats, reseal(data, e), _invalid_header_edit(p, head, e))
    print(stats)


def _invalid_header_edit(p: Payload, head: tuple, e: dict) -> bool:
    """Whether header edit ``e`` of payload ``p`` makes it invalid whatever the body holds."""
    e = {f: v for f, v in e.items() if v != head[f]}
    if not e:
        return False
    k = codebooks.KINDS_BY_ID.get(e.get(F_QID, head[F_QID]))
    if k is None:
        return True
    bits = e.get(F_BITS, head[F_BITS])
    bucket = e.get(F_BUCKET, head[F_BUCKET])
    flags = e.get(F_FLAGS, head[F_FLAGS])
    cb_len = e.get(F_CBLEN, head[F_CBLEN])
    return (not k.min_bits <= bits <= k.max_bits
            or flags & ~(wire.FLAG_STOCHASTIC | wire.FLAG_CODEBOOK)
            or bool(flags & wire.FLAG_CODEBOOK) != k.adaptive
            or (cb_len != 0) != k.adaptive or cb_len > 2 ** bits
            or (k.passthrough and (bucket != 0 or flags & wire.FLAG_STOCHASTIC))
            or (not k.passthrough and not 1 <= bucket <= 2 ** 31)
            or e.get(F_NUMEL, 0) >= 2 ** 60
            or e.get(F_NDIM, 0) > 32
            or any(f in e for f in (F_SCALE_DT, F_R1, F_R2, F_VERSION))
            or e.get(F_DTYPE, 0) > 3)


def test_crafted_payload_bodies(corpus):
    payloads, _ = corpus
    g = np.random.default_rng(SEED + 6)
    stats = Stats("crafted payload bodies")
    for p in payloads:
        data = p.to_bytes()
        body, s0, s1, s2 = _sections(p, data)
        crafted = []
        # shapes: wrapping products, zeros, huge dims, wrong ndim (header ndim follows)
        for shape in [(2 ** 32, 2 ** 32), (2, 2 ** 63 + p.numel // 2) if p.numel % 2 == 0 else (2 ** 64 - 1,),
                      (0,), (0, 2 ** 62), (0, 2 ** 60 - 1), (2 ** 64 - 1, 2 ** 64 - 1, 0), (p.numel, 1, 1),
                      (1,) * 200, (p.numel + 1,), (3, 6148914691236517206)]:
            bad = len(shape) > 32 or math.prod(d for d in shape if d) >= 2 ** 60
            crafted.append((reseal(data, {F_NDIM: len(shape)}, np.array(shape, "<u8").tobytes() + body[s0:]),
                            bad or math.prod(shape) != p.numel))
            # the same shape over an empty payload (no scales, no codes; the codebook stays)
            crafted.append((reseal(data, {F_NDIM: len(shape), F_NUMEL: 0},
                                   np.array(shape, "<u8").tobytes() + body[s1:s2]), bad or math.prod(shape) != 0))
        if p.scales is not None and p.scales.size:
            for v in F32_BAD:
                sc = p.scales.copy()
                sc[int(g.integers(sc.size))] = v
                crafted.append((reseal(data, body=body[:s0] + sc.astype("<f4").tobytes() + body[s1:]),
                                not (np.isfinite(v) and v >= 0)))
        if p.codebook is not None:
            for mod in range(8):
                cbk = p.codebook.copy()
                i = int(g.integers(cbk.size))
                if mod == 0:
                    cbk[[0, -1]] = cbk[[-1, 0]]                # unsorted
                elif mod == 1:
                    cbk[i] = cbk[i - 1] if i else cbk[1]       # duplicate level
                elif mod < 5:
                    cbk[i] = F32_BAD[mod - 2]                  # nan, inf, -inf
                elif mod == 5:
                    cbk[-1] = 1.0000001
                elif mod == 6:
                    cbk[0] = -1.5
                else:
                    cbk = np.sort(cbk)[::-1].copy()            # descending
                crafted.append((reseal(data, body=body[:s1] + cbk.astype("<f4").tobytes() + body[s2:]), True))
        if p.kind.name == "bf16" and p.numel:
            # bf16 values are uint16 bit patterns: every pattern with the exponent all ones (inf,
            # NaN of either sign, any payload) is refused, every other one (subnormals, -0, the
            # largest finite) is a valid value
            for v, bad in ((0x7F80, True), (0xFF80, True), (0x7FC0, True), (0x7F81, True), (0xFFFF, True),
                           (0x7F7F, False), (0xFF7F, False), (0x0001, False), (0x8000, False), (0x807F, False)):
                w = p.codes.astype("<u2")
                w[int(g.integers(w.size))] = v
                crafted.append((reseal(data, body=body[:s0] + w.tobytes()), bad))
        elif p.kind.passthrough and p.numel:
            vals = p.codes.copy()
            for v in (np.nan, np.inf, -np.inf):
                w = vals.copy()
                w[int(g.integers(w.size))] = v
                crafted.append((reseal(data, body=body[:s0] + w.tobytes()), True))
        elif p.numel:
            codes = bytearray(body[s2:])
            for _ in range(6):                                 # arbitrary code bytes (padding, range)
                c = bytearray(codes)
                c[int(g.integers(len(c)))] = int(g.integers(256))
                crafted.append((reseal(data, body=body[:s2] + bytes(c)), False))
            c = bytearray(codes)
            c[-1] = 0xFF                                       # padding bits (or a code out of range)
            crafted.append((reseal(data, body=body[:s2] + bytes(c)),
                            p.numel * p.bits % 8 != 0 or len(p.levels) < 2 ** p.bits))
        # trailing / missing bytes behind valid checksums (the body crc covers what is there)
        crafted.append((reseal(data, body=body + b"\0"), True))
        crafted.append((reseal(data, body=body[:-1]), True))
        for c, must_reject in crafted:
            _check_crafted_payload(stats, c, must_reject)
    print(stats)


def seal_frame(h: list, body: bytes) -> bytes:
    """Frame with header fields ``h`` and a valid frame checksum (frame format 2)."""
    head32 = FRAME_HDR.pack(*h[:-1], 0)[:32]
    if h[2] & wire.FRAME_ERROR:
        crc = zlib.crc32(head32 + body)
    else:
        crc, pos = zlib.crc32(head32), 0
        while pos < len(body):
            try:
                end = Payload.from_buffer(body, pos)[1]
            except PayloadError:
                break
            crc = zlib.crc32(body[pos:pos + 32], crc)
            pos = end
    return head32 + struct.pack("<I", crc) + body


def test_crafted_frames(corpus):
    payloads, frames = corpus
    g = np.random.default_rng(SEED + 7)
    stats = Stats("crafted frames")
    blobs = [p.to_bytes() for p in payloads]
    for f in frames:
        data = f.to_bytes()
        h = list(FRAME_HDR.unpack(data[:36]))
        body = data[36:]
        crafted = []
        lengths = [0, max(len(body) - 1, 0), len(body) + 1, 2 ** 63, 2 ** 64 - 1]
        for field, values in ((2, [0, 1, 2, 3, 0x80, 0xFF]), (3, [0, 1, 2, 5, 65535]), (7, lengths),
                              (1, [0, 1, 3, 255])):
            for v in values:
                h2 = h.copy()
                h2[field] = v
                bad = (field == 1 and v != 2) or (field == 7 and v != len(body)) or (field == 2 and v > 1)
                bad = bad or (field == 3 and v != h[3])           # the body holds h[3] payloads
                crafted.append((seal_frame(h2, body), bad))
        # payload sequences: shuffled, dropped, duplicated, foreign; counts and lengths consistent
        for _ in range(10):
            seq = [blobs[int(i)] for i in g.integers(len(blobs), size=int(g.integers(0, 5)))]
            b2 = b"".join(seq)
            h2 = h.copy()
            h2[2], h2[3], h2[7] = 0, len(seq), len(b2)
            crafted.append((seal_frame(h2, b2), False))
        # error texts: invalid UTF-8, payload bytes as text, with a count
        for text in (b"\xff", b"ok \xc3", b"\xed\xa0\x80", body[:50], "✓".encode()):
            h2 = h.copy()
            h2[2], h2[3], h2[7] = wire.FRAME_ERROR, 0, len(text)
            try:
                text.decode("utf-8")
                valid = True
            except UnicodeDecodeError:
                valid = False
            crafted.append((seal_frame(h2, text), not valid))
            h2[3] = 1
            crafted.append((seal_frame(h2, text), True))
        for c, must_reject in crafted:
            _check_crafted_frame(stats, c, must_reject)
    print(stats)


def test_arbitrary_bytes_are_rejected():
    """Random blobs and structured junk (right magics, nothing else) are rejected quickly."""
    g = np.random.default_rng(SEED + 8)
    stats = Stats("arbitrary bytes")
    for _ in range(2000):
        n = int(g.integers(0, 200))
        blob = g.integers(256, size=n, dtype=np.uint8).tobytes()
        for prefix in (b"", b"HQAD\x01", b"HQFR\x02"):
            assert _timed(stats, Payload.from_bytes, prefix + blob) is None
            assert _timed(stats, Frame.from_bytes, prefix + blob) is None
    print(stats)
