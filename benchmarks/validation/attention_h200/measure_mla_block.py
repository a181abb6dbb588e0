"""Measure DeepSeek-V3's attention block in prefill on one GPU (:mod:`moesim.measure.mla_block`) and write
``mla_block_h200.json`` into ``--out``; a thin wrapper that loads it without the package's own dependencies, so it
runs on a bare GPU machine with only torch:

    python benchmarks/validation/attention_h200/measure_mla_block.py --out $OUT
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

from moesim.measure import mla_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    path = mla_block.run(a.out, log=lambda line: print(line, flush=True))
    os.replace(path, path.with_name("mla_block_h200.json"))
    print(f"wrote {path.with_name('mla_block_h200.json')}", flush=True)


if __name__ == "__main__":
    main()
