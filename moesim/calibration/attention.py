"""Fit the attention-core model (:func:`moesim.sim.compute.attention_time`) to measured kernel timings.

Input: the JSON that ``moesim bench attention`` and benchmarks/validation/attention_h100/measure.py write
(:mod:`moesim.measure.attention`) - per attention shape, tensor parallel degree and phase, the time of the
FlashAttention core: causal prefill over ``seq_len``-token prompts, or decode of ``batch`` sequences over a
``context``-token KV cache. The time is the GPU-side ``gpu_kernel_ms`` (summed kernel durations from the
profiler) where the record has it, else the event-timed ``median_ms`` (a CPU run has no profiler; that time
includes the host's launch cost); each point says which (``timing``). The ``core``, ``qkv`` and ``o`` records
are read; the ``block`` records (the three as one region) are left for validation, skipped points ignored.

Four GPU parameters are fitted to the core by an exhaustive grid search for the smallest mean absolute log
error on the training points (the objective of :mod:`moesim.calibration.fit`): ``attention_efficiency``
(share of bf16 peak), ``attention_hbm_efficiency`` (share of HBM bandwidth reading K and V, which bounds
decode), ``attention_fixed_keys`` (fixed work per query row, in key positions) and ``attention_overhead_us``
(fixed cost per kernel). The rest of the GPU (peak, HBM
bandwidth) is taken as given. The whole grid is evaluated at once: the core's FLOPs and bytes are linear in
the context, so every candidate's time is a maximum of two linear terms. Errors are reported per point so
that a fit on one attention shape can be checked on another.

The ``qkv`` and ``o`` records (plain GEMMs of the FLOPs and bytes the record gives) fit the fifth,
``dense_efficiency``: the share of peak at which :func:`moesim.sim.compute.dense_time` runs the projections.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
from pydantic import ValidationError

from moesim.errors import InputError
from moesim.fileio import read_json_object
from moesim.hardware.spec import GPUSpec
from moesim.sim.compute import Attention, attention_time, gemm_time
from moesim.traces.model import ModelSpec

EFFICIENCIES = np.round(np.arange(0.20, 0.701, 0.01), 2)
FIXED_KEYS = tuple(range(0, 641, 32))
OVERHEADS_US = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0)
HBM_EFFICIENCIES = np.round(np.arange(0.40, 1.001, 0.02), 2)
DENSE_EFFICIENCIES = np.round(np.arange(0.30, 1.001, 0.01), 2)
Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class AttentionPoint:
    shape: str
    tp: int
    phase: Phase
    length: int  # seq_len (prefill) or context (decode)
    tokens: float  # tokens each GPU holds in moesim's terms: the TP group's tokens / tp
    model: ModelSpec
    measured_s: float
    timing: str  # the record field measured_s comes from: gpu_kernel_ms or median_ms

    @property
    def label(self) -> str:
        what = "s" if self.phase == "prefill" else "ctx"
        return f"{self.shape} tp{self.tp} {self.phase} {what}={self.length} tokens/GPU={self.tokens:g}"


@dataclass(frozen=True)
class ProjectionPoint:
    """One measured attention projection (``qkv`` or ``o``): a plain GEMM of the record's FLOPs and bytes."""

    shape: str
    tp: int
    phase: Phase
    part: str
    length: int
    tokens: int  # tokens of the TP group, all of which the GPU's slice of the weights processes
    flops: float
    nbytes: float
    measured_s: float
    timing: str

    @property
    def label(self) -> str:
        what = "s" if self.phase == "prefill" else "ctx"
        return f"{self.shape} tp{self.tp} {self.phase} {self.part} {what}={self.length} tokens={self.tokens}"


@dataclass(frozen=True)
class AttentionFit:
    attention_efficiency: float
    attention_fixed_keys: float
    attention_overhead_us: float
    attention_hbm_efficiency: float

    def apply(self, gpu: GPUSpec) -> GPUSpec:
        return gpu.model_copy(update={"attention_efficiency": self.attention_efficiency,
                                      "attention_fixed_keys": self.attention_fixed_keys,
                                      "attention_overhead_us": self.attention_overhead_us,
                                      "attention_hbm_efficiency": self.attention_hbm_efficiency})


def _positive(r: dict, key: str, src: str | None, where: str, integer: bool = False) -> Any:
    v = r.get(key)
    if v is None:
        raise InputError("missing", source=src, field=f"{where}.{key}")
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    if isinstance(v, bool) or not ok or v <= 0:
        raise InputError(f"must be a positive {'integer' if integer else 'number'} (got {v!r})", source=src,
                         field=f"{where}.{key}")
    return v


def _shape_model(shapes: Any, name: Any, src: str | None, where: str) -> ModelSpec:
    if not isinstance(shapes, dict):
        raise InputError("must be a mapping of shape name to d_model, n_heads, n_kv_heads, head_dim", source=src,
                         field="shapes")
    if not isinstance(name, str) or name not in shapes:
        raise InputError(f"not one of the file's shapes ({', '.join(map(str, shapes)) or 'none'}; got {name!r})",
                         source=src, field=f"{where}.shape")
    s = shapes[name]
    if not isinstance(s, dict):
        raise InputError("must be a mapping with d_model, n_heads, n_kv_heads, head_dim", source=src,
                         field=f"shapes.{name}")
    dims = {k: _positive(s, k, src, f"shapes.{name}", integer=True) for k in ("d_model", "n_heads", "n_kv_heads",
                                                                               "head_dim")}
    try:
        return ModelSpec(name=name, num_layers=1, num_experts=1, top_k=1, d_model=dims["d_model"], d_ff=1,
                         num_heads=dims["n_heads"], num_kv_heads=dims["n_kv_heads"], head_dim=dims["head_dim"])
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        key = {"num_heads": "n_heads", "num_kv_heads": "n_kv_heads"}.get(str(err["loc"][0]), str(err["loc"][0])) \
            if err["loc"] else ""
        raise InputError(msg, source=src, field=f"shapes.{name}" + (f".{key}" if key else "")) from None


def bench_points(raw: dict, source: str | None = None) -> tuple[list[AttentionPoint], list[ProjectionPoint]]:
    """The attention-core and projection records of a parsed attention-bench JSON (``records`` and
    ``shapes``), as points moesim can predict. A malformed record is an :class:`InputError` naming ``source``
    and the field."""
    records = raw.get("records")
    if not isinstance(records, list):
        raise InputError("must be a list of measured records", source=source, field="records")
    models: dict[str, ModelSpec] = {}
    cores: list[AttentionPoint] = []
    projections: list[ProjectionPoint] = []
    for i, r in enumerate(records):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise InputError("must be a mapping", source=source, field=where)
        if "skipped" in r:
            continue  # a point the run could not measure
        if "part" not in r:
            raise InputError("missing (one of qkv, core, o, block)", source=source, field=f"{where}.part")
        if r["part"] not in ("core", "qkv", "o"):
            continue
        name = r.get("shape")
        model = models.get(name) if isinstance(name, str) else None
        if model is None:  # raises unless name is one of the file's shapes
            model = _shape_model(raw.get("shapes"), name, source, where)
            models[model.name] = model
        tp = _positive(r, "tp", source, where, integer=True)
        phase = r.get("phase")
        if phase not in ("prefill", "decode"):
            raise InputError("missing" if phase is None else f"must be 'prefill' or 'decode' (got {phase!r})",
                             source=source, field=f"{where}.phase")
        prefill = phase == "prefill"
        length = _positive(r, "seq_len" if prefill else "context", source, where, integer=True)
        group_tokens = _positive(r, "tokens" if prefill else "batch", source, where, integer=True)
        timing = "gpu_kernel_ms" if r.get("gpu_kernel_ms") is not None else "median_ms"
        seconds = _positive(r, timing, source, where) * 1e-3
        if r["part"] == "core":
            cores.append(AttentionPoint(shape=model.name, tp=tp, phase=phase, length=length, tokens=group_tokens / tp,
                                        model=model, measured_s=seconds, timing=timing))
        else:
            projections.append(ProjectionPoint(shape=model.name, tp=tp, phase=phase, part=r["part"], length=length,
                                               tokens=group_tokens, flops=float(_positive(r, "flops", source, where)),
                                               nbytes=float(_positive(r, "bytes", source, where)),
                                               measured_s=seconds, timing=timing))
    return cores, projections


def attention_points(raw: dict, source: str | None = None) -> list[AttentionPoint]:
    """The attention-core records of a parsed attention-bench JSON (see :func:`bench_points`)."""
    return bench_points(raw, source)[0]


def load_attention_points(path: str | os.PathLike[str]) -> list[AttentionPoint]:
    """The attention-core points of an attention-bench JSON file (see :func:`attention_points`)."""
    return attention_points(read_json_object(path), str(path))


def predict(point: AttentionPoint, gpu: GPUSpec) -> float:
    """moesim's attention-core seconds for one measured point."""
    return float(attention_time(np.array([point.tokens]), point.model, gpu, Attention(point.phase, point.length))[0])


def predict_all(points: list[AttentionPoint], gpu: GPUSpec) -> np.ndarray:
    """:func:`predict` for every point, one model call per (shape, phase, length) with the token counts as
    an array (the same numbers, faster: the grid search calls this for every candidate)."""
    out = np.empty(len(points))
    groups: dict[tuple[ModelSpec, Phase, int], list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault((p.model, p.phase, p.length), []).append(i)
    for (model, phase, length), idx in groups.items():
        tokens = np.array([points[i].tokens for i in idx])
        out[idx] = attention_time(tokens, model, gpu, Attention(phase, length))
    return out


def errors(points: list[AttentionPoint], gpu: GPUSpec) -> np.ndarray:
    """Relative errors (predicted / measured - 1), one per point."""
    return predict_all(points, gpu) / np.array([p.measured_s for p in points]) - 1


def fit_attention(points: list[AttentionPoint], gpu: GPUSpec,
                  train: Callable[[AttentionPoint], bool] = lambda p: True) -> AttentionFit:
    """Grid-search the four attention parameters on the points ``train`` selects.

    The core's time on a point is ``max(F(k) / rate, B(k) / bandwidth) + overhead``, with FLOPs F and bytes
    B linear in the fixed keys k (:func:`moesim.sim.compute.attention_time`); F and B are read off the model
    at k = 0 and k = 1 and the grid is evaluated as one array. Ties go to the first candidate in the order
    (efficiency, fixed keys, overhead, HBM efficiency), each ascending.
    """
    chosen = [p for p in points if train(p)]
    if not chosen:
        raise ValueError("no training points")
    # FLOPs and bytes of each point at k = 0 and k = 1: with both rates 1 and no overhead the model returns the
    # larger of the two, so probe each alone by making the other free.
    probe = gpu.model_copy(update={"attention_overhead_us": 0.0})

    def terms(keys: float) -> tuple[np.ndarray, np.ndarray]:
        g = probe.model_copy(update={"attention_fixed_keys": keys})
        flops = predict_all(chosen, g.model_copy(update={"bf16_tflops": 1e-12, "attention_efficiency": 1.0,
                                                         "hbm_GBps": 1e30, "attention_hbm_efficiency": 1.0}))
        nbytes = predict_all(chosen, g.model_copy(update={"hbm_GBps": 1e-9, "attention_hbm_efficiency": 1.0,
                                                          "bf16_tflops": 1e30, "attention_efficiency": 1.0}))
        return flops, nbytes

    (f0, b0), (f1, b1) = terms(0.0), terms(1.0)
    keys = np.asarray(FIXED_KEYS, dtype=float)[:, None]
    flops = f0 + keys * (f1 - f0)  # [keys, points]
    nbytes = b0 + keys * (b1 - b0)
    rate = gpu.bf16_tflops * 1e12 * EFFICIENCIES  # [eff]
    bandwidth = gpu.hbm_GBps * 1e9 * HBM_EFFICIENCIES  # [hbm]
    over = np.asarray(OVERHEADS_US) * 1e-6  # [over]
    measured = np.array([p.measured_s for p in chosen])
    t = np.maximum(flops[None, :, None, None, :] / rate[:, None, None, None, None],
                   nbytes[None, :, None, None, :] / bandwidth[None, None, None, :, None]) \
        + over[None, None, :, None, None]  # [eff, keys, over, hbm, points]
    err = np.mean(np.abs(np.log(t / measured)), axis=-1)  # the objective of the network and FFN fits
    i, j, k, m = np.unravel_index(int(np.argmin(err)), err.shape)
    return AttentionFit(float(EFFICIENCIES[i]), float(FIXED_KEYS[j]), float(OVERHEADS_US[k]),
                        float(HBM_EFFICIENCIES[m]))


def predict_projections(points: list[ProjectionPoint], gpu: GPUSpec) -> np.ndarray:
    """moesim's GPU-side seconds for measured projections (:func:`moesim.sim.compute.gemm_time`)."""
    return gemm_time(np.array([p.flops for p in points]), np.array([p.nbytes for p in points]), gpu)


def fit_dense_efficiency(points: list[ProjectionPoint], gpu: GPUSpec) -> float:
    """The ``dense_efficiency`` (share of bf16 peak for the attention projections) with the smallest mean
    absolute log error on ``points``; their bytes go at the GPU's HBM rate as given."""
    if not points:
        raise ValueError("no training points")
    measured = np.array([p.measured_s for p in points])
    err = [np.mean(np.abs(np.log(predict_projections(points, gpu.model_copy(update={"dense_efficiency": float(e)}))
                                 / measured))) for e in DENSE_EFFICIENCIES]
    return float(DENSE_EFFICIENCIES[int(np.argmin(err))])
