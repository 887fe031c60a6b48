"""Wire format: a versioned, checksummed, self-delimiting payload, and the frame one rank sends.

Payload = header (struct ``_HEADER``) + body. Body = dims (ndim x u64) + scales (f32 per bucket)
+ codebook (f32 x K, adaptive quantizers only) + packed codes; for the pass-throughs (none, fp16,
bf16) the body is dims + the raw little-endian values: f16 for fp16, bfloat16 for bf16 (the upper
16 bits of the float32 pattern), f32 for none, f64 for none when the original dtype is float64
(so float64 travels exactly where nothing is compressed). Everything that can be wrong with bytes
from the network is checked before decoding: magic, version, header and body CRC32, quantizer id,
bit width, bucket size, lengths, codebook shape and order, finite non-negative scales, finite
pass-through values.

New payload types are new quantizer ids (bf16 is id 11), not a new format version: the header
is unchanged, so every payload an earlier build wrote still parses, and an earlier build rejects
a bf16 payload by its id ("unknown quantizer id 11") instead of misreading it.

A payload is canonical: the parser accepts exactly the bytes ``to_bytes`` writes for some
payload (reserved fields and unused flag bits zero, no codebook length without a codebook, zero
padding bits after the last code, pass-throughs with bucket size 0 and finite values), so
anything it accepts re-serialises to the same bytes.

Frame = what one rank sends per step and group: a small header (rank, step, layout hash, flags)
and a sequence of payloads, or an error report in place of payloads (so that a rank with bad
gradients tells every peer instead of leaving them waiting). The frame checksum covers the whole
frame; see ``Frame`` for how it does so without hashing the payload bytes twice.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import PayloadError  # noqa: F401 - re-exported
from .quant import codebooks as cb
from .quant.backend import cpu_backend, fused_kernels
from .quant.common import MAX_BUCKET_SIZE, bf16_finite, num_buckets, packed_nbytes, to_host
from .quant.reference import unpack_codes


MAGIC = b"HQAD"
VERSION = 1          # payload format version (unchanged by the stricter checks of the parser)
# magic, version, quantizer id, bits, flags, bucket size, numel, scale dtype, orig dtype, ndim,
# reserved, codebook length, reserved, body crc32, header crc32 (of the bytes before it)
_HEADER = struct.Struct("<4sBBBBIQBBBBHHII")
HEADER_SIZE = _HEADER.size
FLAG_STOCHASTIC = 1
FLAG_CODEBOOK = 2
_KNOWN_FLAGS = FLAG_STOCHASTIC | FLAG_CODEBOOK
# The product of a shape's non-zero dimensions must stay below this, so that an array of that
# shape (even an empty one, e.g. (0, 2**62)) can be built with any 8-byte dtype by NumPy and torch.
MAX_ELEMENTS = 2 ** 60
# At most this many dimensions: what NumPy 1.x can build (NumPy 2 allows 64).
MAX_NDIM = 32

SCALE_FLOAT32 = 0
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}


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
                                       # (bf16: uint16 bit patterns)
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
        if self.kind.passthrough:
            n = 8 * len(self.shape) + self.numel * _passthrough_dtype(self.quantizer, self.orig_dtype).itemsize
        else:
            n = 8 * len(self.shape) + self.codes.nbytes
        if self.scales is not None:
            n += self.scales.nbytes
        if self.codebook is not None:
            n += self.codebook.nbytes
        return n

    @property
    def nbytes(self) -> int:
        return HEADER_SIZE + self.body_nbytes

    def _parts(self) -> tuple[bytes, list]:
        """(header, body parts): the body is not joined here, so that a frame copies it once."""
        parts = [np.asarray(self.shape, dtype="<u8").tobytes()]
        if self.scales is not None:
            parts.append(_le_bytes(self.scales, "<f4"))
        if self.codebook is not None:
            parts.append(_le_bytes(self.codebook, "<f4"))
        codes = np.ascontiguousarray(to_host(self.codes))
        if self.kind.passthrough:       # values in the width the header's dtype implies
            parts.append(_le_bytes(codes, _passthrough_dtype(self.quantizer, self.orig_dtype)))
        else:
            parts.append(_le_bytes(codes, codes.dtype.newbyteorder("<")))
        body_crc = 0
        for part in parts:
            body_crc = zlib.crc32(part, body_crc)
        flags = (FLAG_STOCHASTIC if self.stochastic else 0) | (FLAG_CODEBOOK if self.codebook is not None else 0)
        head = _HEADER.pack(MAGIC, VERSION, self.kind.wire_id, self.bits, flags, self.bucket_size, self.numel,
                            SCALE_FLOAT32, DTYPE_CODES[self.orig_dtype], len(self.shape), 0,
                            0 if self.codebook is None else self.codebook.size, 0, body_crc, 0)
        head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
        return head, parts

    def to_bytes(self) -> bytes:
        head, parts = self._parts()
        return b"".join([head, *parts])

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
        (magic, version, qid, bits, flags, bucket, numel, scale_dt, dt, ndim, r1, cb_len, r2, body_crc,
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
        if flags & ~_KNOWN_FLAGS:
            raise PayloadError(f"{where}: unknown flag bits {flags & ~_KNOWN_FLAGS:#x}")
        if r1 or r2:
            raise PayloadError(f"{where}: reserved header fields must be 0 (got {r1}, {r2})")
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
        if not has_cb and cb_len:
            raise PayloadError(f"{where}: codebook length {cb_len} without a codebook")
        if kind.passthrough:
            if bucket:
                raise PayloadError(f"{where}: pass-through {kind.name!r} with bucket size {bucket} (must be 0)")
            if flags & FLAG_STOCHASTIC:
                raise PayloadError(f"{where}: pass-through {kind.name!r} with the stochastic-rounding flag")
        elif bucket == 0:
            raise PayloadError(f"{where}: bucket size 0")
        elif bucket > MAX_BUCKET_SIZE:
            raise PayloadError(f"{where}: bucket size {bucket} is larger than the format allows ({MAX_BUCKET_SIZE})")
        if ndim > MAX_NDIM:
            raise PayloadError(f"{where}: {ndim} dimensions (at most {MAX_NDIM})")
        # Body length follows from the header alone (Python ints: no overflow, however large numel is).
        if kind.passthrough:
            nb, code_bytes = 0, numel * _passthrough_dtype(kind.name, DTYPE_NAMES[dt]).itemsize
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
        # Python ints: a product that would wrap around int64 cannot pass for numel.
        if math.prod(shape) != numel:
            raise PayloadError(f"{where}: shape {shape} does not hold {numel} elements")
        if math.prod(d for d in shape if d) >= MAX_ELEMENTS:
            raise PayloadError(f"{where}: shape {shape} is too large for an array")
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
            wire_dt = _passthrough_dtype(kind.name, DTYPE_NAMES[dt])
            codes = np.frombuffer(body, dtype=wire_dt, count=numel, offset=pos).astype(wire_dt.newbyteorder("="))
            # The sender refuses NaN/Inf, so a well-formed pass-through payload has none.
            finite = bf16_finite(codes) if kind.name == "bf16" else np.isfinite(codes)
            if codes.size and not bool(finite.all()):
                bad = int(codes.size - np.count_nonzero(finite))
                raise PayloadError(f"{where}: {bad} non-finite value(s) in a {kind.name!r} payload")
        else:
            codes = np.frombuffer(body, dtype=np.uint8, count=code_bytes, offset=pos).copy()
            tail = numel * bits % 8
            if tail and codes[-1] >> tail:
                raise PayloadError(f"{where}: padding bits after the last code are not zero")
            n_levels = cb_len if has_cb else cb.codebook(kind.name, bits).size
            bad = _first_code_out_of_range(codes, bits, numel, n_levels)
            if bad is not None:
                raise PayloadError(f"{where}: code {bad[1]} of element {bad[0]} is outside the {n_levels}-level "
                                   "codebook")
        p = cls(kind.name, bits, bucket, numel, shape, scales, codes, codebook, bool(flags & FLAG_STOCHASTIC),
                DTYPE_NAMES[dt])
        return p, start + body_len


def _passthrough_dtype(name: str, orig_dtype: str) -> np.dtype:
    """The little-endian dtype of a pass-through payload's values on the wire (bf16: the bit
    patterns as uint16, NumPy having no bfloat16)."""
    if name == "fp16":
        return np.dtype("<f2")
    if name == "bf16":
        return np.dtype("<u2")
    return np.dtype("<f8" if orig_dtype == "float64" else "<f4")


def _le_bytes(a, dtype) -> memoryview:
    """The values of ``a`` as contiguous little-endian ``dtype`` bytes: a view, without a copy,
    when ``a`` already is such an array on the host."""
    arr = np.ascontiguousarray(to_host(a), dtype=dtype)
    return memoryview(arr.reshape(-1)).cast("B")


def _first_code_out_of_range(packed: np.ndarray, bits: int, n: int, n_levels: int):
    """(index, code) of the first packed code >= n_levels, or None. Codes that fill a byte evenly
    (1, 2, 4, 8 bits) are checked with a per-byte lookup table, the others by unpacking."""
    if n_levels >= 1 << bits or n == 0:
        return None
    if n_levels == (1 << bits) - 1 and bits in (2, 4, 6, 8):
        # a uniform grid's one invalid code is all ones: rule it out a word at a time first
        be = cpu_backend()
        if fused_kernels(be).wire_checks and not be.any_all_ones_code(packed, bits):
            return None
    if 8 % bits == 0:
        per = 8 // bits
        fields = (np.arange(256)[:, None] >> (bits * np.arange(per))) & ((1 << bits) - 1)
        bad_byte = (fields >= n_levels).any(axis=1)
        b = _first_flagged_byte(packed, bad_byte)
        if b < 0:
            return None
        field = int(np.flatnonzero(fields[packed[b]] >= n_levels)[0])
        return b * per + field, int(fields[packed[b], field])
    codes = unpack_codes(packed, bits, n)
    hits = np.flatnonzero(codes >= n_levels)
    return None if hits.size == 0 else (int(hits[0]), int(codes[hits[0]]))


def _first_flagged_byte(packed: np.ndarray, flagged: np.ndarray) -> int:
    """Index of the first byte whose entry in ``flagged`` is set, or -1: the numba kernel where
    it is available (one pass, stops at a hit), else a byte histogram and a search."""
    be = cpu_backend()
    if fused_kernels(be).wire_checks:
        return be.first_flagged_byte(packed, flagged)
    if not np.bincount(packed, minlength=256)[flagged].any():
        return -1
    return int(np.flatnonzero(flagged[packed])[0])


# ---------------------------------------------------------------------------------------------
FRAME_MAGIC = b"HQFR"
# Version 2: the checksum covers the whole frame (version 1 covered its header only, so an error
# text or a payload sequence could change unnoticed). Same 36-byte layout.
FRAME_VERSION = 2
# magic, version, flags, payload count, rank, step, layout hash, body length, frame crc32
_FRAME = struct.Struct("<4sBBHIQIQI")
FRAME_HEADER_SIZE = _FRAME.size
FRAME_ERROR = 1
_KNOWN_FRAME_FLAGS = FRAME_ERROR
MAX_FRAME_PAYLOADS = 2 ** 16 - 1


@dataclass
class Frame:
    """What one rank sends for one exchange: payloads, or an error report in their place.

    Layout: header (``_FRAME``) + body; the body is the UTF-8 error text (flag ``FRAME_ERROR``,
    payload count 0) or the payloads back to back (each self-delimiting: the sequence of payload
    headers is the frame's payload table).

    Checksum: the header's crc32 runs over the header (minus the crc field), then the error text,
    or else over each payload's header minus its own crc field (its first 32 bytes), in order.
    That covers every byte of the frame: those 32 bytes hold the crc32 of the payload's body, and
    its header crc is a function of them, so this chain plus the body and header crcs the payload
    parser always checks verify everything. Hashing the payload bodies a second time would detect
    nothing more: the frame crc and the body crcs are the same CRC-32, and an error pattern
    confined to payload bodies that every body crc misses is a multiple of the CRC polynomial,
    which a crc over the whole frame misses as well. Skipping them saves a pass over up to ~40 MB
    per frame (~20 ms) on each side. What the chain adds is the frame header fields, the error
    text, and the number, order and identity of the payloads (dropping, duplicating, swapping or
    splicing in valid payloads changes it).
    Why not the whole 36-byte payload headers: a block followed by its own CRC-32 is a CRC
    codeword, and running a CRC-32 over a codeword moves the register to a value that does not
    depend on the codeword's content (the CRC residue property), so such a chain would only see
    how many payloads there are, not which.
    """
    rank: int
    step: int
    layout: int                      # hash of (names, shapes, config): equal on all ranks or it is a bug
    payloads: list = field(default_factory=list)
    error: str | None = None

    def to_bytes(self) -> bytes:
        if self.error is not None:
            text = self.error.encode("utf-8", "replace")
            parts, count, flags = [text], 0, FRAME_ERROR
            covered = [text]
        else:
            if len(self.payloads) > MAX_FRAME_PAYLOADS:
                raise ValueError(f"a frame holds at most {MAX_FRAME_PAYLOADS} payloads, got {len(self.payloads)}")
            parts, covered = [], []
            for p in self.payloads:
                head, body = p._parts()
                parts.append(head)
                parts.extend(body)
                covered.append(head[:HEADER_SIZE - 4])       # without its crc field: see above
            count, flags = len(self.payloads), 0
        body_len = sum(memoryview(b).nbytes for b in parts)
        head = _FRAME.pack(FRAME_MAGIC, FRAME_VERSION, flags, count, self.rank, self.step, self.layout, body_len,
                           0)[:-4]
        crc = zlib.crc32(head)
        for c in covered:
            crc = zlib.crc32(c, crc)
        return b"".join([head, struct.pack("<I", crc), *parts])

    @classmethod
    def from_bytes(cls, data, source: str = "frame") -> "Frame":
        buf = memoryview(data).cast("B")
        if len(buf) < FRAME_HEADER_SIZE:
            raise PayloadError(f"{source}: truncated frame header ({len(buf)} bytes)")
        raw = bytes(buf[:FRAME_HEADER_SIZE])
        magic, version, flags, count, rank, step, layout, body_len, crc = _FRAME.unpack(raw)
        if magic != FRAME_MAGIC:
            raise PayloadError(f"{source}: bad frame magic {magic!r}")
        if version != FRAME_VERSION:
            raise PayloadError(f"{source}: unsupported frame version {version} (this build reads {FRAME_VERSION})")
        if len(buf) != FRAME_HEADER_SIZE + body_len:
            raise PayloadError(f"{source}: frame says {body_len} body bytes, got {len(buf) - FRAME_HEADER_SIZE}")
        body = buf[FRAME_HEADER_SIZE:]
        chain = zlib.crc32(raw[:-4])
        mismatch = (f"{source}: frame checksum mismatch (corrupted frame header, error text or payload "
                    "sequence)")
        if flags & ~_KNOWN_FRAME_FLAGS:
            raise PayloadError(f"{source}: unknown frame flag bits {flags & ~_KNOWN_FRAME_FLAGS:#x}")
        if flags & FRAME_ERROR:
            if zlib.crc32(body, chain) != crc:
                raise PayloadError(mismatch)
            if count:
                raise PayloadError(f"{source}: error frame with a payload count of {count}")
            try:
                error = str(body, "utf-8")
            except UnicodeDecodeError as e:
                raise PayloadError(f"{source}: error text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            return cls(rank, step, layout, error=error)
        # Payloads are self-delimiting: walk them to the end of the body (not by the count, which
        # is checked after the checksum, so that a corrupted count reads as corruption).
        payloads, pos = [], 0
        while pos < len(body):
            try:
                p, end = Payload.from_buffer(body, pos)
            except PayloadError as e:
                raise PayloadError(f"{source} (rank {rank}, step {step}), payload {len(payloads)}: {e}") from None
            chain = zlib.crc32(body[pos:pos + HEADER_SIZE - 4], chain)
            payloads.append(p)
            pos = end
        if chain != crc:
            raise PayloadError(mismatch)
        if len(payloads) != count:
            raise PayloadError(f"{source}: frame says {count} payloads, its body holds {len(payloads)}")
        return cls(rank, step, layout, payloads)


def split_frames(buf) -> list:
    """Cut a concatenation of frames (as an allgather returns it) into one view per frame, by
    each frame header's body length."""
    mv = memoryview(buf).cast("B")
    out, pos = [], 0
    while pos < len(mv):
        if len(mv) - pos < FRAME_HEADER_SIZE:
            raise PayloadError(f"gathered buffer: truncated frame header at byte {pos}")
        magic, *_rest, body_len, _crc = _FRAME.unpack(bytes(mv[pos:pos + FRAME_HEADER_SIZE]))
        if magic != FRAME_MAGIC:
            raise PayloadError(f"gathered buffer: bad frame magic {magic!r} at byte {pos}")
        n = FRAME_HEADER_SIZE + body_len
        out.append(mv[pos:pos + n])
        pos += n
    if pos != len(mv):
        raise PayloadError(f"gathered buffer has {len(mv)} bytes, frames account for {pos}")
    return out
