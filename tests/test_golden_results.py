"""Every shipped scenario, shrunk as the smoke test shrinks it, gives the pinned results.json, byte for byte.

The digests in tests/golden/results_sha256.json come from running the code (``python
tests/test_golden_results.py --update``), never from typing them. A refactor must leave them as they are; a
change of the model that moves the numbers updates them in the same commit and says why. The optimiser's own
wall time (``placement_info.solve_s``) is dropped before hashing. The full-size scenarios are pinned the same
way by ``python benchmarks/pin_results.py`` (minutes; run by hand).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_scenarios_smoke import SCENARIO_FILES, shrink  # noqa: E402

from moesim.report.files import results_json  # noqa: E402
from moesim.study import load_scenario, run_study  # noqa: E402

PINNED = Path(__file__).resolve().parent / "golden" / "results_sha256.json"


def results_digest(doc: dict) -> str:
    """sha256 of results.json as written, without the optimiser's wall time."""
    for run in doc.get("runs", []):
        run.get("placement_info", {}).pop("solve_s", None)
    return hashlib.sha256(json.dumps(doc, indent=1, sort_keys=True).encode()).hexdigest()


def shrunk_digest(path: Path) -> str:
    scenario = shrink(load_scenario(path))
    if scenario.training is not None:  # a training scenario: its training.json summary (moesim.report.training)
        from moesim.study.training import run_training

        return results_digest(run_training(scenario).summary())
    return results_digest(results_json(run_study(scenario, progress=False)))


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: p.stem)
def test_results_pinned(path):
    pinned = json.loads(PINNED.read_text())
    assert path.stem in pinned, f"{path.stem} has no pinned digest: run python tests/test_golden_results.py --update"
    assert shrunk_digest(path) == pinned[path.stem], f"results.json of {path.stem} changed"


if __name__ == "__main__" and "--update" in sys.argv:
    PINNED.write_text(json.dumps({p.stem: shrunk_digest(p) for p in SCENARIO_FILES}, indent=1) + "\n")
    print(f"wrote {PINNED}")
