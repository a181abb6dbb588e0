"""Measure the training side on this host (``moesim bench train``) and write ``train_h200.json`` into ``--out``.

A thin wrapper over :mod:`moesim.measure.train` that puts this checkout on sys.path and loads it without the
package's own dependencies, so it runs on a bare GPU machine with only torch:

    python benchmarks/validation/train_h200/measure.py --out $OUT            # one GPU: the GEMM sweep
    python benchmarks/validation/train_h200/measure.py --out $OUT --nproc 2  # and the collectives among 2 GPUs
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

from moesim.measure import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    a = ap.parse_args()
    path = train.run(a.out, nproc=a.nproc, cpu=a.cpu, quick=a.quick, log=lambda line: print(line, flush=True))
    os.replace(path, path.with_name("train_h200.json"))
    print(f"wrote {path.with_name('train_h200.json')}", flush=True)


if __name__ == "__main__":
    main()
