"""Fit the attention-core model (:func:`moesim.sim.compute.attention_time`) to measured kernel timings.

Input: the JSON that benchmarks/validation/attention_h100/measure.py writes - per attention shape, tensor
parallel degree and phase, the GPU-side time (``gpu_kernel_ms``, summed kernel durations from the profiler)
of the FlashAttention core: causal prefill over ``seq_len``-token prompts, or decode of ``batch`` sequences over
a ``context``-token KV cache. Three GPU parameters are fitted by grid search for the smallest median absolute
relative error on the training points: ``attention_efficiency`` (share of bf16 peak), ``attention_fixed_keys``
(fixed work per query row, in key positions) and ``attention_overhead_us`` (fixed cost per kernel). The rest
of the GPU (peak, HBM bandwidth and efficiency) is the preset's, unchanged. Errors are reported per point so
that a fit on one attention shape can be checked on another.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moesim.hardware.spec import GPUSpec
from moesim.sim.compute import Attention, attention_time
from moesim.traces.model import ModelSpec

EFFICIENCIES = np.round(np.arange(0.20, 0.701, 0.01), 2)
FIXED_KEYS = tuple(range(0, 641, 32))
OVERHEADS_US = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0)


@dataclass(frozen=True)
class AttentionPoint:
    shape: str
    tp: int
    phase: str
    length: int  # seq_len (prefill) or context (decode)
    tokens: float  # tokens each GPU holds in moesim's terms: the TP group's tokens / tp
    model: ModelSpec
    measured_s: float

    @property
    def label(self) -> str:
        what = "s" if self.phase == "prefill" else "ctx"
        return f"{self.shape} tp{self.tp} {self.phase} {what}={self.length} tokens/GPU={self.tokens:g}"


@dataclass(frozen=True)
class AttentionFit:
    attention_efficiency: float
    attention_fixed_keys: float
    attention_overhead_us: float

    def apply(self, gpu: GPUSpec) -> GPUSpec:
        return gpu.model_copy(update={"attention_efficiency": self.attention_efficiency,
                                      "attention_fixed_keys": self.attention_fixed_keys,
                                      "attention_overhead_us": self.attention_overhead_us})


def load_attention_points(path: Path) -> list[AttentionPoint]:
    """The attention-core records of a measure.py JSON, as points moesim can predict."""
    data = json.loads(Path(path).read_text())
    out = []
    for r in data["records"]:
        if r["part"] != "core" or r.get("gpu_kernel_ms") is None:
            continue
        s = data["shapes"][r["shape"]]
        model = ModelSpec(name=r["shape"], num_layers=1, num_experts=1, top_k=1, d_model=s["d_model"], d_ff=1,
                          num_heads=s["n_heads"], num_kv_heads=s["n_kv_heads"], head_dim=s["head_dim"])
        prefill = r["phase"] == "prefill"
        group_tokens = r["tokens"] if prefill else r["batch"]
        out.append(AttentionPoint(shape=r["shape"], tp=r["tp"], phase=r["phase"],
                                  length=r["seq_len"] if prefill else r["context"],
                                  tokens=group_tokens / r["tp"], model=model, measured_s=r["gpu_kernel_ms"] * 1e-3))
    return out


def predict(point: AttentionPoint, gpu: GPUSpec) -> float:
    """moesim's attention-core seconds for one measured point."""
    return float(attention_time(np.array([point.tokens]), point.model, gpu, Attention(point.phase, point.length))[0])  # type: ignore[arg-type]


def errors(points: list[AttentionPoint], gpu: GPUSpec) -> np.ndarray:
    """Relative errors (predicted / measured - 1), one per point."""
    return np.array([predict(p, gpu) / p.measured_s - 1 for p in points])


def fit_attention(points: list[AttentionPoint], gpu: GPUSpec,
                  train: Callable[[AttentionPoint], bool] = lambda p: True) -> AttentionFit:
    """Grid-search the three attention parameters on the points ``train`` selects."""
    chosen = [p for p in points if train(p)]
    if not chosen:
        raise ValueError("no training points")
    best, best_err = None, np.inf
    for eff, keys, over in itertools.product(EFFICIENCIES, FIXED_KEYS, OVERHEADS_US):
        fit = AttentionFit(float(eff), float(keys), float(over))
        err = float(np.median(np.abs(errors(chosen, fit.apply(gpu)))))
        if err < best_err - 1e-12:
            best, best_err = fit, err
    assert best is not None
    return best
