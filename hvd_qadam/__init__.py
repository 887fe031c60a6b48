"""hvd_qadam: quantized Adam with error feedback for Horovod and MPI.

    import horovod.torch as hvd, hvd_qadam
    hvd.init()
    opt = hvd_qadam.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                         named_parameters=model.named_parameters(),
                                         algorithm="efficient_adam", quantizer="qsgd", bits=4)

Every exception the package raises is in :mod:`hvd_qadam.errors` (and here), with when it is
raised and what to do.
"""
from .codec import dequantize, quantize  # noqa: F401
from .compression import Compression  # noqa: F401
from .errors import (AlgorithmOptionError, CollectiveTimeout, CommError, ConsistencyError,  # noqa: F401
                     NonFiniteGradientError, PayloadError, QuantizerError, TopologyError)
from .optimizer import DistributedOptimizer  # noqa: F401
from .ps import ps_init  # noqa: F401
from .simulator import simulate  # noqa: F401
from .wire import Frame, Payload  # noqa: F401

__version__ = "0.1.0"
