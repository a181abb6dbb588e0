"""Multi-layer MoE blocks with real routing on one H200 (block_h200.json) against moesim's engine, predicted
before looking: the shipped hgx-h200 preset on one GPU, the default engine (torch_reference pipeline), the same
tokens of the same trace (the DeepSeek-V2-Lite prefill traces, read from ../shared at run time).

    python benchmarks/validation/moe_h200/compare_block.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from moesim.hardware import build_topology, deep_merge, preset  # noqa: E402
from moesim.hardware.spec import ClusterSpec  # noqa: E402
from moesim.placement.format import Placement  # noqa: E402
from moesim.sim.engine import Simulation  # noqa: E402
from moesim.study.config import EngineConfig  # noqa: E402
from moesim.traces.format import Trace, TraceMeta  # noqa: E402
from moesim.traces.model import ModelSpec  # noqa: E402
from moesim.traces.readers import import_trace  # noqa: E402


# the block runs: file, and which lease of an H200 (a lease is a different host, whose speed at issuing eager
# kernels differs: the decode blocks show it)
BLOCKS = (("block_h200.json", "lease 1, 2026-12-02, T 32-16,384, 1/4/26 layers, 7 repetitions"),
          ("block_h200_lease3a.json", "lease 3, 2026-12-03, T 32-8,192, 1/2/4/8/26 layers, 15 repetitions"),
          ("block_h200_lease3b.json", "lease 3, the same again right after"))


def predictions(experts: np.ndarray, records: list[dict]) -> list[tuple[dict, float]]:
    """The simulated time of the first ``tokens`` tokens through the first ``layers`` layers, per record."""
    spec = ClusterSpec(**deep_merge(preset("hgx-h200"), {"name": "1x1-h200", "nodes": 1, "gpus_per_node": 1}))
    topo = build_topology(spec)
    out = []
    for r in records:
        T, L = r["tokens"], r["layers"]
        model = ModelSpec(name="deepseek-v2-lite", num_layers=L, num_experts=64, top_k=6, d_model=2048, d_ff=1408,
                          dense_flops_per_token=0, dense_weight_bytes=0)
        trace = Trace(experts=np.ascontiguousarray(experts[:T, :L]),
                      meta=TraceMeta(num_experts=64, num_layers=L, top_k=6)).validate()
        placement = Placement.from_assignment(np.zeros((L, 64), dtype=np.int64), 1, "all")
        rec = Simulation(topo, model, options=EngineConfig().options()).run(trace, trace.layout(1, T), placement)
        out.append((r, float(rec.batch_end[0] - rec.batch_start[0]) * 1e3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    a = ap.parse_args()
    files = sorted((a.shared / "traces" / "deepseek-v2-lite-prefill").glob("*.csv.gz"))
    experts = np.asarray(import_trace(files, num_experts=64).trace.experts)
    print("MoE blocks with real DeepSeek-V2-Lite routing, one H200, torch_reference (moesim predicts, not fitted):")
    every = []
    for name, when in BLOCKS:
        measured = json.loads((HERE / name).read_text())["records"]
        print(f"{name} ({when}):")
        print(f"  {'tokens':>6s} {'layers':>6s} {'measured ms':>12s} {'moesim ms':>10s} {'error':>7s}")
        errors = []
        for r, ms in predictions(experts, measured):
            errors.append(ms / r["ms"] - 1)
            print(f"  {r['tokens']:6d} {r['layers']:6d} {r['ms']:12.2f} {ms:10.2f} {errors[-1] * 100:+6.1f}%")
        e = np.array(errors)
        every += errors
        print(f"  median |error| {np.median(abs(e)) * 100:.1f}%, max {abs(e).max() * 100:.1f}%, median error "
              f"{np.median(e) * 100:+.1f}% ({len(e)} blocks)")
    e = np.abs(every)
    print(f"All {len(e)} blocks: median |error| {np.median(e) * 100:.1f}%, max {e.max() * 100:.1f}%")


if __name__ == "__main__":
    main()
