"""bf16 and fp16 models: the 2-byte pass-through wire types, where they are chosen, and training
in the simulator with the dtype kept, replicas identical and the loss close to fp32's.

Full-precision values (the small tensors' group, warm-up steps, ``quantizer="none"``) travel in
``Config.passthrough_wire``'s type: bf16 for bfloat16 parameters, fp16 for float16 ones and
under an fp16 uplink, float32 otherwise. The bytes a step sends are counted exactly from the
frame layout (tests/mpi/byte_count.py) and compared with ``communication_stats``.
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest
import torch

import hvd_qadam
from hvd_qadam.codec import BF16_OVERFLOW, decode_flat, dequantize, fits_passthrough, quantize
from hvd_qadam.config import Config, LinkSpec
from hvd_qadam.engine import NonFiniteGradientError
from hvd_qadam.layout import Layout
from hvd_qadam.quant.common import bf16_bits, bf16_values
from hvd_qadam.wire import HEADER_SIZE, Frame, Payload, PayloadError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi"))
import byte_count  # noqa: E402 - tests/mpi/byte_count.py
from harness import digits  # noqa: E402


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


# ----------------------------------------------------------------------------- the wire type

def test_bf16_payload_is_torch_rounding_at_two_bytes_per_element():
    g = np.random.default_rng(1)
    x = (g.standard_normal(50_000) * 10.0 ** g.integers(-44, 38, 50_000)).astype(np.float32)
    # ties in both directions, subnormals, signed zeros, bf16's largest value
    x = np.concatenate([x[np.abs(x) < 3e38], np.float32([1.00390625, 1.01171875, -1.00390625, 1e-45, -1e-45,
                                                         0.0, -0.0, 3.3895e38, -3.3895e38])])
    assert np.array_equal(bf16_bits(x), _bits(torch.from_numpy(x).to(torch.bfloat16)))
    p = quantize(torch.from_numpy(x).reshape(1, -1), "bf16")
    assert p.nbytes == HEADER_SIZE + 2 * 8 + 2 * x.size
    back = Payload.from_bytes(p.to_bytes())
    assert back.quantizer == "bf16" and back.bits == 16 and back.codes.dtype == np.uint16
    assert np.array_equal(decode_flat(back), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    xb = torch.randn(7, 5).to(torch.bfloat16)
    y = dequantize(Payload.from_bytes(quantize(xb, "bf16").to_bytes()), like=xb)
    assert y.dtype == torch.bfloat16 and torch.equal(y, xb)
    assert np.array_equal(bf16_values(bf16_bits(x)).view(np.uint32) & 0xFFFF, np.zeros(x.size, np.uint32))


def test_two_byte_types_refuse_what_they_cannot_hold():
    over = torch.tensor([1.0, BF16_OVERFLOW])
    assert not fits_passthrough(over, "bf16") and fits_passthrough(torch.tensor([3.3895e38]), "bf16")
    with pytest.raises(ValueError, match="overflow bf16"):
        quantize(over, "bf16")
    assert not fits_passthrough(torch.tensor([65505.0]), "fp16") and fits_passthrough(torch.tensor([-65504.0]), "fp16")
    with pytest.raises(ValueError, match="overflow fp16"):
        quantize(torch.tensor([7e4]), "fp16")
    # a NaN pattern forged into a valid payload is rejected by name
    data = bytearray(quantize(torch.ones(4), "bf16").to_bytes())
    p = Payload.from_bytes(bytes(data))
    p.codes = p.codes.copy()
    p.codes[2] = 0x7FC0
    with pytest.raises(PayloadError, match="1 non-finite value"):
        Payload.from_bytes(p.to_bytes())


def test_frames_of_the_earlier_types_keep_their_bytes():
    """The bf16 type is a new quantizer id; the format version and every earlier payload's bytes
    are unchanged (this frame's length and crc32 were taken from the release before bf16)."""
    x = (np.arange(-7, 8, dtype=np.float32) / 4).reshape(3, 5)
    ps = [quantize(x, "none"), quantize(x.astype(np.float16), "fp16"), quantize(x.astype(np.float64), "none"),
          quantize(x, "qsgdinf", 6, 4, seed=3, rounding="nearest", backend="numpy")]
    f = Frame(rank=2, step=9, layout=0x1234, payloads=ps).to_bytes()
    assert (len(f), zlib.crc32(f)) == (482, 0x99B4C791)
    mixed = Frame(rank=0, step=1, layout=5, payloads=ps + [quantize(x, "bf16")]).to_bytes()
    assert [p.quantizer for p in Frame.from_bytes(mixed).payloads] == ["none", "fp16", "none", "qsgdinf", "bf16"]


# ----------------------------------------------------------------------------- where it is chosen

def _layout(model, **cfg):
    config = Config(**cfg)
    named = list(model.named_parameters())
    return Layout([{"params": [p for _, p in named]}], {p: n for n, p in named}, config.min_compress_numel,
                  config.fusion_threshold_bytes, exact_float64=config.exact_float64,
                  passthrough_wire=config.passthrough_wire)


def test_layout_groups_parameters_by_their_wire_type():
    model = digits.make_model()
    fp32 = _layout(model)
    assert [g.wire for g in fp32.groups] == ["none", "none"]
    assert all(len(entry) == 5 for entry in fp32.signature)   # the hash of fp32 models is unchanged

    assert [(g.compressed, g.wire) for g in _layout(model.to(torch.bfloat16)).groups] == [(True, "bf16"),
                                                                                           (False, "bf16")]
    # mixed: bf16 weights and float32 biases never share a group (no float32 value is sent in 2 bytes)
    mixed = digits.make_model().to(torch.bfloat16)
    for m in mixed:
        if isinstance(m, torch.nn.Linear):
            m.bias.data = m.bias.data.float()
    lay = _layout(mixed, min_compress_numel=2000)            # the last weight (1280) joins the small ones
    assert sorted((g.compressed, g.wire) for g in lay.groups) == [(False, "bf16"), (False, "none"), (True, "bf16")]
    for g in lay.groups:
        assert {str(s.param.dtype) for s in g.slots} == {"torch.float32" if g.wire == "none" else "torch.bfloat16"}
    assert [g.wire for g in _layout(digits.make_model().half()).groups] == ["fp16", "fp16"]
    # the user asked for fp16 on the wire: every float32 group's pass-through is fp16 ...
    assert [g.wire for g in _layout(digits.make_model(), uplink=LinkSpec("fp16")).groups] == ["fp16", "fp16"]
    # ... but float64 groups averaged exactly (algorithm qsgd, nothing quantized) stay float64
    lay = _layout(digits.make_model().double(), uplink=LinkSpec("fp16"))
    assert [(g.dtype, g.wire) for g in lay.groups] == [(torch.float32, "fp16"), (torch.float64, "none")]


# ----------------------------------------------------------------------------- training

def _train(world, dtype, base, steps, stats_at=(), **kwargs):
    """Per rank: (params, last-epoch loss, {step: (sent bytes, pass-through bytes per element)})."""
    def worker(rank, comm):
        seen = {}

        def on_step(step, opt):
            if step in stats_at:
                seen[step] = (opt.communication_stats.sent_bytes, byte_count.passthrough_bytes_per_element(opt))

        def make(m):
            return hvd_qadam.DistributedOptimizer(digits.base_optimizer(m, base), m.named_parameters(), comm=comm,
                                                  **kwargs)
        model, history = digits.train(rank, comm.size, make, epochs=1000, max_steps=steps, dtype=dtype,
                                      on_step=on_step)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, history[-1]["loss"], seen
    return hvd_qadam.simulate(world, worker)


# fp16 models train with SGD here: torch's own Adam on float16 parameters divides by
# sqrt(v) + 1e-8, and 1e-8 is 0 in float16 (NaN after a few steps with or without hvd_qadam).
CASES = [
    (torch.bfloat16, "adam", {}, "bf16"),
    (torch.bfloat16, "adam", {"quantizer": "none"}, "bf16"),
    (torch.bfloat16, "adam", {"algorithm": "efficient_adam", "warmup_steps": 3}, "bf16"),
    (torch.float16, "sgd", {}, "fp16"),
    (torch.float16, "sgd", {"quantizer": "none"}, "fp16"),
    (torch.float32, "adam", {"compression": "fp16"}, "fp16"),
]


@pytest.mark.parametrize("dtype,base,kwargs,wire", CASES,
                         ids=["bf16-defaults", "bf16-none", "bf16-efficient_adam-warmup", "fp16-defaults",
                              "fp16-none", "fp32-compression-fp16"])
def test_low_precision_model_trains_in_its_dtype(dtype, base, kwargs, wire):
    import horovod.torch as hvd
    kwargs = dict(kwargs)
    if kwargs.get("compression") == "fp16":
        kwargs["compression"] = hvd.Compression.fp16
    steps = 28                           # two epochs of the digits set
    world = 3
    runs = _train(world, dtype, base, steps, stats_at=(1, 2, 3, steps), **kwargs)
    # the same configuration on the float32 model (the fp16 wire of the last case: none)
    ref = _train(world, torch.float32, base, steps, **{k: v for k, v in kwargs.items() if k != "compression"})
    params = [r[0] for r in runs]
    for name, p in params[0].items():
        assert p.dtype == dtype, f"{name} is {p.dtype}"
        for other in params[1:]:
            assert np.array_equal(_bits(p) if p.dtype != torch.float32 else p.numpy().view(np.uint32),
                                  _bits(other[name]) if p.dtype != torch.float32 else
                                  other[name].numpy().view(np.uint32)), f"replicas differ in {name}"
        assert bool(torch.isfinite(p).all())
    loss, ref_loss = runs[0][1], ref[0][1]
    assert abs(loss - ref_loss) < 0.05 + 0.1 * ref_loss, (loss, ref_loss)
    for rank, (_, _, seen) in enumerate(runs):
        for step, (sent, bpe) in seen.items():
            # every step here has pass-through parts (small tensors, warm-up, or everything)
            assert bpe == {"bf16": 2.0, "fp16": 2.0}[wire], f"rank {rank} step {step}: {bpe} bytes per element"
            assert sent > 0


def test_fp16_wire_overflow_fails_every_rank_with_nothing_changed():
    """A value beyond fp16's range on one rank's fp16 uplink is that step's error on every rank
    (not a ValueError on one rank while the others wait)."""
    import horovod.torch as hvd

    def worker(rank, comm):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = hvd_qadam.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                             compression=hvd.Compression.fp16, nonfinite="raise", comm=comm)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        (model(torch.ones(2, 4)).sum() * (1e5 if rank == 2 else 1.0)).backward()
        try:
            opt.step()
            err = None
        except NonFiniteGradientError as e:
            err = str(e)
        same = all(torch.equal(before[n], p) for n, p in model.named_parameters())
        return err, same, opt.engine.step_count
    for err, same, count in hvd_qadam.simulate(3, worker):
        assert err is not None and "rank 2" in err and "2-byte wire type" in err, err
        assert same and count == 0
