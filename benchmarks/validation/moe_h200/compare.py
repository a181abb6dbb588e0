"""The MoE kernel pipelines' fit on one H200 (moe_h200.json): held-out errors by pipeline, dtype and phase, by
step, and the worst points. Prints what the shipped hgx-h200 preset predicts (its pipelines are what ``moesim
calibrate`` fits on the two thirds of the points not held out; the other third is never seen by the fit).

    python benchmarks/validation/moe_h200/compare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from moesim.calibration.moe import held_out, moe_points, predict_kernels  # noqa: E402
from moesim.hardware import ClusterSpec, preset  # noqa: E402


def main() -> None:
    points = moe_points(json.loads((HERE / "moe_h200.json").read_text()), "moe_h200.json")
    held = held_out(points)
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    rows, steps = [], {}
    for p, h in zip(points, held):
        total, per = predict_kernels(p, gpu)
        rows.append((p, h, total / p.kernels_ms - 1))
        if h:
            for k, v in per.items():
                if k in p.steps_ms:
                    steps.setdefault(k, []).append(v / p.steps_ms[k] - 1)
    print("MoE layer kernels (the layer less its all-to-alls), one H200, held-out points "
          "(decode: <= 512 tokens per GPU):")
    print(f"  {'pipeline':16s} {'dtype':5s} {'phase':8s} {'n':>3s} {'median |err|':>13s} {'max |err|':>10s} "
          f"{'bias':>7s}")
    for pipe in ("torch_reference", "fused"):
        for dt in ("bf16", "fp8"):
            for phase in ("decode", "prefill"):
                e = np.array([r[2] for r in rows if r[1] and r[0].pipeline == pipe and r[0].dtype == dt
                              and r[0].phase == phase])
                if e.size:
                    print(f"  {pipe:16s} {dt:5s} {phase:8s} {e.size:3d} {np.median(abs(e)) * 100:12.1f}% "
                          f"{abs(e).max() * 100:9.1f}% {np.median(e) * 100:+6.1f}%")
    print("  per step (all pipelines and dtypes):")
    for k, e in sorted(steps.items()):
        a = np.abs(e)
        print(f"    {k:14s} n={a.size:3d} median {np.median(a) * 100:5.1f}%  p90 {np.percentile(a, 90) * 100:5.1f}%  "
              f"max {a.max() * 100:6.1f}%")
    print("  worst held-out points:")
    for p, _, e in sorted((r for r in rows if r[1]), key=lambda r: -abs(r[2]))[:5]:
        print(f"    {p.label:60s} {e * 100:+6.1f}%")


if __name__ == "__main__":
    main()
