"""Measure the prefill attention-core kernel families, forward and backward (``moesim bench attention-kernels``), and
write ``attention_kernels_h200.json`` into ``--out``.

A thin wrapper over :mod:`moesim.measure.attention_kernels` that puts this checkout on sys.path and loads it without
the package's own dependencies, so it runs on a bare GPU machine with only torch:

    python benchmarks/validation/attention_h200/measure_kernels.py --out $OUT
    python benchmarks/validation/attention_h200/measure_kernels.py --cpu --out /tmp/x   # plumbing check
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
if "moesim" not in sys.modules:  # load moesim.measure without moesim/__init__ (pydantic, simpy, ... not needed)
    _pkg = types.ModuleType("moesim")
    _pkg.__path__ = [str(HERE.parents[2] / "moesim")]
    sys.modules["moesim"] = _pkg

from moesim.measure import attention_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=400.0)
    a = ap.parse_args()
    path = attention_kernels.run(a.out, cpu=a.cpu, max_seconds=a.max_seconds,
                                 log=lambda line: print(line, flush=True))
    os.replace(path, path.with_name("attention_kernels_h200.json"))
    print(f"wrote {path.with_name('attention_kernels_h200.json')}", flush=True)


if __name__ == "__main__":
    main()
