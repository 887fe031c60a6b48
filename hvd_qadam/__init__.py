"""hvd_qadam: quantized Adam with error feedback for Horovod and MPI."""
from .api import dequantize, quantize  # noqa: F401
from .quant.codebooks import QuantizerError  # noqa: F401
from .wire import Frame, Payload, PayloadError  # noqa: F401

__version__ = "0.1.0"
