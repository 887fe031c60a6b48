"""Quantizers and kernels: codebooks, counter-based RNG, NumPy reference, fast backends."""
from .codebooks import KINDS, QuantizerError, codebook, kind  # noqa: F401
