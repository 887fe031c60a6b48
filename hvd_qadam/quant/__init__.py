"""Quantizers and kernels: codebooks, counter-based RNG, what the backends share (``common``: sizes,
argument checks, level tables), the NumPy reference (the oracle) and the fast backends. Nothing
here imports from the rest of the package but :mod:`hvd_qadam.errors`, which imports nothing."""
from .codebooks import KINDS, QuantizerError, codebook, kind  # noqa: F401
