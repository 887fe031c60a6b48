"""Wire format: a versioned, checksummed, self-delimiting payload, and the frame one rank sends.

Payload = header (struct ``_HEADER``) + body. Body = dims (ndim x u64) + scales (f32 per bucket)
+ codebook (f32 x K, adaptive quantizers only) + packed codes; for the pass-throughs (none, fp16)
the body is dims + the raw little-endian values. Everything that can be wrong with bytes from
the network is checked before decoding: magic, version, header and body CRC32, quantizer id,
bit width, bucket size, lengths, codebook shape and order, finite non-negative scales.

Frame = what one rank sends per step and group: a small header (rank, step, layout hash, flags)
and a sequence of payloads, or an error report in place of payloads (so that a rank with bad
gradients tells every peer instead of leaving them waiting).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .quant import codebooks as cb
from .quant.reference import num_buckets, packed_nbytes


class PayloadError(ValueError):
    """Bytes that are not a valid payload or frame; the message says which field is wrong."""


MAGIC = b"HQAD"
VERSION = 1
# magic, version, quantizer id, bits, flags, bucket size, numel, scale dtype, orig dtype, ndim,
# reserved, codebook length, reserved, body crc32, header crc32 (of the bytes before it)
_HEADER = struct.Struct("<4sBBBBIQBBBBHHII")
HEADER_SIZE = _HEADER.size
FLAG_STOCHASTIC = 1
FLAG_CODEBOOK = 2

SCALE_FLOAT32 = 0
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}


def _host(a):
    """A NumPy view of ``a``; GPU (CuPy) arrays are copied to the host first."""
    return a.get() if type(a).__module__.startswith("cupy") else a


@dataclass
class Payload:
    """One quantized (or passed-through) tensor. ``nbytes`` is its exact size on the wire."""
    quantizer: str
    bits: int
    bucket_size: int
    numel: int
    shape: tuple
    scales: np.ndarray | None          # float32 [num_buckets]; None for pass-throughs
    codes: np.ndarray                  # packed uint8 codes, or raw values for pass-throughs
    codebook: np.ndarray | None = None  # float32 [K], adaptive quantizers only
    stochastic: bool = False
    orig_dtype: str = "float32"
    # Not on the wire: how dequantize() should hand the result back (numpy, or a torch device).
    array_kind: object = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> cb.QuantizerKind:
        return cb.kind(self.quantizer)

    @property
    def levels(self) -> np.ndarray:
        return self.codebook if self.codebook is not None else cb.codebook(self.quantizer, self.bits)

    @property
    def body_nbytes(self) -> int:
        n = 8 * len(self.shape) + self.codes.nbytes
        if self.scales is not None:
            n += self.scales.nbytes
        if self.codebook is not None:
            n += self.codebook.nbytes
        return n

    @property
    def nbytes(self) -> int:
        return HEADER_SIZE + self.body_nbytes

    def to_bytes(self) -> bytes:
        parts = [np.asarray(self.shape, dtype="<u8").tobytes()]
        if self.scales is not None:
            parts.append(np.ascontiguousarray(_host(self.scales), dtype="<f4").tobytes())
        if self.codebook is not None:
            parts.append(np.ascontiguousarray(_host(self.codebook), dtype="<f4").tobytes())
        parts.append(np.ascontiguousarray(_host(self.codes)).tobytes())
        body = b"".join(parts)
        flags = (FLAG_STOCHASTIC if self.stochastic else 0) | (FLAG_CODEBOOK if self.codebook is not None else 0)
        head = _HEADER.pack(MAGIC, VERSION, self.kind.wire_id, self.bits, flags, self.bucket_size, self.numel,
                            SCALE_FLOAT32, DTYPE_CODES[self.orig_dtype], len(self.shape), 0,
                            0 if self.codebook is None else self.codebook.size, 0, zlib.crc32(body), 0)
        head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
        return head + body

    @classmethod
    def from_bytes(cls, data) -> "Payload":
        payload, end = cls.from_buffer(data, 0)
        if end != len(memoryview(data).cast("B")):
            raise PayloadError(f"payload: {len(memoryview(data).cast('B')) - end} trailing bytes after the body")
        return payload

    @classmethod
    def from_buffer(cls, data, offset: int = 0) -> tuple["Payload", int]:
        """Parse and validate the payload starting at ``offset``; returns it and the offset after it."""
        buf = memoryview(data).cast("B")
        where = f"payload at byte {offset}"
        if len(buf) - offset < HEADER_SIZE:
            raise PayloadError(f"{where}: truncated header ({len(buf) - offset} of {HEADER_SIZE} bytes)")
        raw = bytes(buf[offset:offset + HEADER_SIZE])
        (magic, version, qid, bits, flags, bucket, numel, scale_dt, dt, ndim, _r1, cb_len, _r2, body_crc,
         head_crc) = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise PayloadError(f"{where}: bad magic {magic!r} (expected {MAGIC!r}); not an hvd_qadam payload")
        if version != VERSION:
            raise PayloadError(f"{where}: unsupported format version {version} (this build reads {VERSION})")
        if zlib.crc32(raw[:-4]) != head_crc:
            raise PayloadError(f"{where}: header checksum mismatch (corrupted header)")
        if qid not in cb.KINDS_BY_ID:
            raise PayloadError(f"{where}: unknown quantizer id {qid}")
        kind = cb.KINDS_BY_ID[qid]
        try:
            kind.check_bits(bits)
        except cb.QuantizerError as e:
            raise PayloadError(f"{where}: {e}") from None
        if scale_dt != SCALE_FLOAT32:
            raise PayloadError(f"{where}: unknown scale dtype code {scale_dt}")
        if dt not in DTYPE_NAMES:
            raise PayloadError(f"{where}: unknown original dtype code {dt}")
        has_cb = bool(flags & FLAG_CODEBOOK)
        if has_cb != kind.adaptive:
            raise PayloadError(f"{where}: quantizer {kind.name!r} "
                               f"{'needs' if kind.adaptive else 'must not carry'} a codebook")
        if has_cb and not 2 <= cb_len <= 2 ** bits:
            raise PayloadError(f"{where}: codebook length {cb_len} invalid for {bits} bits")
        if not kind.passthrough and bucket == 0:
            raise PayloadError(f"{where}: bucket size 0")
        # Body length follows from the header alone.
        if kind.passthrough:
            nb, code_bytes = 0, numel * (4 if kind.name == "none" else 2)
        else:
            nb, code_bytes = num_buckets(numel, bucket), packed_nbytes(numel, bits)
        body_len = 8 * ndim + 4 * nb + (4 * cb_len if has_cb else 0) + code_bytes
        start = offset + HEADER_SIZE
        if len(buf) - start < body_len:
            raise PayloadError(f"{where}: truncated body ({len(buf) - start} of {body_len} bytes for "
                               f"{numel} elements at {bits} bits)")
        body = buf[start:start + body_len]
        if zlib.crc32(body) != body_crc:
            raise PayloadError(f"{where}: body checksum mismatch (corrupted data)")
        pos = 0
        shape = tuple(int(d) for d in np.frombuffer(body, dtype="<u8", count=ndim, offset=pos))
        pos += 8 * ndim
        if int(np.prod(shape, dtype=np.int64)) != numel:
            raise PayloadError(f"{where}: shape {shape} does not hold {numel} elements")
        scales = codebook = None
        if not kind.passthrough:
            scales = np.frombuffer(body, dtype="<f4", count=nb, offset=pos).copy()
            pos += 4 * nb
            if not np.all(np.isfinite(scales)) or np.any(scales < 0):
                raise PayloadError(f"{where}: scales must be finite and non-negative")
        if has_cb:
            codebook = np.frombuffer(body, dtype="<f4", count=cb_len, offset=pos).copy()
            pos += 4 * cb_len
            try:
                cb.validate_codebook(codebook, bits)
            except cb.QuantizerError as e:
                raise PayloadError(f"{where}: {e}") from None
        if kind.passthrough:
            codes = np.frombuffer(body, dtype="<f4" if kind.name == "none" else "<f2", count=numel, offset=pos).copy()
        else:
            codes = np.frombuffer(body, dtype=np.uint8, count=code_bytes, offset=pos).copy()
            n_levels = cb_len if has_cb else cb.codebook(kind.name, bits).size
            bad = _first_code_out_of_range(codes, bits, numel, n_levels)
            if bad is not None:
                raise PayloadError(f"{where}: code {bad[1]} of element {bad[0]} is outside the {n_levels}-level "
                                   "codebook")
        p = cls(kind.name, bits, bucket, numel, shape, scales, codes, codebook, bool(flags & FLAG_STOCHASTIC),
                DTYPE_NAMES[dt])
        return p, start + body_len


def _first_code_out_of_range(packed: np.ndarray, bits: int, n: int, n_levels: int):
    """(index, code) of the first packed code >= n_levels, or None. Codes that fill a byte evenly
    (1, 2, 4, 8 bits) are checked with a per-byte lookup table, the others by unpacking."""
    if n_levels >= 1 << bits or n == 0:
        return None
    if 8 % bits == 0:
        per = 8 // bits
        fields = (np.arange(256)[:, None] >> (bits * np.arange(per))) & ((1 << bits) - 1)
        bad_byte = (fields >= n_levels).any(axis=1)
        # A byte histogram is one fast pass; locate the culprit only when there is one.
        if not np.bincount(packed, minlength=256)[bad_byte].any():
            return None
        b = int(np.flatnonzero(bad_byte[packed])[0])
        field = int(np.flatnonzero(fields[packed[b]] >= n_levels)[0])
        return b * per + field, int(fields[packed[b], field])
    from .quant.reference import unpack_codes
    codes = unpack_codes(packed, bits, n)
    hits = np.flatnonzero(codes >= n_levels)
    return None if hits.size == 0 else (int(hits[0]), int(codes[hits[0]]))


# ---------------------------------------------------------------------------------------------
FRAME_MAGIC = b"HQFR"
# magic, version, flags, payload count, rank, step, layout hash, body length, header crc
_FRAME = struct.Struct("<4sBBHIQIQI")
FRAME_HEADER_SIZE = _FRAME.size
FRAME_ERROR = 1


@dataclass
class Frame:
    """What one rank sends for one exchange: payloads, or an error report in their place."""
    rank: int
    step: int
    layout: int                      # hash of (names, shapes, config): equal on all ranks or it is a bug
    payloads: list = field(default_factory=list)
    error: str | None = None

    def to_bytes(self) -> bytes:
        if self.error is not None:
            body = self.error.encode("utf-8", "replace")
            count, flags = 0, FRAME_ERROR
        else:
            body = b"".join(p.to_bytes() for p in self.payloads)
            count, flags = len(self.payloads), 0
        head = _FRAME.pack(FRAME_MAGIC, VERSION, flags, count, self.rank, self.step, self.layout, len(body), 0)
        return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4])) + body

    @classmethod
    def from_bytes(cls, data, source: str = "frame") -> "Frame":
        buf = memoryview(data).cast("B")
        if len(buf) < FRAME_HEADER_SIZE:
            raise PayloadError(f"{source}: truncated frame header ({len(buf)} bytes)")
        raw = bytes(buf[:FRAME_HEADER_SIZE])
        magic, version, flags, count, rank, step, layout, body_len, crc = _FRAME.unpack(raw)
        if magic != FRAME_MAGIC:
            raise PayloadError(f"{source}: bad frame magic {magic!r}")
        if version != VERSION:
            raise PayloadError(f"{source}: unsupported frame version {version}")
        if zlib.crc32(raw[:-4]) != crc:
            raise PayloadError(f"{source}: frame header checksum mismatch")
        if len(buf) != FRAME_HEADER_SIZE + body_len:
            raise PayloadError(f"{source}: frame says {body_len} body bytes, got {len(buf) - FRAME_HEADER_SIZE}")
        body = buf[FRAME_HEADER_SIZE:]
        if flags & FRAME_ERROR:
            return cls(rank, step, layout, error=bytes(body).decode("utf-8", "replace"))
        payloads, pos = [], 0
        for i in range(count):
            try:
                p, pos = Payload.from_buffer(body, pos)
            except PayloadError as e:
                raise PayloadError(f"{source} (rank {rank}, step {step}), payload {i}: {e}") from None
            payloads.append(p)
        if pos != len(body):
            raise PayloadError(f"{source}: {len(body) - pos} trailing bytes after {count} payloads")
        return cls(rank, step, layout, payloads)


def split_frames(buf, lengths=None) -> list:
    """Cut a concatenation of frames (as an allgather returns it) into one view per frame, by the
    given lengths or, without them, by each frame header's body length."""
    mv = memoryview(buf).cast("B")
    out, pos = [], 0
    if lengths is None:
        while pos < len(mv):
            if len(mv) - pos < FRAME_HEADER_SIZE:
                raise PayloadError(f"gathered buffer: truncated frame header at byte {pos}")
            magic, *_rest, body_len, _crc = _FRAME.unpack(bytes(mv[pos:pos + FRAME_HEADER_SIZE]))
            if magic != FRAME_MAGIC:
                raise PayloadError(f"gathered buffer: bad frame magic {magic!r} at byte {pos}")
            lengths_n = FRAME_HEADER_SIZE + body_len
            out.append(mv[pos:pos + lengths_n])
            pos += lengths_n
    else:
        for n in lengths:
            out.append(mv[pos:pos + n])
            pos += n
    if pos != len(mv):
        raise PayloadError(f"gathered buffer has {len(mv)} bytes, frames account for {pos}")
    return out
