"""Kernels under sustained load in ``moesim calibrate``: ``benchmarks/validation/power_h200/measure_sustained.py``
(format ``moesim.bench.sustained/1``, :mod:`moesim.measure.sustained`) gives ``GPUSpec.sustained_clock``.

Each kernel was timed in isolated launches (``burst_ms``, as every other fit's points were) and back to back for
seconds (``steady_ms``: the board at its power cap). The tensor-core kernels (an FP8 GEMM, a bf16 GEMM, the attention
core) fit the clock: the median of their burst / steady. The rest check it and are never fitted: the HBM copy
(predicted unchanged: a memory-bound kernel does not slow), the fused prefill layer from its parts' isolated times
(its GEMM and core parts at the sustained clock, the rest unchanged), the eager one (``layer``, predicted unchanged:
``engine.clock: auto`` runs eager PyTorch at boost, its memory-bound passes letting the board recover) and a decode
layer (``decode_*``: predicted unchanged from its whole isolated launches: decode steps run at boost).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from moesim.calibration.schema import number
from moesim.errors import InputError

FORMAT = "moesim.bench.sustained/1"
TENSOR = ("fp8_gemm", "bf16_gemm", "attention")  # tensor-core bound: they fit the clock
MEMORY = ("hbm_copy",)
TENSOR_PARTS = ("q_a+kv_a", "q_b", "kv_b", "core", "o", "experts_up", "experts_down", "shared", "router")


@dataclass(frozen=True)
class SustainedPoint:
    kernel: str
    burst_ms: float  # isolated launches
    steady_ms: float  # back to back, at the power cap
    tensor_share: float  # of burst_ms, in tensor-core bound kernels


def check_sustained(raw: dict, src: str) -> list[SustainedPoint]:
    """The points of one file; one-line errors naming a malformed field."""
    kernels = raw.get("kernels")
    if not isinstance(kernels, dict) or not kernels:
        raise InputError("must be an object of kernels", source=src, field="kernels")
    points = []
    for name, rec in kernels.items():
        if not isinstance(rec, dict):
            raise InputError("must be an object", source=src, field=f"kernels.{name}")
        burst = number(rec, "burst_ms", src, f"kernels.{name}")
        steady = number(rec, "steady_ms", src, f"kernels.{name}")
        if name in TENSOR or name in MEMORY:
            points.append(SustainedPoint(name, burst, steady, 1.0 if name in TENSOR else 0.0))
        elif "parts" in rec or name == "layer":  # a whole layer, its parts timed in bursts
            where = f"kernels.{name}.parts" if "parts" in rec else "layer_parts"
            parts = rec["parts"] if "parts" in rec else raw.get("layer_parts")
            if not isinstance(parts, dict) or not parts:
                raise InputError("a layer needs its parts' times", source=src, field=where)
            ms = {k: number(parts, k, src, where) for k in parts}
            if name.startswith("decode"):  # microsecond parts: each isolated launch pays a flush and a sync
                points.append(SustainedPoint(name, burst, steady, 0.0))
                continue
            total = sum(ms.values())
            eager = name == "layer"  # its FP8 inputs quantised op by op: run at boost (engine.clock auto)
            share = 0.0 if eager else sum(v for k, v in ms.items() if k in TENSOR_PARTS) / total
            points.append(SustainedPoint(name, total, steady, share))
    if not any(p.kernel in TENSOR for p in points):
        raise InputError(f"no tensor-core kernel ({', '.join(TENSOR)}) to fit the sustained clock", source=src,
                         field="kernels")
    return points


def fit_sustained(points: list[SustainedPoint]) -> float:
    """The sustained clock: the median over the tensor-core kernels of burst / steady, at most 1."""
    return min(1.0, statistics.median(p.burst_ms / p.steady_ms for p in points if p.kernel in TENSOR))


def predict_steady(p: SustainedPoint, clock: float) -> float:
    """A kernel's back-to-back time: its tensor-core share at the sustained clock, the rest as in bursts."""
    return p.burst_ms * (p.tensor_share / clock + 1.0 - p.tensor_share)


def sustained_predictions(points: list[SustainedPoint], clock: float) -> list[tuple[str, str, float, float, bool]]:
    """(kind, label, measured ms, predicted ms, held out) per point: the fitted kernels, then the checks."""
    return [("sustained" if p.kernel in TENSOR else "sustained-check",
             f"{p.kernel} back to back (tensor share {p.tensor_share:.0%})", p.steady_ms, predict_steady(p, clock),
             p.kernel not in TENSOR) for p in points]
