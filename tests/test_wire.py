"""Wire format: exact sizes, lossless round trips, and rejection of every malformed input.

The header layout is pinned here with its own struct definition (the fields hvd_qadam/wire.py
writes: magic, version, quantizer id, bits, bucket size, element count, scale dtype, codebook
length, body checksum), so a change of the format shows up as a failing test rather than as
silently incompatible ranks.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from hvd_qadam import Frame, Payload, PayloadError, dequantize, quantize
from hvd_qadam import wire
from hvd_qadam.quant import codebooks
from hvd_qadam.quant.reference import pack_codes, unpack_codes
from hvd_qadam.wire import split_frames

# magic, version, quantizer id, bits, flags, bucket size, numel, scale dtype, orig dtype, ndim,
# reserved, codebook length, reserved, body crc32, header crc32
HDR = struct.Struct("<4sBBBBIQBBBBHHII")
F_MAGIC, F_VERSION, F_QID, F_BITS, F_FLAGS, F_BUCKET, F_NUMEL, F_SCALE_DT, F_DTYPE, F_NDIM, F_R1, F_CBLEN, \
    F_R2, F_BODY_CRC, F_HEAD_CRC = range(15)
# magic, version, flags, payload count, rank, step, layout hash, body length, frame crc32
FRAME_HDR = struct.Struct("<4sBBHIQIQI")
FRAME_VERSION = 2


def frame_crc(head32: bytes, body: bytes, error: bool = False) -> int:
    """The frame checksum (frame format 2), computed independently of wire.py: crc32 over the
    header's first 32 bytes, then the error text, or else every payload header's first 32 bytes
    (not its crc field) in order."""
    if error:
        return zlib.crc32(head32 + body)
    heads, pos = [], 0
    while pos + 36 <= len(body):         # walk the payloads by their headers (stop at junk)
        f = HDR.unpack(body[pos:pos + 36])
        heads.append(body[pos:pos + 32])
        if f[F_QID] == 0:
            n = 4 * f[F_NUMEL]
        elif f[F_QID] == 1:
            n = 2 * f[F_NUMEL]
        else:
            n = 4 * -(-f[F_NUMEL] // f[F_BUCKET]) + 4 * f[F_CBLEN] + -(-f[F_NUMEL] * f[F_BITS] // 8)
        pos += 36 + 8 * f[F_NDIM] + n
    return zlib.crc32(head32 + b"".join(heads))


def seal_frame(h: list, body: bytes, error: bool = False) -> bytes:
    """A frame with header fields ``h`` (crc ignored) and ``body``, with a VALID frame checksum."""
    head32 = FRAME_HDR.pack(*h[:-1], 0)[:32]
    return head32 + struct.pack("<I", frame_crc(head32, body, error)) + body

ALL = ["none", "fp16", "qsgd", "qsgdinf", "nuq", "terngrad", "sign", "alq", "amq", "alq_n", "amq_n"]


def amq_codebook(bits, mult=0.4):
    half = 2 ** (bits - 1)
    mags = mult ** np.arange(half - 1, -1, -1, dtype=np.float64)
    return np.concatenate([-mags[::-1], mags]).astype(np.float32)


def bits_of(name):
    return {"none": None, "fp16": None, "sign": 1, "terngrad": 2}.get(name, 3)


def codebook_of(name, bits):
    if name in ("alq", "alq_n"):
        return codebooks.default_adaptive_codebook(bits)
    if name in ("amq", "amq_n"):
        return amq_codebook(bits)
    return None


def make(name, x=None, bits=None, bucket=32, seed=1, **kw):
    if x is None:
        x = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    bits = bits if bits is not None else bits_of(name)
    return quantize(x, name, bits, bucket, seed=seed, codebook=codebook_of(name, bits), **kw)


def expected_nbytes(name, shape, bits, bucket, k=0):
    n = int(np.prod(shape, dtype=np.int64))
    if name == "none":
        return 36 + 8 * len(shape) + 4 * n
    if name == "fp16":
        return 36 + 8 * len(shape) + 2 * n
    return 36 + 8 * len(shape) + 4 * math.ceil(n / bucket) + math.ceil(n * bits / 8) + 4 * k


def reseal(data: bytes, fields=None, body=None) -> bytes:
    """Rebuild a payload with edited header fields and/or body and VALID checksums."""
    f = list(HDR.unpack(data[:HDR.size]))
    if fields:
        for i, v in fields.items():
            f[i] = v
    if body is None:
        body = data[HDR.size:]
    f[F_BODY_CRC] = zlib.crc32(body)
    f[F_HEAD_CRC] = 0
    head = HDR.pack(*f)
    return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4])) + body


def assert_same_payload(a: Payload, b: Payload):
    assert (a.quantizer, a.bits, a.bucket_size, a.numel, tuple(a.shape), a.stochastic, a.orig_dtype) == \
           (b.quantizer, b.bits, b.bucket_size, b.numel, tuple(b.shape), b.stochastic, b.orig_dtype)
    for f in ("scales", "codes", "codebook"):
        va, vb = getattr(a, f), getattr(b, f)
        if va is None or vb is None:
            # an empty tensor carries no scales: None and an empty array mean the same thing
            assert (va is None or va.size == 0) and (vb is None or vb.size == 0), f
        else:
            assert va.dtype == vb.dtype and np.array_equal(va, vb, equal_nan=True), f


# ------------------------------------------------------------------------------------------------
# layout and sizes

def test_header_layout_is_pinned():
    assert wire.HEADER_SIZE == HDR.size == 36
    assert wire.FRAME_HEADER_SIZE == FRAME_HDR.size == 36
    data = make("qsgd").to_bytes()
    f = HDR.unpack(data[:36])
    assert f[F_MAGIC] == b"HQAD" and f[F_VERSION] == 1
    assert f[F_QID] == codebooks.kind("qsgd").wire_id and f[F_BITS] == 3
    assert f[F_FLAGS] == wire.FLAG_STOCHASTIC and f[F_BUCKET] == 32 and f[F_NUMEL] == 132
    assert f[F_NDIM] == 2 and f[F_CBLEN] == 0
    assert f[F_BODY_CRC] == zlib.crc32(data[36:])
    assert f[F_HEAD_CRC] == zlib.crc32(data[:32])
    # body: dims (u64), scales (f32), codes
    assert np.frombuffer(data, "<u8", 2, 36).tolist() == [4, 33]
    alq = make("alq").to_bytes()
    f = HDR.unpack(alq[:36])
    assert f[F_FLAGS] == wire.FLAG_STOCHASTIC | wire.FLAG_CODEBOOK and f[F_CBLEN] == 8
    cb_at = 36 + 16 + 4 * 5
    assert np.array_equal(np.frombuffer(alq, "<f4", 8, cb_at), codebooks.default_adaptive_codebook(3))


def test_wire_ids_are_unique_and_stable():
    ids = {k.name: k.wire_id for k in codebooks.KINDS.values()}
    assert len(set(ids.values())) == len(ids)
    assert ids == {"none": 0, "fp16": 1, "qsgd": 2, "qsgdinf": 3, "nuq": 4, "terngrad": 5, "sign": 6,
                   "alq": 7, "amq": 8, "alq_n": 9, "amq_n": 10, "bf16": 11}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(4, 33), (1,), (7,), (2, 3, 5), (1001,), ()])
def test_round_trip_preserves_everything(name, shape):
    g = np.random.default_rng(len(shape))
    x = np.asarray(g.standard_normal(shape), dtype=np.float32)
    bits = bits_of(name)
    p = make(name, x, bucket=32)
    data = p.to_bytes()
    assert isinstance(data, bytes)
    k = 0 if p.codebook is None else p.codebook.size
    assert p.nbytes == len(data) == expected_nbytes(name, shape, bits or 0, 32, k)
    q = Payload.from_bytes(data)
    assert_same_payload(p, q)
    assert q.to_bytes() == data and q.nbytes == len(data)
    y = dequantize(q)
    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == np.float32
    assert np.array_equal(y, dequantize(p))
    # the parser takes any bytes-like object
    for buf in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert_same_payload(Payload.from_bytes(buf), p)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 9, 1001])
def test_sizes_for_every_bit_width(bits, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    name = "alq" if bits == 1 else "qsgd"
    p = quantize(x, name, bits, 64, codebook=codebook_of(name, bits))
    k = 2 if bits == 1 else 0
    assert len(p.to_bytes()) == p.nbytes == expected_nbytes(name, (n,), bits, 64, k)
    assert p.codes.size == math.ceil(n * bits / 8)
    assert_same_payload(Payload.from_bytes(p.to_bytes()), p)


@pytest.mark.parametrize("dtype,orig", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
                                        (torch.float64, "float64"), (torch.float32, "float32")])
def test_orig_dtype_survives_the_wire(dtype, orig):
    t = torch.randn(5, 6).to(dtype)
    p = quantize(t, "qsgd", 4, 8)
    q = Payload.from_bytes(p.to_bytes())
    assert q.orig_dtype == orig
    back = dequantize(q, like=t)
    assert isinstance(back, torch.Tensor) and back.dtype == dtype and back.shape == (5, 6)
    assert torch.equal(back, dequantize(p))


def test_nearest_flag_and_empty_payload_round_trip():
    p = make("qsgd", rounding="nearest")
    assert p.stochastic is False
    assert Payload.from_bytes(p.to_bytes()).stochastic is False
    e = quantize(np.zeros((0, 3), np.float32), "nuq", 4, 16)
    data = e.to_bytes()
    assert len(data) == e.nbytes == 36 + 16
    q = Payload.from_bytes(data)
    assert_same_payload(e, q)
    assert q.to_bytes() == data
    assert dequantize(q, backend="numpy").shape == (0, 3)


def test_regression_empty_quantized_payload_keeps_empty_scales_after_wire():
    e = quantize(np.zeros((0, 3), np.float32), "nuq", 4, 16)
    q = Payload.from_bytes(e.to_bytes())
    assert q.scales is not None and q.scales.dtype == np.float32 and q.scales.size == 0
    for backend in ("numpy", None):
        y = dequantize(q, backend=backend)
        assert y.shape == (0, 3) and y.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# finite narrow-dtype input never decodes to inf

def _limits_codebook(name, bits):
    return codebooks.default_adaptive_codebook(bits) if codebooks.kind(name).adaptive else None


FP16_LIMITS = [65504.0, -65504.0, 65504.0, 64000.0, -64000.0, 60000.0, 20000.0, 1.0, 6e-08, 0.0]


def _widths(k):
    """The default width, and the lowest, a middle and the highest where the width is free."""
    if k.fixed_bits is not None:
        return [None]
    return [None] + sorted({k.min_bits, 4, k.max_bits})


@pytest.mark.parametrize("name,bits", [(n, b) for n, k in sorted(codebooks.KINDS.items()) for b in _widths(k)])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_fp16_limits_never_decode_to_inf(name, rounding, bits):
    """Values at the fp16 limits: the decoded value may round up past 65504 (the next level
    above |x|); cast back to fp16 it saturates at +-65504 instead of becoming inf. Buckets of
    many large values (l2 scale >> 65504) and of one value each (scale = |x|); torch and NumPy."""
    k = codebooks.kind(name)
    g = np.random.default_rng(bits or 0)
    x = np.concatenate([FP16_LIMITS, np.full(512, 60000.0), g.uniform(-65504, 65504, 500)]).astype(np.float16)
    for bucket in (512, 1):
        for seed in range(3):
            t = torch.from_numpy(x.copy())
            cbk = _limits_codebook(name, k.check_bits(bits))
            p = quantize(t, name, bits, bucket, seed=seed, rounding=rounding, codebook=cbk)
            for q in (p, Payload.from_bytes(p.to_bytes())):
                y = dequantize(q, like=t)
                assert y.dtype == torch.float16
                assert bool(torch.isfinite(y).all()), (bucket, seed, int((~torch.isfinite(y)).sum()))
                assert float(y.abs().max()) <= 65504.0
            xn = quantize(x, name, bits, bucket, seed=seed, rounding=rounding, codebook=cbk)
            yn = dequantize(xn)
            assert yn.dtype == np.float16 and np.isfinite(yn).all() and np.abs(yn).max() <= 65504


def test_regression_fp16_qsgd_at_64000_decodes_finite():
    y = dequantize(quantize(torch.tensor([64000.0, 20000.0], dtype=torch.float16), "qsgd", bits=4,
                            rounding="nearest"))
    assert y.dtype == torch.float16 and y[0].item() == 65504.0 and y[1].item() == 19152.0
    y = dequantize(quantize(torch.full((512,), 60000.0, dtype=torch.float16), "qsgd", bits=4, bucket_size=512,
                            rounding="stochastic"))
    assert bool(torch.isfinite(y).all())
    assert set(y.unique().tolist()) <= {0.0, 65504.0}       # levels 0 and 1/7 of the l2 scale 1.36e6


@pytest.mark.parametrize("name", sorted(codebooks.KINDS))
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bf16_limits_never_decode_to_inf(name, rounding):
    """bf16 reaches 3.39e38, close to fp32's 3.40e38: quantize refuses a scale that overflows
    fp32; otherwise a decoded value between the two maxima saturates at bf16's max."""
    k = codebooks.kind(name)
    hi = torch.finfo(torch.bfloat16).max
    # (3.004e38, 1.588e38) has the l2 norm 3.398e38: above bf16's max (3.3895e38) by more than
    # half a bf16 step, below fp32's max; a value decoded at level 1 of that scale is the case.
    x = torch.tensor([3.004e38, 1.588e38, -3.004e38, 1.588e38, hi, 0.0, -hi, 1.0] * 8, dtype=torch.bfloat16)
    for bucket in (2, 1):
        for seed in range(4):
            cbk = _limits_codebook(name, k.default_bits)
            try:
                p = quantize(x, name, None, bucket, seed=seed, rounding=rounding, codebook=cbk)
            except ValueError as e:
                assert "overflow" in str(e)
                continue
            y = dequantize(Payload.from_bytes(p.to_bytes()), like=x)
            assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())


def test_saturation_applies_to_like_and_leaves_wide_dtypes_alone():
    p = quantize(np.array([1e6, -3e5, 1.0], np.float32), "none")
    assert dequantize(p, like=torch.zeros(3, dtype=torch.float16)).tolist() == [65504.0, -65504.0, 1.0]
    assert dequantize(p, like=torch.zeros(3, dtype=torch.float32)).tolist() == [1e6, -3e5, 1.0]
    assert dequantize(p).tolist() == [1e6, -3e5, 1.0]


def test_float64_travels_exactly_through_none_and_narrows_through_everything_else():
    """``none`` carries float64 as 8-byte values (the header's dtype says so), so the
    uncompressed pass-through is exact for every dtype; every other quantizer works in float32."""
    x = np.random.default_rng(3).standard_normal((5, 7)) * np.pi      # not float32-exact
    p = quantize(x, "none")
    data = p.to_bytes()
    assert len(data) == p.nbytes == 36 + 8 * 2 + 8 * x.size
    q = Payload.from_bytes(data)
    assert q.orig_dtype == "float64" and q.codes.dtype == np.float64 and q.to_bytes() == data
    y = dequantize(q)
    assert y.dtype == np.float64 and np.array_equal(y, x)
    t = dequantize(q, like=torch.zeros(1, dtype=torch.float64))
    assert torch.equal(t, torch.from_numpy(x))
    assert torch.equal(dequantize(quantize(torch.from_numpy(x), "none")), torch.from_numpy(x))
    f = dequantize(Payload.from_bytes(quantize(x, "fp16").to_bytes()))
    assert f.dtype == np.float64 and not np.array_equal(f, x)
    # float32 input through none: 4 bytes per value, as before
    assert len(quantize(x.astype(np.float32), "none").to_bytes()) == 36 + 16 + 4 * x.size
    # a float64 header over a float32-sized body is truncated, not misread
    short = reseal(quantize(x.astype(np.float32), "none").to_bytes(), {F_DTYPE: wire.DTYPE_CODES["float64"]})
    with pytest.raises(PayloadError, match="truncated body"):
        Payload.from_bytes(short)


# ------------------------------------------------------------------------------------------------
# malformed input

SMALL = {
    "qsgd": lambda: make("qsgd", np.linspace(-1, 1, 10, dtype=np.float32), bits=4, bucket=4),
    "alq": lambda: make("alq", np.linspace(-1, 1, 6, dtype=np.float32), bits=2, bucket=4),
    "none": lambda: make("none", np.linspace(-1, 1, 3, dtype=np.float32)),
    "sign": lambda: make("sign", np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3), bucket=5),
}


@pytest.mark.parametrize("which", sorted(SMALL))
def test_truncation_at_every_length_is_rejected(which):
    data = SMALL[which]().to_bytes()
    for n in range(len(data)):
        with pytest.raises(PayloadError, match=r"truncated header" if n < 36 else r"truncated body") as ei:
            Payload.from_bytes(data[:n])
        if n < 36:
            assert f"({n} of 36 bytes)" in str(ei.value)


@pytest.mark.parametrize("which", sorted(SMALL))
def test_every_single_byte_corruption_is_rejected(which):
    """Flip every byte (three different masks): magic and version are named, every other header byte
    trips the header CRC, every body byte the body CRC; none decodes."""
    data = SMALL[which]().to_bytes()
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            if i < 4:
                msg = r"bad magic"
            elif i == 4:
                msg = r"unsupported format version"
            elif i < 36:
                msg = r"header checksum mismatch"
            else:
                msg = r"body checksum mismatch"
            with pytest.raises(PayloadError, match=msg):
                Payload.from_bytes(bytes(bad))


def test_bad_magic_and_version_messages():
    data = make("qsgd").to_bytes()
    with pytest.raises(PayloadError, match=r"payload at byte 0: bad magic b'XQAD'.*not an hvd_qadam payload"):
        Payload.from_bytes(b"X" + data[1:])
    for v in (0, 2, 255):
        with pytest.raises(PayloadError, match=rf"unsupported format version {v} \(this build reads 1\)"):
            Payload.from_bytes(reseal(data, {F_VERSION: v}))
    with pytest.raises(PayloadError, match=r"bad magic"):
        Payload.from_bytes(b"\0" * 100)


def test_trailing_garbage_and_from_buffer():
    a = make("qsgd").to_bytes()
    b = make("alq", seed=3).to_bytes()
    with pytest.raises(PayloadError, match=r"1 trailing bytes after the body"):
        Payload.from_bytes(a + b"\0")
    with pytest.raises(PayloadError, match=rf"{len(b)} trailing bytes"):
        Payload.from_bytes(a + b)
    # from_buffer parses self-delimiting payloads one after another
    buf = b"junk" + a + b
    p, end = Payload.from_buffer(buf, 4)
    assert end == 4 + len(a) and p.quantizer == "qsgd"
    q, end2 = Payload.from_buffer(buf, end)
    assert end2 == len(buf) and q.quantizer == "alq"
    with pytest.raises(PayloadError, match=r"payload at byte 0: bad magic"):
        Payload.from_buffer(buf, 0)
    with pytest.raises(PayloadError, match=rf"payload at byte {len(buf)}: truncated header \(0 of 36"):
        Payload.from_buffer(buf, len(buf))


def _body_parts(p: Payload):
    data = p.to_bytes()
    ndim = len(p.shape)
    body = data[36:]
    nb = p.scales.size if p.scales is not None else 0
    k = p.codebook.size if p.codebook is not None else 0
    return data, body, 8 * ndim, 8 * ndim + 4 * nb, 8 * ndim + 4 * nb + 4 * k


@pytest.mark.parametrize("fields,msg", [
    ({F_QID: 200}, r"unknown quantizer id 200"),
    ({F_QID: 12}, r"unknown quantizer id 12"),
    ({F_BITS: 9}, r"'qsgd' supports bits in 2\.\.8; got bits=9"),
    ({F_BITS: 1}, r"supports bits in 2\.\.8; got bits=1"),
    ({F_BITS: 0}, r"got bits=0"),
    ({F_BUCKET: 0}, r"bucket size 0"),
    ({F_SCALE_DT: 1}, r"unknown scale dtype code 1"),
    ({F_DTYPE: 9}, r"unknown original dtype code 9"),
    ({F_FLAGS: wire.FLAG_STOCHASTIC | wire.FLAG_CODEBOOK}, r"'qsgd' must not carry a codebook"),
    ({F_NUMEL: 133}, r"shape \(4, 33\) does not hold 133 elements"),   # same body length
    ({F_NUMEL: 140}, r"truncated body \(\d+ of \d+ bytes for 140 elements at 3 bits\)"),
    ({F_NUMEL: 10 ** 15}, r"truncated body"),
    ({F_NUMEL: 131}, r"shape \(4, 33\) does not hold 131 elements|truncated body|trailing"),
    ({F_NDIM: 3}, r"truncated body"),
    ({F_QID: codebooks.kind("sign").wire_id}, r"'sign' always uses 1 bit"),
    ({F_FLAGS: wire.FLAG_STOCHASTIC | 4}, r"unknown flag bits 0x4"),
    ({F_FLAGS: 0x80}, r"unknown flag bits 0x80"),
    ({F_R1: 1}, r"reserved header fields must be 0 \(got 1, 0\)"),
    ({F_R2: 7}, r"reserved header fields must be 0 \(got 0, 7\)"),
    ({F_CBLEN: 8}, r"codebook length 8 without a codebook"),
    ({F_BUCKET: 2 ** 31 + 1}, r"bucket size 2147483649 is larger than the format allows"),
    ({F_BUCKET: 2 ** 32 - 1}, r"bucket size 4294967295 is larger"),
    ({F_NUMEL: 2 ** 64 - 1}, r"truncated body"),
    ({F_NDIM: 255}, r"255 dimensions \(at most 32\)"),
    ({F_NDIM: 33}, r"33 dimensions"),
])
def test_header_fields_validated_beyond_checksums(fields, msg):
    data = make("qsgd").to_bytes()
    with pytest.raises(PayloadError, match=msg):
        Payload.from_bytes(reseal(data, fields))


def test_body_fields_validated_beyond_checksums():
    p = make("qsgd")                                   # shape (4, 33), 5 buckets
    data, body, s0, s1, _ = _body_parts(p)
    # shape that does not hold numel
    bad = np.array([4, 34], "<u8").tobytes() + body[s0:]
    with pytest.raises(PayloadError, match=r"shape \(4, 34\) does not hold 132 elements"):
        Payload.from_bytes(reseal(data, body=bad))
    # non-finite / negative scales
    for v in (np.nan, np.inf, -np.inf, -1.0):
        sc = p.scales.copy()
        sc[2] = v
        bad = body[:s0] + sc.astype("<f4").tobytes() + body[s1:]
        with pytest.raises(PayloadError, match=r"scales must be finite and non-negative"):
            Payload.from_bytes(reseal(data, body=bad))
    # adaptive payloads: codebook missing, wrong length, unsorted, out of range
    a = make("alq")
    data, body, s0, s1, s2 = _body_parts(a)
    with pytest.raises(PayloadError, match=r"'alq' needs a codebook"):
        Payload.from_bytes(reseal(data, {F_FLAGS: wire.FLAG_STOCHASTIC, F_CBLEN: 0}, body[:s1] + body[s2:]))
    with pytest.raises(PayloadError, match=r"codebook length 9 invalid for 3 bits"):
        Payload.from_bytes(reseal(data, {F_CBLEN: 9}, body[:s2] + b"\0" * 4 + body[s2:]))
    with pytest.raises(PayloadError, match=r"codebook length 1 invalid for 3 bits"):
        Payload.from_bytes(reseal(data, {F_CBLEN: 1}))
    cbk = a.codebook.copy()
    cbk[[2, 3]] = cbk[[3, 2]]
    with pytest.raises(PayloadError, match=r"strictly increasing"):
        Payload.from_bytes(reseal(data, body=body[:s1] + cbk.astype("<f4").tobytes() + body[s2:]))
    cbk = a.codebook.copy()
    cbk[-1] = 1.5
    with pytest.raises(PayloadError, match=r"inside \[-1, 1\]"):
        Payload.from_bytes(reseal(data, body=body[:s1] + cbk.astype("<f4").tobytes() + body[s2:]))
    cbk[-1] = np.nan
    with pytest.raises(PayloadError, match=r"finite"):
        Payload.from_bytes(reseal(data, body=body[:s1] + cbk.astype("<f4").tobytes() + body[s2:]))


@pytest.mark.parametrize("shape,numel", [
    ((2 ** 32, 2 ** 32), 0),                 # 2^64: wraps around int64 to 0
    ((2, 2 ** 63 + 66), 132),                # 2^64 + 132: wraps to 132
    ((2 ** 63, 2, 132), 132),
    ((3, 6148914691236517206), 2),           # 3 * that = 2^64 + 2
])
def test_regression_shape_products_that_wrap_around_int64_are_rejected(shape, numel):
    """Shape dimensions are multiplied with Python ints: a product that wraps around int64 never
    passes for the element count (it used to pass the parser and fail later with ValueError)."""
    p = make("qsgd")
    data, body, s0, _, _ = _body_parts(p)
    if numel == 0:
        fields, rest = {F_NUMEL: 0, F_NDIM: len(shape)}, b""
    else:
        fields, rest = {F_NDIM: len(shape)}, body[s0:]
    bad = reseal(data, fields, np.array(shape, "<u8").tobytes() + rest)
    with pytest.raises(PayloadError, match=r"does not hold \d+ elements"):
        Payload.from_bytes(bad)


@pytest.mark.parametrize("shape", [(0, 2 ** 60), (2 ** 40, 0, 2 ** 20), (0, 2 ** 64 - 1)])
def test_empty_shapes_too_large_for_an_array_are_rejected(shape):
    e = quantize(np.zeros((0, 3), np.float32), "qsgd", 4, 16)
    data = e.to_bytes()
    with pytest.raises(PayloadError, match=r"too large for an array"):
        Payload.from_bytes(reseal(data, {F_NDIM: len(shape)}, np.array(shape, "<u8").tobytes()))
    ok = reseal(data, {F_NDIM: 2}, np.array((0, 2 ** 60 - 1), "<u8").tobytes())   # the largest accepted
    assert dequantize(Payload.from_bytes(ok)).shape == (0, 2 ** 60 - 1)


def test_dimension_limit_is_the_same_on_both_ends():
    x = np.zeros((1,) * 32 + (3,), np.float32)
    with pytest.raises(codebooks.QuantizerError, match=r"33 dimensions; the wire format carries at most 32"):
        quantize(x, "qsgd", 4)
    p = quantize(x.reshape(-1, 3)[0].reshape((1,) * 31 + (3,)), "qsgd", 4)
    assert dequantize(Payload.from_bytes(p.to_bytes())).shape == (1,) * 31 + (3,)


@pytest.mark.parametrize("name", ["none", "fp16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pass_through_values_are_rejected(name, bad):
    p = make(name, np.arange(6, dtype=np.float32).reshape(2, 3))
    data, body, s0, _, _ = _body_parts(p)
    vals = p.codes.copy()
    vals[4] = bad
    with pytest.raises(PayloadError, match=rf"1 non-finite value\(s\) in a '{name}' payload"):
        Payload.from_bytes(reseal(data, body=body[:s0] + vals.tobytes()))
    # the largest finite values are fine, and decode to themselves
    vals[:] = np.finfo(vals.dtype).max
    q = Payload.from_bytes(reseal(data, body=body[:s0] + vals.tobytes()))
    assert np.all(dequantize(q) == np.finfo(vals.dtype).max)


@pytest.mark.parametrize("name", ["none", "fp16"])
def test_pass_through_header_fields_are_canonical(name):
    data = make(name).to_bytes()
    with pytest.raises(PayloadError, match=rf"pass-through '{name}' with bucket size 32 \(must be 0\)"):
        Payload.from_bytes(reseal(data, {F_BUCKET: 32}))
    with pytest.raises(PayloadError, match=r"with the stochastic-rounding flag"):
        Payload.from_bytes(reseal(data, {F_FLAGS: wire.FLAG_STOCHASTIC}))


@pytest.mark.parametrize("bits,n", [(3, 1), (3, 5), (5, 7), (2, 3), (1, 9), (7, 3)])
def test_nonzero_padding_bits_are_rejected(bits, n):
    """Codes are packed LSB-first; the bits after the last code are zero on the wire."""
    name = "alq" if bits == 1 else "qsgd"
    p = quantize(np.linspace(-1, 1, n, dtype=np.float32), name, bits, 4, codebook=codebook_of(name, bits))
    data, body, s0, s1, s2 = _body_parts(p)
    assert Payload.from_bytes(data) is not None
    codes = bytearray(body[s2:])
    codes[-1] |= 0x80
    with pytest.raises(PayloadError, match=r"padding bits after the last code are not zero"):
        Payload.from_bytes(reseal(data, body=body[:s2] + bytes(codes)))


def test_payload_error_is_value_error_and_messages_locate_the_payload():
    assert issubclass(PayloadError, ValueError)
    a = make("qsgd").to_bytes()
    bad = bytearray(a)
    bad[-1] ^= 1
    with pytest.raises(PayloadError, match=rf"payload at byte {len(a)}: body checksum mismatch"):
        Payload.from_buffer(a + bytes(bad), len(a))


@pytest.mark.parametrize("name,bits,bad_code", [("qsgd", 4, 15), ("terngrad", 2, 3), ("nuq", 2, 3),
                                                ("alq", 2, 3)])
def test_regression_out_of_range_codes_rejected_at_parse(name, bits, bad_code):
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    cbk = [-1.0, 0.0, 1.0] if name == "alq" else None
    p = quantize(x, name, bits, 4, codebook=cbk)
    codes = unpack_codes(p.codes, bits, 10)
    codes[3] = bad_code
    p.codes = pack_codes(codes, bits)
    with pytest.raises(PayloadError, match=r"code"):
        Payload.from_bytes(p.to_bytes())


@pytest.mark.parametrize("name,bits,bad_code", [("qsgd", 4, 15), ("terngrad", 2, 3)])
def test_out_of_range_codes_never_decode_silently(name, bits, bad_code):
    """Whatever layer catches it, a code outside the codebook must not decode into a number."""
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    p = quantize(x, name, bits, 4)
    codes = unpack_codes(p.codes, bits, 10)
    codes[3] = bad_code
    p.codes = pack_codes(codes, bits)
    with pytest.raises((PayloadError, ValueError, IndexError)):
        dequantize(Payload.from_bytes(p.to_bytes()))


# ------------------------------------------------------------------------------------------------
# frames

def _frame_payloads():
    return [make("qsgd"), make("alq", seed=2), make("none", np.arange(5, dtype=np.float32)),
            make("sign", bucket=7), make("fp16", np.ones((2, 2), np.float32)),
            quantize(np.zeros(0, np.float32), "nuq", 3)]


def test_frame_round_trip():
    ps = _frame_payloads()
    f = Frame(rank=3, step=2 ** 40 + 5, layout=0xDEADBEEF, payloads=ps)
    data = f.to_bytes()
    assert len(data) == 36 + sum(p.nbytes for p in ps)
    h = FRAME_HDR.unpack(data[:36])
    assert h[0] == b"HQFR" and h[1] == FRAME_VERSION and h[3] == len(ps) and h[4] == 3 and h[5] == 2 ** 40 + 5
    assert h[6] == 0xDEADBEEF and h[7] == len(data) - 36
    assert h[8] == zlib.crc32(data[:32] + b"".join(p.to_bytes()[:32] for p in ps))
    assert data[36:] == b"".join(p.to_bytes() for p in ps)
    g = Frame.from_bytes(data)
    assert (g.rank, g.step, g.layout, g.error) == (3, 2 ** 40 + 5, 0xDEADBEEF, None)
    assert len(g.payloads) == len(ps)
    for a, b in zip(ps, g.payloads):
        assert_same_payload(a, b)
        assert np.array_equal(dequantize(a, backend="numpy"), dequantize(b, backend="numpy"))
        if a.numel:  # (0-element payloads: see test_regression_empty_quantized_payload_keeps_empty_scales_after_wire)
            assert np.array_equal(dequantize(a), dequantize(b))
    assert g.to_bytes() == data
    empty = Frame(0, 0, 0)
    assert Frame.from_bytes(empty.to_bytes()).payloads == []


def test_frame_error_report_round_trip():
    msg = "rank 2: gradient of 'fc1.weight' has 3 NaN/Inf value(s) ✗"
    f = Frame(rank=2, step=17, layout=99, error=msg)
    data = f.to_bytes()
    h = FRAME_HDR.unpack(data[:36])
    assert h[2] == wire.FRAME_ERROR and h[3] == 0 and data[36:] == msg.encode()
    assert h[8] == zlib.crc32(data[:32] + msg.encode())
    g = Frame.from_bytes(data)
    assert g.error == msg and g.payloads == [] and (g.rank, g.step, g.layout) == (2, 17, 99)
    assert Frame.from_bytes(Frame(1, 1, 1, error="").to_bytes()).error == ""


def test_frame_corrupted_inner_payload_names_its_index():
    ps = _frame_payloads()
    data = Frame(rank=5, step=9, layout=1, payloads=ps).to_bytes()
    start = 36
    for i, p in enumerate(ps):
        for where, msg in ((start + 40, r"body checksum mismatch" if p.nbytes > 40 else r"."),
                           (start + 10, r"header checksum mismatch"),
                           (start + 1, r"bad magic")):
            if where >= start + p.nbytes:
                continue
            bad = bytearray(data)
            bad[where] ^= 0x10
            with pytest.raises(PayloadError, match=rf"rank 5, step 9\), payload {i}: .*{msg}"):
                Frame.from_bytes(bytes(bad), source="frame from rank 5")
        start += p.nbytes


def test_frame_malformed():
    ps = _frame_payloads()[:2]
    data = Frame(rank=1, step=2, layout=3, payloads=ps).to_bytes()
    for n in range(len(data)):
        with pytest.raises(PayloadError, match=r"truncated frame header" if n < 36 else r"body bytes, got"):
            Frame.from_bytes(data[:n])
    with pytest.raises(PayloadError, match=r"frame says \d+ body bytes, got \d+"):
        Frame.from_bytes(data + b"\0")
    with pytest.raises(PayloadError, match=r"bad frame magic"):
        Frame.from_bytes(b"HQAD" + data[4:])
    # every header byte after magic and version: flags, count, rank, step, layout, length, crc
    for i in range(5, 36):
        bad = bytearray(data)
        bad[i] ^= 0x04
        msg = {5: r"unknown frame flag bits 0x4"}.get(i, r"frame checksum mismatch")
        if 24 <= i < 32:
            msg = r"frame says \d+ body bytes, got \d+"
        with pytest.raises(PayloadError, match=msg):
            Frame.from_bytes(bytes(bad))
    h = list(FRAME_HDR.unpack(data[:36]))
    assert Frame.from_bytes(seal_frame(h, data[36:])).rank == 1      # seal_frame reproduces the crc

    h2 = h.copy()
    h2[1] = 7
    with pytest.raises(PayloadError, match=r"unsupported frame version 7 \(this build reads 2\)"):
        Frame.from_bytes(seal_frame(h2, data[36:]))
    h2[1] = 1                        # the previous format (header-only crc) is refused, not misread
    with pytest.raises(PayloadError, match=r"unsupported frame version 1"):
        Frame.from_bytes(seal_frame(h2, data[36:]))
    h2 = h.copy()
    h2[3] = 1                        # count says 1 but two payloads follow
    with pytest.raises(PayloadError, match=r"frame says 1 payloads, its body holds 2"):
        Frame.from_bytes(seal_frame(h2, data[36:]))
    h2[3] = 3                        # count says 3 but two payloads follow
    with pytest.raises(PayloadError, match=r"frame says 3 payloads, its body holds 2"):
        Frame.from_bytes(seal_frame(h2, data[36:]))
    bad = bytearray(data)
    bad[6] ^= 1                      # the same count change without resealing: corruption
    with pytest.raises(PayloadError, match=r"frame checksum mismatch"):
        Frame.from_bytes(bytes(bad))
    h2 = h.copy()
    h2[2] = 0x80
    with pytest.raises(PayloadError, match=r"unknown frame flag bits 0x80"):
        Frame.from_bytes(seal_frame(h2, data[36:]))
    with pytest.raises(PayloadError, match=r"gathered frame 4: bad frame magic"):
        Frame.from_bytes(b"\0" * 40, source="gathered frame 4")
    with pytest.raises(PayloadError, match=r"payload 2: payload at byte \d+: truncated header"):
        Frame.from_bytes(seal_frame(h[:7] + [len(data) - 36 + 5, 0], data[36:] + b"HQAD\0"))


def test_frame_checksum_covers_error_text_and_payload_sequence():
    """Changes that leave every payload valid on its own are caught by the frame checksum."""
    ps = [make("qsgd", seed=1), make("qsgd", seed=2), make("none", np.arange(3, dtype=np.float32))]
    blobs = [p.to_bytes() for p in ps]
    data = Frame(rank=1, step=5, layout=7, payloads=ps).to_bytes()
    head = data[:36]
    variants = {
        "swapped": blobs[1] + blobs[0] + blobs[2],
        "dropped": blobs[0] + blobs[1],
        "duplicated": blobs[0] + blobs[0] + blobs[2],
        "replaced": blobs[0] + make("qsgd", seed=3).to_bytes() + blobs[2],
    }
    for what, body in variants.items():
        h = list(FRAME_HDR.unpack(head))
        h[7] = len(body)             # a consistent length, so that only the checksum can tell
        if what == "dropped":
            h[3] = 2
        forged = FRAME_HDR.pack(*h)[:32] + head[32:36] + body
        with pytest.raises(PayloadError, match=r"frame checksum mismatch"):
            Frame.from_bytes(forged)
    # error text: every single-byte change, and a change that keeps valid UTF-8
    err = Frame(rank=2, step=3, layout=4, error="rank 2: non-finite gradient in fc.weight").to_bytes()
    for i in range(36, len(err)):
        for mask in (0x01, 0x20, 0xFF):
            bad = bytearray(err)
            bad[i] ^= mask
            with pytest.raises(PayloadError, match=r"frame checksum mismatch"):
                Frame.from_bytes(bytes(bad))
    with pytest.raises(PayloadError, match=r"frame checksum mismatch"):
        Frame.from_bytes(err.replace(b"rank 2:", b"rank 3:"))
    # an error flag turned on over payloads, or off over an error text
    bad = bytearray(data)
    bad[5] ^= wire.FRAME_ERROR
    with pytest.raises(PayloadError, match=r"frame checksum mismatch"):
        Frame.from_bytes(bytes(bad))
    bad = bytearray(err)
    bad[5] ^= wire.FRAME_ERROR
    with pytest.raises(PayloadError, match=r"payload 0: payload at byte 0: bad magic"):
        Frame.from_bytes(bytes(bad))


def test_frame_error_fields_validated_beyond_checksums():
    err = Frame(rank=2, step=3, layout=4, error="boom").to_bytes()
    h = list(FRAME_HDR.unpack(err[:36]))
    with pytest.raises(PayloadError, match=r"error text is not valid UTF-8"):
        Frame.from_bytes(seal_frame(h[:7] + [3, 0], b"\xff\xfe!", error=True))
    h2 = h.copy()
    h2[3] = 1
    with pytest.raises(PayloadError, match=r"error frame with a payload count of 1"):
        Frame.from_bytes(seal_frame(h2, err[36:], error=True))
    # lone surrogates cannot be encoded as UTF-8: the sender replaces them, the text stays valid
    assert Frame.from_bytes(Frame(0, 0, 0, error="a\udc80b").to_bytes()).error == "a?b"


def test_split_frames():
    frames = [Frame(rank=r, step=7, layout=11, payloads=[make("qsgd", seed=r)] * r).to_bytes() for r in range(4)]
    frames.append(Frame(rank=4, step=7, layout=11, error="boom").to_bytes())
    buf = b"".join(frames)
    parts = split_frames(buf)
    assert [bytes(p) for p in parts] == frames
    decoded = [Frame.from_bytes(p) for p in parts]
    assert [d.rank for d in decoded] == [0, 1, 2, 3, 4]
    assert [len(d.payloads) for d in decoded] == [0, 1, 2, 3, 0] and decoded[4].error == "boom"
    assert [p.tobytes() for p in split_frames(np.frombuffer(buf, np.uint8))] == frames
    assert split_frames(b"") == []
    with pytest.raises(PayloadError, match=rf"gathered buffer has {len(buf) - 1} bytes, frames account for {len(buf)}"):
        split_frames(buf[:-1])
    with pytest.raises(PayloadError, match=rf"truncated frame header at byte {len(buf)}"):
        split_frames(buf + b"\0" * 3)
    with pytest.raises(PayloadError, match=rf"bad frame magic .* at byte {len(frames[0])}"):
        split_frames(frames[0] + b"X" * len(frames[1]))
