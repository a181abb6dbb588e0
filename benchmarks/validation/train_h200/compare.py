"""The experts' grouped GEMMs forward and backward on one H200 against moesim's training model: the backward is
``gpu.gemm_backward x forward`` (fitted by ``moesim calibrate`` on ``train_h200.json``, from ``moesim bench train``,
two thirds of its points; shipped in calibrated/hgx-h200.yaml), the benchmark's own autograd call a fixed
``harness`` fitted beside it and never simulated (moesim/calibration/train.py).

    python benchmarks/validation/train_h200/compare.py

Per file: the ratio and harness a fit on that file alone gives, then the held-out errors of the backward predicted
from the measured forward and from the forward moesim predicts (the torch_reference pipeline's grouped-GEMM fit).
``gemm_fwd_bwd_h200.json`` (an earlier run of the same sweep, another lease) is never fitted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from moesim.calibration.train import fit_backward, held_out, model_forward_ms, train_points  # noqa: E402
from moesim.hardware.presets import preset  # noqa: E402
from moesim.hardware.spec import ClusterSpec  # noqa: E402

HERE = Path(__file__).resolve().parent


def _points(name: str) -> list:
    raw = json.loads((HERE / name).read_text())
    if "gemms" not in raw:  # the earlier run's own layout: records with experts / rows_per_expert
        raw = {"gemms": [dict(r, local_experts=r["experts"]) for r in raw["records"]]}
    return train_points(raw, name)[0]


def main() -> int:
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    print(f"shipped hgx-h200: gpu.gemm_backward {gpu.gemm_backward} (2 = the FLOPs' ratio)")
    for name in ("train_h200.json", "gemm_fwd_bwd_h200.json"):
        pts = _points(name)
        held = held_out(pts)
        ratio, harness = fit_backward(pts, held)
        _, shipped_harness = fit_backward(_points("train_h200.json"), held_out(_points("train_h200.json")))
        fwd = np.array([p.fwd_ms for p in pts])
        bwd = np.array([p.bwd_ms for p in pts])
        model = np.array([model_forward_ms(p, gpu) for p in pts])
        h = np.array(held)
        big = np.array([p.rows_per_expert * p.experts >= 2048 for p in pts])
        print(f"{name}: {len(pts)} GEMMs; a fit on it alone: ratio {ratio:.2f}, harness {harness * 1e3:.0f} us; "
              f"measured backward / forward median {np.median(bwd / fwd):.2f} ({np.median((bwd / fwd)[big]):.2f} "
              f"at >= 2048 rows)")
        for what, f in (("from the measured forward", fwd), ("from moesim's forward", model)):
            err = (gpu.gemm_backward * f + shipped_harness) / bwd - 1
            sel = h if name == "train_h200.json" else np.ones_like(h)
            print(f"  backward {what:26s} ({'held out' if name == 'train_h200.json' else 'never fitted'}): "
                  f"median |error| {np.median(abs(err[sel])):.1%}, max {abs(err[sel]).max():.1%}; "
                  f">= 2048 rows {np.median(abs(err[sel & big])):.1%}")
        err = model / fwd - 1
        print(f"  forward, moesim vs measured: median |error| {np.median(abs(err)):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
