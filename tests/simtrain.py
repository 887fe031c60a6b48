"""Kept importable for the test files that still import it (test_distributed.py); the helpers
live in tests/conftest.py, which also offers them as fixtures (``sim_train``,
``assert_same_params``)."""
from conftest import assert_same_params, sim_train  # noqa: F401
