"""moesim's own micro-benchmarks (``moesim bench a2a`` and ``moesim bench ffn``) on a lent 2x H200 host.

Run from the repository root on a machine with torch but without moesim's other dependencies (the lent
GPU machines have torch only), so the bench modules are imported without moesim/__init__:

    OUT=benchmarks/validation/h200_host2 python benchmarks/validation/h200_host2/measure.py

Writes a2a_2.json and expert_ffn.json into $OUT, in the format of ../shared/calibration.
"""
import os
import sys
import types

for name, path in (("moesim", "moesim"), ("moesim.measure", "moesim/measure")):
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    sys.modules.setdefault(name, mod)

from moesim.measure import a2a, ffn  # noqa: E402

if __name__ == "__main__":
    out = os.environ.get("OUT", ".")
    print(a2a.run(out, 2))
    print(ffn.run(out))
