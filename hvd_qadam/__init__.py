"""hvd_qadam: quantized Adam with error feedback for Horovod and MPI.

    import horovod.torch as hvd, hvd_qadam
    hvd.init()
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                         named_parameters=model.named_parameters(),
                                         algorithm="efficient_adam", quantizer="qsgd", bits=4)
"""
from .api import dequantize, quantize  # noqa: F401
from .comm import CollectiveTimeout, CommError  # noqa: F401
from .compression import Compression  # noqa: F401
from .engine import ConsistencyError, NonFiniteGradientError  # noqa: F401
from .optimizer import DistributedOptimizer  # noqa: F401
from .ps import ps_init  # noqa: F401
from .quant.codebooks import QuantizerError  # noqa: F401
from .simulator import simulate  # noqa: F401
from .wire import Frame, Payload, PayloadError  # noqa: F401

__version__ = "0.1.0"
