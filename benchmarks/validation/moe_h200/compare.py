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

from moesim.calibration.moe import held_out, moe_points, predict_kernels, predict_point  # noqa: E402
from moesim.hardware import ClusterSpec, preset  # noqa: E402


RUNS = ("moe_h200.json", "moe_h200_run2.json")  # the same sweep twice, minutes apart


def repeatability() -> None:
    """The same point measured in the two runs: how far apart, by phase (the floor under any model's error)."""
    a, b = (json.loads((HERE / name).read_text())["records"] for name in RUNS)

    def key(r: dict) -> tuple:
        return r["shape"], r["ep"], r["pipeline"], r["dtype"], r["routing"], r["tokens"]

    second = {key(r): r for r in b if "skipped" not in r}
    print("Repeatability: the same point in two runs of the sweep, |difference| of the whole-layer medians:")
    for phase, lo, hi in (("decode", 0, 512), ("prefill", 2048, 1 << 40)):
        d = np.abs([second[key(r)]["total_ms"] / r["total_ms"] - 1 for r in a
                    if "skipped" not in r and key(r) in second and lo <= r["tokens"] <= hi])
        print(f"  {phase:8s} n={d.size:3d} median {np.median(d) * 100:4.1f}%  p90 {np.percentile(d, 90) * 100:4.1f}%  "
              f"max {d.max() * 100:5.1f}%")


def main() -> None:
    points = [p for name in RUNS for p in moe_points(json.loads((HERE / name).read_text()), name)]
    held = held_out(points)
    spec = ClusterSpec(**preset("hgx-h200"))
    gpu = spec.gpu
    rows, steps, whole = [], {}, []
    for p, h in zip(points, held):
        total = predict_kernels(p, gpu)[0] - predict_kernels(p, gpu)[1].get("a2a_issue", 0.0)  # in dispatch
        rows.append((p, h, total / p.kernels_ms - 1))
        layer, per = predict_point(p, spec)
        whole.append((p, h, layer / p.total_ms - 1))
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
    print("Whole layer on one GPU (kernels, the host issuing the dispatch, and NCCL's all-to-alls with one rank):")
    for pipe in ("torch_reference", "fused"):
        for dt in ("bf16", "fp8"):
            for phase in ("decode", "prefill"):
                e = np.array([r[2] for r in whole if r[1] and r[0].pipeline == pipe and r[0].dtype == dt
                              and r[0].phase == phase])
                if e.size:
                    print(f"  {pipe:16s} {dt:5s} {phase:8s} {e.size:3d} {np.median(abs(e)) * 100:12.1f}% "
                          f"{abs(e).max() * 100:9.1f}% {np.median(e) * 100:+6.1f}%")
    print("  per step (all pipelines and dtypes):")
    for k, e in sorted(steps.items()):
        a = np.abs(e)
        print(f"    {k:14s} n={a.size:3d} median {np.median(a) * 100:5.1f}%  p90 {np.percentile(a, 90) * 100:5.1f}%  "
              f"max {a.max() * 100:6.1f}%")
    print("  worst held-out points (whole layer):")
    for p, _, e in sorted((r for r in whole if r[1]), key=lambda r: -abs(r[2]))[:5]:
        print(f"    {p.label:60s} {e * 100:+6.1f}%")


if __name__ == "__main__":
    main()
    repeatability()
