"""Pin (or check) the digest of results.json for every shipped scenario at full size.

    python benchmarks/pin_results.py            # check against benchmarks/pinned_results.json
    python benchmarks/pin_results.py --update   # write the digests (run before a refactor)

A refactor must leave every digest as it was; the optimiser's wall time (``placement_info.solve_s``) is
dropped before hashing. Takes minutes (the DeepSeek-V3 scenario dominates). The DeepSeek-V3 ``ilp`` cuts its
stages at fractions of its time limit, so its digest depends on how busy the machine is: pin and check it on a
quiet machine.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from moesim.report.files import results_json
from moesim.study import load_scenario, run_study

ROOT = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).resolve().parent / "pinned_results.json"


def digest(doc: dict) -> str:
    for run in doc.get("runs", []):
        run.get("placement_info", {}).pop("solve_s", None)
    return hashlib.sha256(json.dumps(doc, indent=1, sort_keys=True).encode()).hexdigest()


def main() -> int:
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    files = [p for p in sorted((ROOT / "scenarios").glob("*.yaml")) if not only or p.stem in only]
    pinned = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    bad = 0
    for path in files:
        t0 = time.perf_counter()
        d = digest(results_json(run_study(load_scenario(path), progress=False)))
        state = "pinned" if "--update" in sys.argv else ("same" if pinned.get(path.stem) == d else "CHANGED")
        bad += state == "CHANGED"
        pinned[path.stem] = d if "--update" in sys.argv else pinned.get(path.stem)
        print(f"{path.stem:28s} {state:8s} {time.perf_counter() - t0:6.1f} s", flush=True)
    if "--update" in sys.argv:
        PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
