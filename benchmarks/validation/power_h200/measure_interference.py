"""Measure a prefill layer's compute beside a stand-in communication kernel on 24 SMs
(:mod:`moesim.measure.interference`) and write ``interference.json`` into ``--out``.

A thin wrapper that puts this checkout on sys.path and loads moesim.measure without the package's own dependencies,
so it runs on a bare GPU machine with torch and Triton:

    python benchmarks/validation/power_h200/measure_interference.py --out $OUT     # about 1 minute on an H200
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

from moesim.measure import interference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--comm-sms", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    path = interference.run(a.out, comm_sms=a.comm_sms, seconds=a.seconds, log=lambda line: print(line, flush=True))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
