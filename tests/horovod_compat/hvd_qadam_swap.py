"""pytest plugin (``-p hvd_qadam_swap``): run Horovod's own tests with hvd_qadam in place of
``hvd.DistributedOptimizer``.

Loaded before the test module is imported, it replaces ``horovod.torch.DistributedOptimizer``
(the object a test reaches as ``hvd.DistributedOptimizer``) by a wrapper that makes the one-line
swap a user makes: ``hvd_qadam.DistributedOptimizer(...)`` with Horovod's arguments passed on
unchanged, plus ``quantizer="none"`` (full precision, so Horovod's exact checks apply) unless the
test passes a ``compression`` other than ``hvd.Compression.none`` (then that compression decides).
Extra keyword arguments for hvd_qadam can be given as JSON in ``HVD_QADAM_SWAP_KWARGS``.
Horovod's test file itself is not modified.
"""
import functools
import json
import os

import horovod.torch
import horovod.torch.optimizer

import hvd_qadam

_horovod_distributed_optimizer = horovod.torch.DistributedOptimizer
_extra = {"quantizer": "none"}
_extra.update(json.loads(os.environ.get("HVD_QADAM_SWAP_KWARGS", "{}")))


@functools.wraps(_horovod_distributed_optimizer)
def DistributedOptimizer(optimizer, named_parameters=None, *args, **kwargs):
    extra = dict(_extra)
    compression = args[0] if args else kwargs.get("compression")
    if compression not in (None, horovod.torch.Compression.none) and "quantizer" not in json.loads(
            os.environ.get("HVD_QADAM_SWAP_KWARGS", "{}")):
        extra.pop("quantizer")      # a test that asks for compression gets it (hvd.Compression.fp16 -> fp16)
    for key, value in extra.items():
        kwargs.setdefault(key, value)
    return hvd_qadam.DistributedOptimizer(optimizer, named_parameters, *args, **kwargs)


DistributedOptimizer.__doc__ = "hvd_qadam.DistributedOptimizer(..., quantizer='none') in place of Horovod's"
DistributedOptimizer.hvd_qadam_swap = True
horovod.torch.DistributedOptimizer = DistributedOptimizer
horovod.torch.optimizer.DistributedOptimizer = DistributedOptimizer


def pytest_report_header(config):
    return f"hvd_qadam_swap: hvd.DistributedOptimizer -> hvd_qadam.DistributedOptimizer(**{_extra!r})"
