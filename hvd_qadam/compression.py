"""Horovod ``Compressor`` objects, for ``hvd.DistributedOptimizer(..., compression=...)``.

Horovod's compressor API is compress -> allreduce -> decompress, without the tensor's name. An
allreduce sums what it is given and refuses uint8, so packed low-bit codes cannot travel this
way. These compressors are therefore honest about what they are:

* ``Compression.none`` / ``Compression.fp16``: summable formats (fp16 halves the bytes).
* ``Compression.simulated(quantizer, bits, ...)``: quantize-then-dequantize in fp32 before the
  allreduce. It reproduces the *statistics* of a quantized run (for convergence studies) but
  sends full fp32 tensors: **no bytes are saved**. Use :func:`hvd_qadam.DistributedOptimizer`
  for real savings.
"""
from __future__ import annotations

import itertools

import torch

from .codec import dequantize, quantize
from .quant import rng


try:  # Horovod's own compressors where Horovod is installed (it always is with hvd_qadam's install)
    from horovod.torch.compression import Compressor, FP16Compressor, NoneCompressor
except ImportError:  # pragma: no cover - the NumPy/torch-only use of the quantizers
    class Compressor:
        """Interface of Horovod's compressors: compress -> (tensor, ctx); decompress(tensor, ctx)."""

    class NoneCompressor(Compressor):
        @staticmethod
        def compress(tensor):
            return tensor, None

        @staticmethod
        def decompress(tensor, ctx):
            return tensor

    class FP16Compressor(Compressor):
        """Floating tensors travel as fp16 and come back in their own dtype (integers pass through)."""

        @staticmethod
        def compress(tensor):
            if tensor.dtype.is_floating_point:
                return tensor.to(torch.float16), tensor.dtype
            return tensor, None

        @staticmethod
        def decompress(tensor, ctx):
            return tensor.to(ctx) if ctx is not None else tensor


class QuantizeDequantizeCompressor(Compressor):
    """Replaces each tensor by Q(tensor) decoded back to its dtype (fp32 on the wire).

    Each call draws from a fresh random stream keyed by (seed, rank, call number), since
    Horovod passes no name or step to a compressor.
    """

    def __init__(self, quantizer: str = "qsgd", bits: int | None = None, bucket_size: int | None = None,
                 rounding: str | None = None, seed: int = 0, rank: int | None = None):
        # Validate eagerly, on a tiny tensor, so a bad bit width fails at construction.
        quantize(torch.zeros(1), quantizer, bits, bucket_size, rounding=rounding)
        self.quantizer, self.bits, self.bucket_size, self.rounding = quantizer, bits, bucket_size, rounding
        self.seed, self._rank = seed, rank
        self._calls = itertools.count()

    def _stream(self) -> int:
        if self._rank is None:
            try:
                import horovod.torch as hvd  # optional: the NumPy/torch-only use runs without it
                self._rank = hvd.rank() if hvd.is_initialized() else 0
            except ImportError:
                self._rank = 0
        return rng.stream_key(self.seed, self._rank, next(self._calls))

    def compress(self, tensor):
        if not tensor.dtype.is_floating_point or tensor.numel() == 0:
            return tensor, None
        q = quantize(tensor, self.quantizer, self.bits, self.bucket_size, rounding=self.rounding, key=self._stream())
        return dequantize(q), None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class Compression:
    """Mirror of ``horovod.torch.Compression`` with the quantize-dequantize option added."""
    none = NoneCompressor
    fp16 = FP16Compressor

    @staticmethod
    def simulated(quantizer: str = "qsgd", bits: int | None = None, bucket_size: int | None = None,
                  rounding: str | None = None, seed: int = 0) -> QuantizeDequantizeCompressor:
        """``bits``/``bucket_size`` None: the quantizer's defaults, as for :func:`hvd_qadam.quantize`."""
        return QuantizeDequantizeCompressor(quantizer, bits, bucket_size, rounding, seed)


def quantizer_of(compression) -> str | None:
    """The uplink quantizer hvd_qadam.DistributedOptimizer uses for a Horovod ``compression``
    argument: None for no compression (our default applies), "fp16" for fp16."""
    if compression is None or compression is NoneCompressor or isinstance(compression, NoneCompressor):
        return None
    if compression is FP16Compressor or isinstance(compression, FP16Compressor):
        return "fp16"
    if isinstance(compression, QuantizeDequantizeCompressor):
        return compression.quantizer
    name = getattr(compression, "__name__", type(compression).__name__)
    raise ValueError(f"compression={name} is not supported by hvd_qadam.DistributedOptimizer: pass "
                     f"hvd.Compression.none / .fp16, or choose a quantizer with quantizer=...")
