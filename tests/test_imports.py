"""The package's import structure: no cycle between its modules, imports at the top of modules
(a lazy import only for an optional or slow dependency, with a comment saying why), the
quantizers independent of the layers above them, and every module importable first, in a fresh
interpreter."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "hvd_qadam")
# Modules with nothing to say at import but a dependency that is not always there.
OPTIONAL = ("horovod", "mpi4py", "cupy", "numba", "torch.utils.tensorboard")


def modules() -> dict:
    """{dotted name: path} of every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = modules()


def _resolve(module: str, node) -> list:
    """The package modules an import statement in ``module`` loads (not the package root, which
    every submodule import runs first and which imports nearly everything)."""
    is_pkg = MODULES[module].endswith("__init__.py")
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            base = base if is_pkg else base[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix]
        names += [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in MODULES]
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts) + 1):          # a submodule loads its parent packages too
            if ".".join(parts[:i]) in MODULES:
                out.add(".".join(parts[:i]))
    return sorted(out - {module})


def _imports(module: str):
    """(module-level imports, function-level imports): lists of (node, lines of source)."""
    src = open(MODULES[module]).read()
    tree = ast.parse(src)
    top, lazy = [], []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else top).append(child)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    walk(tree, False)
    return top, lazy, src.splitlines()


def import_graph() -> dict:
    return {m: sorted({t for node in _imports(m)[0] for t in _resolve(m, node)}) for m in MODULES}


def find_cycle(graph: dict):
    """A list of modules forming a cycle, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_checker_finds_cycles():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    # and it reads this package: the optimizer reaches the engine, the engine the wire format
    graph = import_graph()
    assert "hvd_qadam.engine" in graph["hvd_qadam.optimizer"] and "hvd_qadam.wire" in graph["hvd_qadam.engine"]
    assert graph["hvd_qadam.quant.codebooks"] == ["hvd_qadam.errors"]
    assert "hvd_qadam.quant" in graph["hvd_qadam.wire"] and "hvd_qadam.quant.backend" in graph["hvd_qadam.wire"]


def test_no_import_cycle_between_package_modules():
    assert find_cycle(import_graph()) is None


def test_lazy_imports_are_few_and_say_why():
    """Inside functions: only optional or slow dependencies (never a module of the package but
    one that imports CuPy, nor the standard library), each with a comment on its line."""
    bad = []
    for m in MODULES:
        _, lazy, lines = _imports(m)
        for node in lazy:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            internal = isinstance(node, ast.ImportFrom) and node.level > 0
            optional = any(n.split(".")[0] in OPTIONAL or n.startswith(OPTIONAL) for n in names)
            where = f"{m}:{node.lineno}: {lines[node.lineno - 1].strip()}"
            if internal and not any(a.name == "gpu_cupy" for a in node.names):
                bad.append(f"{where} (a package module: import it at the top)")
            elif not internal and not optional:
                bad.append(f"{where} (not an optional dependency: import it at the top)")
            elif "#" not in lines[node.lineno - 1]:
                bad.append(f"{where} (no comment saying why it is lazy)")
    assert bad == []


def test_quantizers_import_nothing_above_them():
    graph = import_graph()
    for m, targets in graph.items():
        if m.startswith("hvd_qadam.quant"):
            assert all(t.startswith("hvd_qadam.quant") or t == "hvd_qadam.errors" for t in targets), (m, targets)
    assert graph["hvd_qadam.errors"] == []


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first (the package's own modules forgotten in between), then every
    other: no module depends on another having been imported before it. Then the plain
    ``import hvd_qadam`` in a new process loads neither mpi4py nor CuPy (mpi4py starts MPI)."""
    names = sorted(m for m in MODULES if m != "hvd_qadam")
    code = textwrap.dedent(f"""
        import importlib, sys
        names = {names!r}
        for first in names:
            for k in [k for k in sys.modules if k == "hvd_qadam" or k.startswith("hvd_qadam.")]:
                del sys.modules[k]
            importlib.import_module(first)
            for other in names:
                importlib.import_module(other)
        print("ok", len(names))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["ok", str(len(names))]
    proc = subprocess.run([sys.executable, "-c", "import sys, hvd_qadam; print(hvd_qadam.__file__); "
                           "print(sorted(m for m in ('mpi4py', 'cupy') if m in sys.modules))"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path, loaded = proc.stdout.split("\n")[:2]
    assert os.path.dirname(path) == PACKAGE
    assert loaded == "[]"


@pytest.mark.parametrize("module", ["hvd_qadam.errors", "hvd_qadam.quant.codebooks"])
def test_leaves_have_no_package_imports_beyond_their_own(module):
    top, lazy, _ = _imports(module)
    assert lazy == []
    assert all(t in ("hvd_qadam.errors", "hvd_qadam.quant") for node in top for t in _resolve(module, node))
