"""A second 2x H200 host, measured with moesim's own bench (measure.py, this folder), never used in a fit of
the shipped presets:

1. the shipped hgx-h200 preset (fitted on ../shared/calibration, another host) predicting every point;
2. ``moesim calibrate`` on this host's points: error on the held-out third.

    python benchmarks/validation/h200_host2/compare.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.calibration import calibrate, load_bench, predictions
from moesim.hardware import ClusterSpec, preset

HERE = Path(__file__).resolve().parent
GROUPS = {"all-to-all, p2p": ("a2a-uniform", "a2a-skew", "p2p"), "expert FFN": ("ffn",)}


def summary(label: str, preds: list, held: bool | None) -> None:
    for group, kinds in GROUPS.items():
        e = np.abs([p.error for p in preds if p.kind in kinds and (held is None or p.held_out == held)])
        if e.size:
            print(f"{label:34s} {group:16s} n={e.size:3d}  median |error| {np.median(e) * 100:5.1f}%  "
                  f"max {e.max() * 100:5.1f}%")


def main() -> None:
    data = load_bench(sorted(HERE.glob("*.json")))
    shipped = predictions(ClusterSpec(**preset("hgx-h200")), data)
    summary("shipped hgx-h200 preset, all points", shipped, None)
    floor = [p for p in shipped if p.kind == "a2a-uniform" and "[[1024," in p.label]
    if floor:
        print(f"  smallest uniform all-to-all: measured {floor[0].measured_ms:.3f} ms, "
              f"preset {floor[0].predicted_ms:.3f} ms (the per-call cost is the host's)")
    fit = calibrate(data, "hgx-h200", name="h200-host2")
    print("  refitted:", ", ".join(f"{k}={v:.4g}" for k, v in fit.fitted.items()))
    summary("moesim calibrate on this host, held out", fit.predictions, True)


if __name__ == "__main__":
    main()
