"""Measure the whole MoE layer's kernel pipeline on one GPU, step by step (``moesim bench moe``), and write
``moe_h200.json`` beside this script (or into ``--out``).

The measurement is :mod:`moesim.measure.moe` (torch_reference pipeline: router, permute, dispatch, regroup,
grouped GEMMs, activation, unregroup, combine, reduce through torch.distributed/NCCL; fused: a vLLM
fused_moe-style Triton pipeline; bf16 and rowwise fp8 experts; eight published MoE shapes; 32 to 16384 tokens;
uniform and Zipf routing; EP1 and an emulated EP8 slice). This wrapper only fixes the file name and puts this
checkout on sys.path, so it runs from a copy of the repository without ``pip install``:

    python benchmarks/validation/moe_h200/measure.py                   # the default sweep, ~2-4 min on an H200
    python benchmarks/validation/moe_h200/measure.py --out $OUT        # write moe_h200.json into $OUT instead
    python benchmarks/validation/moe_h200/measure.py --quick --out /tmp/moe   # a handful of points
    python benchmarks/validation/moe_h200/measure.py --cpu --out /tmp/moe     # CPU plumbing check, tiny shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: moesim without pip install
if "moesim" not in sys.modules:  # a bare GPU machine has torch but not moesim's own dependencies (pydantic, simpy,
    import types                 # ...): load moesim.measure without running the package's __init__, which needs them

    _pkg = types.ModuleType("moesim")
    _pkg.__path__ = [str(HERE.parents[2] / "moesim")]
    sys.modules["moesim"] = _pkg

from moesim.measure import moe  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE), help="folder for moe_h200.json (default: beside this script)")
    ap.add_argument("--quick", action="store_true", help="a handful of points")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (checks plumbing, not numbers)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (GPUs), launched with torchrun when > 1")
    ap.add_argument("--dtypes", default=",".join(moe.DTYPES))
    ap.add_argument("--pipelines", default=",".join(moe.PIPELINES))
    ap.add_argument("--warmup", type=int, help="untimed repetitions per point (default 3; CPU 1)")
    ap.add_argument("--reps", type=int, help="timed repetitions per point (default 12; CPU 2)")
    ap.add_argument("--max-seconds", type=float, default=moe.BUDGET_S,
                    help="points not started by then are recorded as skipped (negative: no limit)")
    a = ap.parse_args(argv)
    path = moe.run(a.out, cpu=a.cpu, quick=a.quick, nproc=a.nproc, dtypes=tuple(a.dtypes.split(",")),
                   pipelines=tuple(a.pipelines.split(",")), warmup=a.warmup, reps=a.reps,
                   max_seconds=a.max_seconds if a.max_seconds >= 0 else None, filename="moe_h200.json",
                   log=lambda line: print(line, flush=True))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
