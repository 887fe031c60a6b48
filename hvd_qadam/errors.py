"""Every exception hvd_qadam raises, when it is raised, and what to do about it.

This module imports nothing, so any module of the package (the quantizers in
:mod:`hvd_qadam.quant` included) can import from it without an import cycle. The modules that
raise these re-export them (``from hvd_qadam.engine import ConsistencyError`` keeps working), and
the package exports them all (``hvd_qadam.ConsistencyError``).

Configuration, at construction (nothing has run yet: fix the arguments):

* :class:`AlgorithmOptionError` (``ValueError``): ``DistributedOptimizer`` wraps an optimizer with
  an option the chosen algorithm cannot honour (``amsgrad=True`` under an Adam-family algorithm,
  an optimizer without ``betas``/``eps`` for one that runs Adam, ``ef_sgd`` without
  ``momentum``). Wrap another optimizer or choose ``algorithm="qsgd"``, which steps any optimizer.
* :class:`QuantizerError` (``ValueError``): a quantizer was asked for something it cannot do: an
  unknown name, a bit width or bucket size it does not allow, an unknown ``rounding``, a codebook
  where none is taken (or none where one is needed), non-floating input. Change the argument the
  message names.
* :class:`TopologyError` (``ValueError``): the ranks cannot be laid out as the topology needs
  (``HVD_QADAM_LOCAL_SIZE`` does not divide the world, ranks do not sit the same number per
  host). Fix the launch or the variable, or choose a flat topology (``allgather``, ``sharded``).

While training (the step was not taken and no state changed: residuals, moments and weights are
as they were before the step, on every rank):

* :class:`NonFiniteGradientError` (``FloatingPointError``): some rank had NaN/Inf in a gradient
  (or its update overflowed) under ``nonfinite="raise"``; every rank raises it, naming the
  parameters. Skip the batch and go on, lower the learning rate, or use ``nonfinite="skip"`` /
  ``"propagate"`` (with a GradScaler).
* :class:`ConsistencyError` (``RuntimeError``): ranks disagree about the model, the configuration
  or the step they are in (a rank restored another checkpoint, built another model, passed other
  options), or a checkpoint belongs to another model layout. Start every rank from the same model,
  options and checkpoint step.
* :class:`PayloadError` (``ValueError``): bytes received from a peer (or given to
  ``Payload.from_bytes``/``Frame.from_bytes``) are not a valid payload or frame; the message says
  which field. On a live run this means corruption or mismatched library versions on the ranks:
  install the same hvd_qadam everywhere.
* :class:`CommError` (``RuntimeError``): a collective could not complete (a peer failed or
  left, the parameter server answered with an error). The job cannot go on as it is: restart it
  from a checkpoint, or let Horovod Elastic recover.
* :class:`CollectiveTimeout` (a :class:`CommError`): a collective did not complete within the
  deadline (``timeout=``, ``HVD_QADAM_TIMEOUT``, default 300 s); the message names the ranks that
  did not answer. The job ends with a non-zero status after ``HVD_QADAM_TIMEOUT_EXIT_GRACE``
  seconds (10): save what you need in that time, then look at the ranks it names.
"""
from __future__ import annotations

__all__ = ["AlgorithmOptionError", "CollectiveTimeout", "CommError", "ConsistencyError", "NonFiniteGradientError",
           "PayloadError", "QuantizerError", "TopologyError"]


class AlgorithmOptionError(ValueError):
    """The wrapped optimizer has an option this algorithm cannot honour."""


class QuantizerError(ValueError):
    """A quantizer was asked for something it cannot do (bad name, bit width, bucket, input)."""


class TopologyError(ValueError):
    """A topology cannot run on this world (the ranks do not sit on hosts as it needs)."""


class NonFiniteGradientError(FloatingPointError):
    """Some rank had NaN/Inf in a gradient; the step was not taken and no state changed."""


class ConsistencyError(RuntimeError):
    """Ranks disagree about the model, the configuration or the step they are in."""


class PayloadError(ValueError):
    """Bytes that are not a valid payload or frame; the message says which field is wrong."""


class CommError(RuntimeError):
    """A collective could not complete (a peer failed or left)."""


class CollectiveTimeout(CommError):
    """A collective did not complete within the deadline (a peer hangs or died)."""
