"""Another revision's simulation engine beside this tree's, for before/after benchmarks on the same inputs.

``load(rev)`` copies ``moesim/sim/*.py`` of git revision ``rev`` into a temporary package ``baseline_sim`` (its
``moesim.sim.`` imports pointed at the copy; everything below the sim layer - hardware, traces, placement - stays
this tree's) and returns it. ``simulate(package, topo, model, options, ...)`` runs one placement through that
package's ``Simulation`` with this tree's ``EngineOptions`` translated field by field.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAME = "baseline_sim"


def resolve(rev: str) -> str:
    """``rev`` as a commit; ``fork`` is where this branch left main (``git merge-base HEAD main``), whose engine
    runs on this tree's lower layers even after main has moved on."""
    args = ["merge-base", "HEAD", "main"] if rev == "fork" else ["rev-parse", rev]
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def load(rev: str) -> ModuleType:
    """The package ``baseline_sim``: revision ``rev``'s moesim/sim (:func:`resolve`)."""
    rev = resolve(rev)
    files = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:moesim/sim"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    folder = Path(tempfile.mkdtemp(prefix="moesim-baseline-")) / NAME
    folder.mkdir()
    for name in files:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:moesim/sim/{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (folder / name).write_text(text.replace("moesim.sim.", f"{NAME}.").replace("from moesim.sim import",
                                                                                         f"from {NAME} import"))
    sys.path.insert(0, str(folder.parent))
    for key in [k for k in sys.modules if k == NAME or k.startswith(NAME + ".")]:
        del sys.modules[key]
    package = importlib.import_module(NAME)
    importlib.import_module(f"{NAME}.overlap")  # imported lazily by the engine
    return package


def simulate(package: ModuleType, topo: Any, model: Any, options: Any, trace: Any, layout: Any, placement: Any, *,
             tp: int = 1, attention: Any = None) -> tuple[float, Any]:
    """CPU seconds of this process (engine construction included; on a shared machine steadier than wall time,
    which other jobs stretch) and records of one placement through ``package``'s engine."""
    engine = package.engine
    opts = engine.EngineOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
    start = time.process_time()
    sim = engine.Simulation(topo, model, tp=tp, options=opts, attention=attention)
    records = sim.run(trace, layout, placement)
    return time.process_time() - start, records


def max_relative_difference(a: Any, b: Any) -> float:
    """The largest relative difference between two runs' recorded GPU times."""
    import numpy as np

    return max(float(np.max(np.abs(b.gpu[k] - a.gpu[k]) / np.maximum(np.abs(a.gpu[k]), 1e-30), initial=0.0))
               for k in a.gpu if k.startswith("t_"))
