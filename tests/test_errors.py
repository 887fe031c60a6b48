"""Every exception class of the package is defined in hvd_qadam.errors, exported by the package,
re-exported where it used to live, and documented (when raised, what to do)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import hvd_qadam
from hvd_qadam import errors

# Where each exception was defined before hvd_qadam.errors: these imports keep working.
OLD_HOMES = {"ConsistencyError": "engine", "NonFiniteGradientError": "engine", "CommError": "comm",
             "CollectiveTimeout": "comm", "PayloadError": "wire", "TopologyError": "topology",
             "AlgorithmOptionError": "algorithms", "QuantizerError": "quant.codebooks"}


def package_modules() -> list:
    names = []
    for info in pkgutil.walk_packages(hvd_qadam.__path__, "hvd_qadam."):
        if info.name == "hvd_qadam.quant.gpu_cupy":
            continue            # imports without CuPy too, but builds nothing of interest here
        names.append(info.name)
    return names


def test_every_exception_class_is_defined_in_errors():
    defined = {}
    for name in package_modules():
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("hvd_qadam"):
                defined.setdefault(obj.__qualname__, set()).add(obj.__module__)
    assert defined, "found no exception classes at all"
    assert {q: m for q, m in defined.items() if m != {"hvd_qadam.errors"}} == {}
    assert set(defined) == set(errors.__all__)


@pytest.mark.parametrize("name", errors.__all__)
def test_exported_documented_and_re_exported(name):
    cls = getattr(errors, name)
    assert getattr(hvd_qadam, name) is cls
    assert f":class:`{name}`" in errors.__doc__, f"{name} is not described in the errors module docstring"
    old = importlib.import_module(f"hvd_qadam.{OLD_HOMES[name]}")
    assert getattr(old, name) is cls


def test_bases_are_unchanged():
    # what callers catch today must still catch them
    assert issubclass(errors.ConsistencyError, RuntimeError)
    assert issubclass(errors.NonFiniteGradientError, FloatingPointError)
    assert issubclass(errors.CollectiveTimeout, errors.CommError) and issubclass(errors.CommError, RuntimeError)
    for name in ("PayloadError", "QuantizerError", "TopologyError", "AlgorithmOptionError"):
        assert issubclass(getattr(errors, name), ValueError)
