"""Measure kernels under sustained load against isolated launches (:mod:`moesim.measure.sustained`) and write
``sustained.json`` and ``nvidia_smi.csv`` into ``--out``.

A thin wrapper that puts this checkout on sys.path and loads moesim.measure without the package's own dependencies,
so it runs on a bare GPU machine with only torch:

    python benchmarks/validation/power_h200/measure_sustained.py --out $OUT        # about 2 minutes on an H200
    python benchmarks/validation/power_h200/measure_sustained.py --cpu --out /tmp/x   # plumbing check
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
if "moesim" not in sys.modules:  # load moesim.measure without moesim/__init__ (pydantic, simpy, ... not needed)
    _pkg = types.ModuleType("moesim")
    _pkg.__path__ = [str(HERE.parents[2] / "moesim")]
    sys.modules["moesim"] = _pkg

from moesim.measure import sustained  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of back-to-back launches per kernel")
    a = ap.parse_args()
    path = sustained.run(a.out, cpu=a.cpu, seconds=a.seconds, rest=0.2 if a.cpu else 2.0,
                         log=lambda line: print(line, flush=True))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
