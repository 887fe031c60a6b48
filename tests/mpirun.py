"""Kept importable for the test files that still import it (test_distributed.py,
test_horovod_compat.py); the helpers live in tests/conftest.py, which also offers them as
fixtures (``run_mpi``)."""
from conftest import HERE, mpirun_available, run_mpi  # noqa: F401
