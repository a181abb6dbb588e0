"""vLLM's fused MoE kernels and SGLang's DeepEP + DeepGEMM MoE compute, as AIConfigurator timed them on an H200 and
an H100, against the shipped presets.

The H200 tables are part of the shipped hgx-h200 fit (two thirds of their points; the held-out third is printed
apart). The H100 tables are never fitted: the dgx-h100 preset takes the H200's MoE kernel pipelines on the H100's
HBM and peak, so their errors say how well the model carries to a GPU moesim has not measured (the SGLang context
harness's own floor, fitted on the H200 rows, is the only thing carried over as is). Also printed: the measured and
predicted H100/H200 time ratios of the same vLLM points.

    python benchmarks/validation/aiconfigurator/compare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from moesim.calibration.moe import held_out, predict_point  # noqa: E402
from moesim.calibration.table import check_moe_table, fit_table_pipeline, table_points, with_floors  # noqa: E402
from moesim.hardware import ClusterSpec, preset  # noqa: E402


def load(name: str) -> list:
    path = HERE / name
    raw = json.loads(path.read_text())
    check_moe_table(raw, str(path))
    return table_points(raw, str(path))


def errors(points: list, spec: ClusterSpec) -> np.ndarray:
    return np.array([predict_point(p, spec)[0] / p.total_ms - 1 for p in points])


def line(label: str, e: np.ndarray) -> str:
    a = np.abs(e)
    return (f"  {label:34s} n={e.size:4d}  median |err| {np.median(a) * 100:5.1f}%"
            f"  p90 {np.percentile(a, 90) * 100:5.1f}%  max {a.max() * 100:5.1f}%  bias {np.median(e) * 100:+5.1f}%")


def table(name: str, title: str, spec200: ClusterSpec, spec100: ClusterSpec) -> tuple[list, list]:
    """Print one table's errors (H200 held out and fitted, H100 never fitted); return its H200 and H100 points."""
    h200, h100 = load(f"{name}_h200.json"), load(f"{name}_h100.json")
    held = np.array(held_out(h200))
    floors = fit_table_pipeline(h200, held.tolist(), spec200.gpu)[1]  # each eager harness's own floor
    h200, h100 = with_floors(h200, floors), with_floors(h100, floors)
    e200, e100 = errors(h200, spec200), errors(h100, spec100)
    print(title + (f" (harness floors fitted on the H200: {floors} ms)" if floors else ""))
    for gpu, pts, e, mask in (("H200 held out", h200, e200, held), ("H200 fitted", h200, e200, ~held),
                              ("H100 (not fitted)", h100, e100, np.ones(len(h100), bool))):
        for dtype in ("bf16", "fp8"):
            for phase in ("decode", "prefill"):
                sel = mask & np.array([p.dtype == dtype and p.phase == phase for p in pts])
                if sel.any():
                    print(line(f"{gpu}, {dtype} {phase}", e[sel]))
    worst = sorted(zip(e100, h100), key=lambda t: -abs(t[0]))[:4]
    print("  worst H100 points:", "; ".join(f"{p.dtype} {p.shape} EP{p.ep} T={p.tokens} {err * 100:+.0f}%"
                                            for err, p in worst))
    return h200, h100


def main() -> int:
    spec200, spec100 = ClusterSpec(**preset("hgx-h200")), ClusterSpec(**preset("dgx-h100"))
    h200, h100 = table("vllm_fused_moe", "vLLM fused_experts (moe_kernels: fused; CUDA graphs, no router), EP1, "
                       "balanced routing:", spec200, spec100)
    table("sglang_deepep_moe", "SGLang DeepEP MoE compute, DeepSeek-V3 (moe_kernels: deepgemm; decode: masked "
          "layout, CUDA graphs; prefill: contiguous, eager), uniform routing, EP 2-256:", spec200, spec100)
    key200 = {(p.dtype, p.shape, p.tokens): p for p in h200}
    pairs = [(p, key200[(p.dtype, p.shape, p.tokens)]) for p in h100 if (p.dtype, p.shape, p.tokens) in key200]
    meas = np.array([a.total_ms / b.total_ms for a, b in pairs])
    pred = np.array([predict_point(a, spec100)[0] / predict_point(b, spec200)[0] for a, b in pairs])
    print(f"vLLM: H100 / H200 time of the same {len(pairs)} points: measured median {np.median(meas):.3f} "
          f"(p10 {np.percentile(meas, 10):.3f}, p90 {np.percentile(meas, 90):.3f}), predicted median "
          f"{np.median(pred):.3f}; |ratio error| median {np.median(np.abs(pred / meas - 1)) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
