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

from .api import dequantize, quantize
from .quant import rng


class NoneCompressor:
    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FP16Compressor:
    """Floating tensors travel as fp16 and come back in their own dtype (integers pass through)."""

    @staticmethod
    def compress(tensor):
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx) if ctx is not None else tensor


class QuantizeDequantizeCompressor:
    """Replaces each tensor by Q(tensor) decoded back to its dtype (fp32 on the wire).

    Each call draws from a fresh random stream keyed by (seed, rank, call number), since
    Horovod passes no name or step to a compressor.
    """

    def __init__(self, quantizer: str = "qsgd", bits: int | None = 4, bucket_size: int = 512,
                 rounding: str | None = None, seed: int = 0, rank: int | None = None):
        # Validate eagerly, on a tiny tensor, so a bad bit width fails at construction.
        quantize(torch.zeros(1), quantizer, bits, bucket_size, rounding=rounding)
        self.quantizer, self.bits, self.bucket_size, self.rounding = quantizer, bits, bucket_size, rounding
        self.seed, self._rank = seed, rank
        self._calls = itertools.count()

    def _stream(self) -> int:
        if self._rank is None:
            try:
                import horovod.torch as hvd
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
    def simulated(quantizer: str = "qsgd", bits: int | None = 4, bucket_size: int = 512,
                  rounding: str | None = None, seed: int = 0) -> QuantizeDequantizeCompressor:
        return QuantizeDequantizeCompressor(quantizer, bits, bucket_size, rounding, seed)
