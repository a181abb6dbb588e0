"""Prefill attention kernels, forward and backward, measured on one H200 (``attention_kernels_h200.json``, from
``moesim bench attention-kernels``) against the shipped ``hgx-h200`` preset, point by point:

    python benchmarks/validation/attention_h200/compare_kernels.py

The preset's ``attention_kernels.cudnn`` and ``attention_backward`` are what ``moesim calibrate`` fits on two thirds
of this file's sizes; rows marked ``held out`` are the other third. FlashAttention-2's forward is the fit of
``attention_h200.json`` (other shapes), so every one of its rows here is held out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from moesim.calibration.attention_kernels import check_kernels, held_out, kernel_predictions  # noqa: E402
from moesim.hardware import ClusterSpec, preset  # noqa: E402


def main() -> int:
    path = HERE / "attention_kernels_h200.json"
    points = check_kernels(json.loads(path.read_text()), str(path))
    rows = kernel_predictions(points, held_out(points), ClusterSpec(**preset("hgx-h200")).gpu)
    print(f"{'kind':20s} {'point':40s} {'measured ms':>11s} {'moesim ms':>10s} {'error':>7s}")
    for kind, label, meas, pred, held in rows:
        print(f"{kind:20s} {label:40s} {meas:11.3f} {pred:10.3f} {pred / meas - 1:+7.1%}{'  held out' if held else ''}")
    for kind in sorted({r[0] for r in rows}):
        for held in (False, True):
            e = np.array([abs(p / m - 1) for k, _, m, p, h in rows if k == kind and h == held])
            if e.size:
                print(f"{kind:20s} {'held out' if held else 'fitted':8s} median |error| {np.median(e):.1%}, "
                      f"max {e.max():.1%} ({e.size} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
