"""Fit plain (dense) GEMMs (:func:`moesim.sim.kernels.plain_gemm_time`) to measured timings, and predict them.

A ``moesim.bench.dense/1`` file (benchmarks/validation/moe_h200/dense.py) holds GEMMs ``[T, k] x [k, n]`` of real
models - shared experts, dense layers, MLA and GQA projections - in bf16 and fp8, each timed eagerly and as a
CUDA-graph replay (``graph_floor_us``, one replay's own cost, is subtracted). The fit is the grouped-GEMM model
with one expert holding every row: per dtype the tile shape (from the tiles cuBLAS uses), the share of the per-SM
peak a full tile reaches, the weight-read bandwidth share and the eager fixed cost, by grid search (mean absolute
log error); then the fixed cost under CUDA graphs at those. Every third record of each (dtype, GEMM) series,
in token order, is held out.

Deliberately ignored: split-K and stream-K (cuBLAS splits small-M, large-K GEMMs across SMs, so the smallest
GEMMs are where the model errs most), and L2 reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError
from moesim.hardware.spec import ClusterSpec, GemmSpec, GPUSpec
from moesim.sim.kernels import gemm_work, plain_gemm_time

TILES = ((64, 128), (128, 128), (128, 256), (256, 128))
KINDS = {"eager": "gemm", "cuda_graph": "gemm-graph"}  # prediction kind per launch


@dataclass(frozen=True)
class GemmPoint:
    """One measured plain GEMM: ``y[tokens, n] = x[tokens, k] @ W[n, k]^T``."""

    name: str
    dtype: str
    tokens: int
    k: int
    n: int
    ms: dict[str, float]  # by launch: "eager", "cuda_graph"

    @property
    def label(self) -> str:
        return f"{self.name} {self.dtype} T={self.tokens}"


def gemm_points(raw: dict, src: str) -> list[GemmPoint]:
    """The GEMM records of a ``moesim.bench.dense/1`` file (failed ones left out)."""
    floor = float(raw.get("graph_floor_us", 0.0))
    out = []
    for i, r in enumerate(raw["records"]):
        if r.get("kind") != "gemm" or "error" in r:
            continue
        ms = {"eager": float(r["eager_us"]) * 1e-3}
        if "graph_us" in r:
            ms["cuda_graph"] = max(float(r["graph_us"]) - floor, 0.5 * float(r["graph_us"])) * 1e-3
        if r["dtype"] not in ("bf16", "fp8") or any(not (v > 0 and np.isfinite(v)) for v in ms.values()):
            raise InputError("needs dtype bf16 or fp8 and positive timings", source=src, field=f"records[{i}]")
        out.append(GemmPoint(str(r["name"]), r["dtype"], int(r["tokens"]), int(r["k"]), int(r["n"]), ms))
    return out


def held_out(points: list[GemmPoint]) -> list[bool]:
    """Every third point of each (dtype, GEMM) series, in token order."""
    held = [False] * len(points)
    series: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(points):
        series.setdefault((p.dtype, p.name), []).append(i)
    for idx in series.values():
        for j, i in enumerate(sorted(idx, key=lambda i: points[i].tokens)):
            held[i] = j % 3 == 1
    return held


def _obs(points: list[GemmPoint], spec: GemmSpec, gpu: GPUSpec, fp8: bool,
         launch: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: one wave-quantised pass at full peak, its bytes at full HBM bandwidth, the measured seconds."""
    peak = ((gpu.fp8_tflops or 2 * gpu.bf16_tflops) if fp8 else gpu.bf16_tflops) * 1e12
    b = 1.0 if fp8 else 2.0
    waves, mem, meas = [], [], []
    for p in points:
        tiles, nbytes = gemm_work(np.array([[float(p.tokens)]]), p.n, p.k, spec, weight_bytes=b, act_bytes=b,
                                  out_bytes=2.0, fp8=fp8)
        waves.append(float(np.ceil(tiles[0] / gpu.sms)) * 2.0 * np.prod(spec.tile(fp8)) * p.k / (peak / gpu.sms))
        mem.append(float(nbytes[0]) / (gpu.hbm_GBps * 1e9))
        meas.append(p.ms[launch] * 1e-3)
    return np.array(waves), np.array(mem), np.array(meas)


def fit_plain_gemm(points: list[GemmPoint], held: list[bool], gpu: GPUSpec) -> GemmSpec:
    """The plain-GEMM fit on the points not held out (see the module docstring)."""
    from moesim.calibration.moe import _grid_gemm

    train = [p for p, h in zip(points, held) if not h]
    if not any(p.dtype == "bf16" for p in train):
        raise InputError("no bf16 GEMM points to fit plain GEMMs on", field="records")
    effs, meffs = np.linspace(0.2, 1.0, 81), np.linspace(0.1, 1.0, 91)
    fixeds = np.concatenate([[0.0], np.geomspace(1e-6, 2e-4, 40)])
    update: dict[str, float] = {}
    tile = (128, 128)
    for dtype, prefix in (("bf16", ""), ("fp8", "fp8_")):
        sel = [p for p in train if p.dtype == dtype]
        if not sel:
            continue
        fp8 = dtype == "fp8"
        best: tuple[float, float, float, float] = (np.inf, 0.0, 0.0, 0.0)
        for shape in TILES if not fp8 else (tile,):
            got = _grid_gemm(*_obs(sel, GemmSpec(tile_m=shape[0], tile_n=shape[1]), gpu, fp8, "eager"), effs, meffs,
                             fixeds)
            if got[0] < best[0]:
                best, tile = got, shape
        _, eff, meff, fx = best
        update.update({f"{prefix}gemm_efficiency": round(eff, 4),
                       f"{prefix}gemm_hbm_efficiency": round(meff, 4), f"{prefix}gemm_fixed_us": round(fx * 1e6, 2)})
        graphed = [p for p in sel if "cuda_graph" in p.ms]
        if graphed:
            spec = GemmSpec(tile_m=tile[0], tile_n=tile[1])
            gfx = _grid_gemm(*_obs(graphed, spec, gpu, fp8, "cuda_graph"), np.array([eff]), np.array([meff]),
                             fixeds)[3]
            update[f"graph_{prefix}gemm_fixed_us"] = round(gfx * 1e6, 2)
    return GemmSpec(tile_m=tile[0], tile_n=tile[1]).model_copy(update=update)


def gemm_predictions(points: list[GemmPoint], held: list[bool],
                     spec: ClusterSpec) -> list[tuple[str, str, float, float, bool]]:
    """(kind, label, measured ms, predicted ms, held out) per point and launch (kinds ``gemm``, ``gemm-graph``)."""
    out = []
    for p, h in zip(points, held):
        for launch, ms in p.ms.items():
            pred = float(plain_gemm_time(np.array(float(p.tokens)), p.n, p.k, spec.gpu, dtype=p.dtype,
                                         launch=launch)) * 1e3
            out.append((KINDS[launch], p.label, ms, pred, h))
    return out
