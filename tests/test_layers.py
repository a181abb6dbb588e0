"""Layering: no module under moesim/ imports a layer above its own (the order in moesim/__init__.py's docstring).

Read from the source with :mod:`ast`, not from what an import happens to load: every import counts, at any
depth (inside functions, under ``TYPE_CHECKING``), in every form (``import moesim.x``, ``from moesim.x import
y``, ``from moesim import x``, relative imports, ``importlib.import_module("moesim.x")``). Importing at run
time could not show this: ``import moesim.hardware`` runs moesim/__init__.py first, which loads nearly all.

Layers, lowest first; a module may import its own layer and those below it. ``measure`` (GPU micro-benchmarks;
needs torch) stands apart: it may import only :data:`BENCH_MAY_IMPORT`, and only ``cli`` (which runs
``moesim bench``) may import it. The top-level package's re-exports (moesim/__init__.py) sit above
everything: that file is not checked, and no module may import names from it (``import moesim``,
``from moesim import load_scenario``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moesim"

LAYERS: list[set[str]] = [
    {"errors", "fileio", "scratch", "budget", "loaders"},  # serve all
    {"hardware"},
    {"traces"},
    {"placement"},
    {"sim"},
    {"metrics", "calibration"},
    {"study"},
    {"report"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
BENCH = "measure"
BENCH_MAY_IMPORT = {"errors", "fileio", "hardware", "traces"}
API = "the moesim package's API (moesim/__init__.py)"


def module_name(path: Path) -> str:
    """``moesim/study/plan.py`` -> ``moesim.study.plan``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``moesim.study.plan`` -> ``study``; ``moesim`` itself -> :data:`API`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else API


def imported_modules(module: str, source: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every moesim import in ``source``, the code of ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "moesim":  # from moesim import x: the submodule x, else a name of the package's API
                found += [(node.lineno, f"moesim.{alias.name}" if _is_submodule(alias.name) else "moesim")
                          for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and _called_name(node.func) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "moesim" or name.startswith("moesim.")]


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _called_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def allowed(importer: str, imported: str) -> bool:
    """May a module of layer ``importer`` import one of layer ``imported``?"""
    if importer == imported:
        return True
    if imported == API:
        return False
    if importer == BENCH:
        return imported in BENCH_MAY_IMPORT
    if imported == BENCH:
        return importer == "cli"
    return RANK[imported] <= RANK[importer]


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """Each import in ``source`` (the code of ``module``) that reaches above the module's layer, or into a
    part of moesim that no layer names: ``module:line imports name (its layer may not be imported by mine)``."""
    mine = layer_of(module)
    known = set(RANK) | {BENCH}
    if mine not in known:
        return [f"{module} is in no layer: add {mine!r} to tests/test_layers.py's LAYERS"]
    found = []
    for line, name in imported_modules(module, source, is_package=is_package):
        theirs = layer_of(name)
        if theirs != API and theirs not in known:
            found.append(f"{module}:{line} imports {name}, which is in no layer")
        elif not allowed(mine, theirs):
            found.append(f"{module}:{line} imports {name} ({theirs} may not be imported by {mine})")
    return found


def _package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_no_module_imports_a_higher_layer():
    files = _package_files()
    found, checked = [], 0
    for path in files:
        module, source = module_name(path), path.read_text()
        checked += len(imported_modules(module, source, is_package=path.name == "__init__.py"))
        found += violations(module, source, is_package=path.name == "__init__.py")
    assert not found, "imports against the layer order:\n" + "\n".join(found)
    # the scan itself saw the package: every layer has modules, and there are imports to check
    assert {layer_of(module_name(p)) for p in files} == set(RANK) | {BENCH}
    assert checked > 100


@pytest.mark.parametrize(("module", "source", "culprit"), [
    ("moesim.hardware.spec", "def f():\n    from moesim.sim.engine import Simulation\n", "moesim.sim.engine"),
    ("moesim.traces.format", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import moesim.placement\n",
     "moesim.placement"),
    ("moesim.placement.ilp", "from moesim import study\n", "moesim.study"),
    ("moesim.study.plan", "from ..report import text\n", "moesim.report"),  # relative
    ("moesim.report", "from .. import cli\n", "moesim.cli"),  # relative, in a package's __init__.py
    ("moesim.sim.engine", "import importlib\nimportlib.import_module('moesim.metrics.summary')\n",
     "moesim.metrics.summary"),
    ("moesim.report.files", "from moesim import load_scenario\n", "moesim "),  # the API sits above everything
    ("moesim.cli.run", "import moesim\n", "moesim "),
    ("moesim.errors", "from moesim.hardware import preset\n", "moesim.hardware"),  # errors, fileio import none
    ("moesim.measure.a2a", "from moesim.sim import engine\n", "moesim.sim"),  # bench stands apart
    ("moesim.study.plan", "from moesim.measure import ffn\n", "moesim.measure"),
    ("moesim.placement.format", "from moesim.nowhere import x\n", "moesim.nowhere"),  # a part in no layer
    ("moesim.newlayer.x", "import numpy\n", "'newlayer'"),
])
def test_the_rule_catches_a_violation(module, source, culprit):
    found = violations(module, source, is_package=module == "moesim.report")
    assert len(found) == 1 and culprit in found[0], found


@pytest.mark.parametrize(("module", "source"), [
    ("moesim.study.plan", "import numpy\nfrom moesim.hardware.topology import Topology\nfrom . import config\n"),
    ("moesim.metrics.summary", "def f():\n    from moesim.calibration import fit\n"),  # one layer, two packages
    ("moesim.traces.format", "from moesim.errors import InputError\nfrom moesim import fileio\n"),
    ("moesim.cli.run", "from .common import key_values\nfrom moesim.measure import a2a\nimport moesim.report.text\n"),
    ("moesim.measure.ffn", "from moesim.hardware import preset\nfrom moesim.traces import format\n"),
])
def test_the_rule_allows_the_order(module, source):
    assert violations(module, source) == []


def test_modules_and_functions_stay_small():
    """No module of moesim over 600 lines, no function over 80 (complexity is ruff's C901, at 15)."""
    import ast

    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 600:
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                if node.end_lineno - node.lineno + 1 > 80:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: "
                                    f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
