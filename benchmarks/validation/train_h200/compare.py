"""moesim's grouped-GEMM model and its 2x backward (moesim/sim/training.py) against the forward and backward
grouped GEMMs measured on one H200 (``gemm_fwd_bwd_h200.json``, from ``gemm_fwd_bwd.py``).

Run from the checkout: ``python benchmarks/validation/train_h200/compare.py``. Per point: measured forward
(gate-up + down), measured backward (autograd: data- and weight-gradient GEMMs), their ratio, and moesim's
forward (``torch_reference``'s grouped-GEMM fit on the H200, ``calibrated/hgx-h200.yaml``) and backward (2x
the forward) with their errors; then the medians. Nothing is fitted to these points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from moesim.hardware.presets import preset  # noqa: E402
from moesim.hardware.spec import ClusterSpec  # noqa: E402
from moesim.sim.kernels import grouped_gemm_time  # noqa: E402
from moesim.sim.training import BACKWARD  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> int:
    data = json.loads((HERE / "gemm_fwd_bwd_h200.json").read_text())
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    spec = gpu.moe_pipelines["torch_reference"]
    print(f"{data['device']}, torch {data['torch']}: {len(data['records'])} points (ms; gate-up + down GEMMs)")
    print(f"{'shape':14s} {'E':>3s} {'rows':>6s} {'fwd':>7s} {'bwd':>7s} {'bwd/fwd':>7s} {'sim fwd':>8s} {'err':>6s} "
          f"{'sim bwd':>8s} {'err':>6s}")
    ratios, fwd_err, bwd_err = [], [], []
    for r in data["records"]:
        rows = np.full(r["experts"], float(r["rows_per_expert"]))
        d, f = r["d_model"], r["d_ff"]
        sim = 1e3 * float(grouped_gemm_time(rows, 2 * f, d, gpu, spec, weight_bytes=2, act_bytes=2, out_bytes=2)
                          + grouped_gemm_time(rows, d, f, gpu, spec, weight_bytes=2, act_bytes=2, out_bytes=2))
        fwd = r["fwd_gate_up_ms"] + r["fwd_down_ms"]
        bwd = r["bwd_gate_up_ms"] + r["bwd_down_ms"]
        sim_bwd = BACKWARD["gemm_gate_up"] * sim
        ratios.append(bwd / fwd)
        fwd_err.append(sim / fwd - 1)
        bwd_err.append(sim_bwd / bwd - 1)
        print(f"{r['shape']:14s} {r['experts']:3d} {r['rows']:6d} {fwd:7.3f} {bwd:7.3f} {bwd / fwd:7.2f} {sim:8.3f} "
              f"{fwd_err[-1]:+6.0%} {sim_bwd:8.3f} {bwd_err[-1]:+6.0%}")
    big = [i for i, r in enumerate(data["records"]) if r["rows"] >= 2048]
    print(f"measured backward / forward: median {np.median(ratios):.2f} (at >= 2048 rows "
          f"{np.median([ratios[i] for i in big]):.2f}); moesim assumes {BACKWARD['gemm_gate_up']:.0f}")
    print(f"median abs. error: forward {np.median(np.abs(fwd_err)):.1%}, backward {np.median(np.abs(bwd_err)):.1%} "
          f"(>= 2048 rows: {np.median(np.abs([fwd_err[i] for i in big])):.1%} / "
          f"{np.median(np.abs([bwd_err[i] for i in big])):.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
