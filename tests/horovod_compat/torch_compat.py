"""pytest plugin (``-p torch_compat``), loaded for both implementations alike: lets Horovod 0.28.1's
test_torch.py run on the torch this project pins, without editing it.

Horovod's optimizer tests (test_broadcast_state, test_broadcast_state_options, test_force_allreduce)
build every subclass of ``torch.optim.Optimizer`` but LBFGS and SparseAdam, found with
``torch.optim.Optimizer.__subclasses__()``, and train a model that has 1-D biases with each. torch
2.9 added ``torch.optim.Muon``, which refuses parameters that are not 2-D, so on a current torch
those tests fail at Muon with Horovod's own DistributedOptimizer ("Muon only supports 2D
parameters"), before reaching the optimizers after it. This hides the optimizers Horovod 0.28.1 did
not know and cannot test that way from that one enumeration.
"""
import torch

NOT_IN_HOROVOD_0_28_TESTS = {"Muon"}
_type_subclasses = type.__subclasses__


def _optimizer_subclasses(cls):
    found = _type_subclasses(cls)
    if cls is torch.optim.Optimizer:
        found = [c for c in found if c.__name__ not in NOT_IN_HOROVOD_0_28_TESTS]
    return found


torch.optim.Optimizer.__subclasses__ = classmethod(_optimizer_subclasses)


def pytest_report_header(config):
    return f"torch_compat: torch.optim.Optimizer.__subclasses__() without {sorted(NOT_IN_HOROVOD_0_28_TESTS)}"
