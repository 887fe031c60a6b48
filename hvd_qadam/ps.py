"""Parameter-server topology over mpi4py (not implemented yet)."""


def ps_worker_comm():
    raise NotImplementedError("topology='ps' is not available yet")
