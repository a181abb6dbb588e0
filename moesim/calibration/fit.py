"""Fit the hardware model to micro-benchmarks, and measure its error on points held out of the fit.

Every prediction goes through the ordinary simulation path: an all-to-all or point-to-point transfer is a
collective on the cluster's graph run by :class:`moesim.sim.network.Fabric` (exact max-min), an expert FFN
is :func:`moesim.sim.compute.expert_time`, an attention core :func:`moesim.sim.compute.attention_time`.
Network and FFN parameters are fitted by Nelder-Mead on the mean absolute log error over the training points;
the attention core by the grid search of :func:`moesim.calibration.attention.fit_attention` (smallest median
absolute relative error), after the FFN fit, on the GPU it gives. Every third point of each sweep, ordered
by size, is held out of the fit.

Fitted: NVLink efficiency (achievable bandwidth), per-call all-to-all launch cost, per-message latency,
local (self) copy bandwidth; GPU compute and HBM efficiency, FFN launch cost and launch-bound floor;
attention-core efficiency, HBM efficiency, fixed keys per query row and per-kernel cost; the attention
projections' GEMM efficiency (``dense_efficiency``). A group of parameters is fitted only
when the benchmark files have its points; the others stay the preset's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import simpy

from moesim.calibration.attention import (AttentionPoint, ProjectionPoint, fit_attention, fit_dense_efficiency,
                                         predict_all, predict_projections)
from moesim.calibration.bench import A2APoint, BenchData, FFNPoint, P2PPoint
from moesim.calibration.attention_kernels import fit_kernels, kernel_predictions
from moesim.calibration.attention_kernels import held_out as held_out_kernels
from moesim.calibration.sustained import fit_sustained, sustained_predictions
from moesim.calibration.gemm import fit_plain_gemm, gemm_predictions
from moesim.calibration.gemm import held_out as gemm_held_out
from moesim.calibration.moe import fit_graph_pipelines, fit_pipelines, fit_self_a2a, held_out, moe_predictions
from moesim.calibration.train import fit_backward, train_predictions
from moesim.calibration.train import held_out as held_out_train
from moesim.calibration.table import fit_table_pipeline, with_floors
from moesim.hardware.presets import deep_merge, preset
from moesim.hardware.spec import ClusterSpec
from moesim.hardware.topology import build_topology
from moesim.sim.compute import expert_time
from moesim.sim.network import CollectiveResult, Fabric
from moesim.traces.model import ModelSpec


@dataclass(frozen=True)
class Prediction:
    kind: str  # a2a-uniform, a2a-skew, p2p, ffn, attention
    label: str
    measured_ms: float
    predicted_ms: float
    held_out: bool

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


def _node(spec: ClusterSpec, world: int) -> ClusterSpec:
    return ClusterSpec(**deep_merge(spec.model_dump(), {"nodes": 1, "gpus_per_node": world}))


def predict_transfer(spec: ClusterSpec, matrix: np.ndarray) -> np.ndarray:
    """Per-rank milliseconds of one collective moving ``matrix`` on one node of ``len(matrix)`` GPUs."""
    topo = build_topology(_node(spec, matrix.shape[0]))
    env = simpy.Environment()
    fabric = Fabric(env, topo, rate_tolerance=0.0)
    proc = env.process(fabric.collective("calibration", matrix))
    env.run()
    result = proc.value
    assert isinstance(result, CollectiveResult)
    return (result.gpu_done - result.start) * 1e3


def predict_ffn(spec: ClusterSpec, point: FFNPoint) -> float:
    model = ModelSpec(num_layers=1, num_experts=len(point.tokens), top_k=1, d_model=point.d_model, d_ff=point.d_ff)
    return float(expert_time(np.array([point.tokens]), model, spec.gpu, grouped=False)[0] * 1e3)


def split(points: list[Any], key: Callable[[Any], Any]) -> list[bool]:
    """Hold out every third point of each group, ordered by size within the group."""
    held = [False] * len(points)
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(key(p), []).append(i)
    for idx in groups.values():
        order = sorted(idx, key=lambda i: _size(points[i]))
        for j, i in enumerate(order):
            held[i] = j % 3 == 1
    return held


def _size(p: Any) -> float:
    if isinstance(p, A2APoint):
        return float(p.matrix.sum())
    if isinstance(p, P2PPoint):
        return p.nbytes
    if isinstance(p, AttentionPoint):
        return p.tokens * p.length  # proportional to the core's work per GPU within a (shape, phase) group
    if isinstance(p, ProjectionPoint):
        return p.flops
    return float(sum(p.tokens))


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.3, iters: int = 300,
                progress: Callable[[int], object] | None = None) -> np.ndarray:
    """Minimise ``f`` from ``x0`` (a small, dependency-free Nelder-Mead). ``progress(n)`` is told of the
    iterations done, ``iters`` in all (those a convergence skips, at once)."""
    n = x0.size
    simplex = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    for it in range(iters):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        xr = centroid + (centroid - worst)
        fr = f(xr)
        if fr < values[0]:
            xe = centroid + 2 * (centroid - worst)
            fe = f(xe)
            simplex[-1], values[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (worst - centroid)
            fc = f(xc)
            if fc < values[-1]:
                simplex[-1], values[-1] = xc, fc
            else:
                best = simplex[0]
                simplex = [best] + [best + 0.5 * (x - best) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
        converged = bool(np.ptp(values) < 1e-6)
        if progress is not None:
            progress(iters - it if converged else 1)
        if converged:
            break
    return simplex[int(np.argmin(values))]


# Each fitted parameter: where it lives in the cluster dict, its start value, and bounds.
NETWORK_PARAMS = (
    (("nvlink", "efficiency"), 0.8, (0.05, 1.0)),
    (("a2a_launch_us",), 35.0, (1.0, 500.0)),
    (("nvlink", "latency_us"), 2.0, (0.1, 200.0)),
    (("gpu", "local_copy_GBps"), 500.0, (10.0, 20000.0)),
)
FFN_PARAMS = (
    (("gpu", "compute_efficiency"), 0.6, (0.05, 1.0)),
    (("gpu", "hbm_efficiency"), 0.7, (0.05, 1.0)),
    (("gpu", "ffn_overhead_us"), 30.0, (0.1, 500.0)),
    (("gpu", "ffn_floor_us"), 50.0, (0.1, 500.0)),
)


def _apply(base: dict, params: tuple, x: np.ndarray) -> dict:
    out = deep_merge(base, {})
    for ((*path, leaf), _, (lo, hi)), v in zip(params, np.exp(x)):
        node = out
        for p in path:
            node = node[p]
        node[leaf] = float(min(max(v, lo), hi))
    return out


@dataclass
class Calibration:
    spec: ClusterSpec
    predictions: list[Prediction]
    fitted: dict[str, float]

    def errors(self, held_out: bool, kinds: tuple[str, ...] | None = None) -> np.ndarray:
        return np.array([abs(p.error) for p in self.predictions
                         if p.held_out == held_out and (kinds is None or p.kind in kinds)])


def _network_predictions(spec: ClusterSpec, data: BenchData, held: list[bool]) -> list[Prediction]:
    out = []
    points: list[Any] = [*data.a2a, *data.p2p]
    for p, h in zip(points, held):
        if isinstance(p, A2APoint):
            pred = predict_transfer(spec, p.matrix)
            for r in range(p.ms.size):
                if p.kind == "uniform" and r:
                    break  # one number per uniform call: the slowest rank
                meas = float(p.ms[r]) if p.kind == "skew" else float(p.ms.max())
                value = float(pred[r]) if p.kind == "skew" else float(pred.max())
                out.append(Prediction(f"a2a-{p.kind}", f"{p.kind} {p.matrix.astype(int).tolist()} rank {r}",
                                      meas, value, h))
        else:
            m = np.zeros((max(data.world, 2),) * 2)
            m[0, 1] = p.nbytes
            out.append(Prediction("p2p", f"p2p {int(p.nbytes)} B", p.ms, float(predict_transfer(spec, m)[1]), h))
    return out


def _attention_predictions(spec: ClusterSpec, points: list[AttentionPoint], held: list[bool]) -> list[Prediction]:
    return [Prediction("attention", p.label, p.measured_s * 1e3, float(s) * 1e3, h)
            for p, s, h in zip(points, predict_all(points, spec.gpu), held)]


def _projection_predictions(spec: ClusterSpec, points: list[ProjectionPoint], held: list[bool]) -> list[Prediction]:
    return [Prediction("projection", p.label, p.measured_s * 1e3, float(s) * 1e3, h)
            for p, s, h in zip(points, predict_projections(points, spec.gpu), held)]


def predictions(spec: ClusterSpec, data: BenchData) -> list[Prediction]:
    """Every point of ``data`` predicted by ``spec`` as it is (nothing fitted; all points marked held out)."""
    net_points: list[Any] = [*data.a2a, *data.p2p]
    preds = _network_predictions(spec, data, [True] * len(net_points))
    return preds + [Prediction("ffn", f"{p.shape} {list(p.tokens)}", p.ms, predict_ffn(spec, p), True)
                    for p in data.ffn] + _attention_predictions(spec, data.attention, [True] * len(data.attention)) \
        + _projection_predictions(spec, data.projections, [True] * len(data.projections)) \
        + [Prediction(*row) for row in kernel_predictions(data.attention_kernels, [True] * len(data.attention_kernels),
                                                          spec.gpu)]


def calibration_steps(data: BenchData, iters: int = 200) -> int:
    """How many steps :func:`calibrate` tells its ``progress`` of: the iterations of its network and
    expert-FFN fits (the other fits are closed forms or quick)."""
    return iters * (bool(data.a2a or data.p2p) + bool(data.ffn))


def _fit_kernels(data: BenchData, base: dict[str, Any],
                 fitted: dict[str, float]) -> tuple[dict[str, Any], list[bool], list[bool], list[bool]]:
    """The MoE kernel pipelines (eager, then under CUDA graphs) and the plain GEMMs, on the GPU fitted so far;
    the new cluster dict and each point set's held-out marks. Adds the headline values to ``fitted``."""
    moe_held = held_out(data.moe)
    if data.moe:  # the MoE kernel pipelines, on this GPU's HBM and peak; NCCL's all-to-all with one rank
        gpu = ClusterSpec(**base).gpu
        base["a2a_self_launch_us"] = fit_self_a2a([p for p, h in zip(data.moe, moe_held) if not h], gpu)
        fitted["a2a_self_launch_us"] = base["a2a_self_launch_us"]
        pipes = fit_pipelines(data.moe, moe_held, gpu, base["a2a_self_launch_us"])
        base = deep_merge(base, {"gpu": {"moe_pipelines": {k: v.model_dump() for k, v in pipes.items()}}})
        fitted.update({f"gpu.moe_pipelines.{k}.{f}": getattr(v, f) for k, v in pipes.items()
                       for f in ("tile_m", "tile_n", "gemm_efficiency", "fp8_gemm_efficiency") if k in
                       {p.pipeline for p in data.moe}})
    graph_held = held_out(data.moe_graphs)
    if data.moe_graphs:  # the same pipelines replayed from CUDA graphs, on top of the eager fit
        pipes = fit_graph_pipelines(data.moe_graphs, graph_held, ClusterSpec(**base).gpu)
        base = deep_merge(base, {"gpu": {"moe_pipelines": {k: v.model_dump() for k, v in pipes.items()}}})
        fitted.update({f"gpu.moe_pipelines.{k}.graph_gemm_fixed_us": v.graph_gemm_fixed_us for k, v in pipes.items()
                       if k in {p.pipeline for p in data.moe_graphs} and v.graph_gemm_fixed_us is not None})
    if data.moe_table:  # kernel-timing tables of whole fused layers: those pipelines' GEMMs refitted
        pipes, floors = fit_table_pipeline(data.moe_table, held_out(data.moe_table), ClusterSpec(**base).gpu)
        refit = sorted({p.pipeline for p in data.moe_table})
        base = deep_merge(base, {"gpu": {"moe_pipelines": {k: pipes[k].model_dump() for k in refit}}})
        fitted.update({f"gpu.moe_pipelines.{k}.{f}": getattr(pipes[k], f) for k in refit for f in (
            "tile_m", "tile_n", "gemm_efficiency", "gemm_hbm_efficiency", "graph_gemm_fixed_us", "fp8_gemm_efficiency",
            "fp8_gemm_hbm_efficiency", "graph_fp8_gemm_fixed_us", "fp8_tile_m", "fp8_tile_n")
            if getattr(pipes[k], f) is not None})
        data.moe_table = with_floors(data.moe_table, floors)  # each eager harness's own cost, to predict its rows
    gemm_held = gemm_held_out(data.gemms)
    if data.gemms:  # plain GEMMs: shared experts, dense layers, projections
        plain = fit_plain_gemm(data.gemms, gemm_held, ClusterSpec(**base).gpu)
        base = deep_merge(base, {"gpu": {"plain_gemm": plain.model_dump()}})
        fitted.update({f"gpu.plain_gemm.{f}": getattr(plain, f) for f in ("gemm_efficiency", "fp8_gemm_efficiency")})
    return base, moe_held, graph_held, gemm_held


def _fit_extras(data: BenchData, base: dict[str, Any],
                fitted: dict[str, float]) -> tuple[dict[str, Any], list[bool], list[bool], float]:
    """The attention kernel families, the expert GEMMs' backward and the sustained clock, on the GPU fitted so far:
    the new cluster dict, the held-out marks of the first two and the training benchmark's harness cost."""
    kernels_held = held_out_kernels(data.attention_kernels)
    if data.attention_kernels:  # prefill attention kernel families and backward ratios, on the attention fit above
        kernels = fit_kernels(data.attention_kernels, kernels_held, ClusterSpec(**base).gpu)
        base = deep_merge(base, {"gpu": kernels})
        for k, v in kernels.get("attention_kernels", {}).items():
            fitted[f"gpu.attention_kernels.{k}.efficiency"] = v["efficiency"]
            fitted[f"gpu.attention_kernels.{k}.backward.efficiency"] = v["backward"]["efficiency"]
        if "attention_backward" in kernels:
            fitted["gpu.attention_backward.efficiency"] = kernels["attention_backward"]["efficiency"]
    train_held, harness_ms = held_out_train(data.train_gemms), 0.0
    if data.train_gemms:  # the experts' GEMMs' backward / forward (training), beside its benchmark's harness
        ratio, harness_ms = fit_backward(data.train_gemms, train_held)
        base = deep_merge(base, {"gpu": {"gemm_backward": ratio}})
        fitted["gpu.gemm_backward"] = ratio
    if data.sustained:  # the tensor-core clock at the power cap, against the isolated launches fitted above
        base = deep_merge(base, {"gpu": {"sustained_clock": fit_sustained(data.sustained)}})
        fitted["gpu.sustained_clock"] = base["gpu"]["sustained_clock"]
    return base, kernels_held, train_held, harness_ms


def calibrate(data: BenchData, base_preset: str = "hgx-h200", name: str | None = None,
              iters: int = 200, progress: Callable[[int], object] | None = None) -> Calibration:
    """Fit ``base_preset``'s parameters to ``data``; report every point's error, held-out ones marked.
    ``progress(n)`` is told of the fits' iterations (:func:`calibration_steps` in all)."""
    base = preset(base_preset)
    base["gpu"].setdefault("local_copy_GBps", 500.0)
    if name:
        base["name"] = name
    fitted: dict[str, float] = {}
    net_points: list[Any] = [*data.a2a, *data.p2p]
    net_held = split(net_points, key=lambda p: p.kind if isinstance(p, A2APoint) else "p2p")
    ffn_held = split(data.ffn, key=lambda p: (p.shape, len(p.tokens)))
    att_held = split(data.attention, key=lambda p: (p.shape, p.phase))
    proj_held = split(data.projections, key=lambda p: (p.shape, p.phase, p.part))

    def log_err(preds: list[Prediction]) -> float:
        train = [p for p in preds if not p.held_out]
        return float(np.mean([abs(np.log(p.predicted_ms / p.measured_ms)) for p in train])) if train else 0.0

    if net_points:
        x0 = np.log([v for _, v, _ in NETWORK_PARAMS])
        x = nelder_mead(lambda x: log_err(_network_predictions(ClusterSpec(**_apply(base, NETWORK_PARAMS, x)),
                                                               data, net_held)), x0, iters=iters,
                        progress=progress)
        base = _apply(base, NETWORK_PARAMS, x)
    if data.ffn:
        def ffn_preds(spec: ClusterSpec) -> list[Prediction]:
            return [Prediction("ffn", f"{p.shape} {list(p.tokens)}", p.ms, predict_ffn(spec, p), h)
                    for p, h in zip(data.ffn, ffn_held)]

        x0 = np.log([v for _, v, _ in FFN_PARAMS])
        x = nelder_mead(lambda x: log_err(ffn_preds(ClusterSpec(**_apply(base, FFN_PARAMS, x)))), x0, iters=iters,
                        progress=progress)
        base = _apply(base, FFN_PARAMS, x)
    attention: dict[str, float] = {}
    if data.attention:  # on the GPU the FFN fit gave: decode attention reads the KV cache at its HBM rate
        train = [p for p, h in zip(data.attention, att_held) if not h]
        attention = asdict(fit_attention(train, ClusterSpec(**base).gpu))
        base = deep_merge(base, {"gpu": attention})
    if data.projections:  # plain GEMMs, after the FFN fit: their bytes go at its HBM rate
        train_proj = [p for p, h in zip(data.projections, proj_held) if not h]
        attention["dense_efficiency"] = fit_dense_efficiency(train_proj, ClusterSpec(**base).gpu)
        base = deep_merge(base, {"gpu": {"dense_efficiency": attention["dense_efficiency"]}})
    base, moe_held, graph_held, gemm_held = _fit_kernels(data, base, fitted)
    base, kernels_held, train_held, harness_ms = _fit_extras(data, base, fitted)
    spec = ClusterSpec(**base)
    preds = _network_predictions(spec, data, net_held) if net_points else []
    preds += [Prediction(*row) for row in sustained_predictions(data.sustained, spec.gpu.sustained_clock)]
    preds += [Prediction(*row) for row in gemm_predictions(data.gemms, gemm_held, spec)]
    preds += [Prediction(*row) for row in moe_predictions(data.moe, moe_held, spec)]
    preds += [Prediction(*row) for row in moe_predictions(data.moe_graphs, graph_held, spec)]
    preds += [Prediction(*row) for row in moe_predictions(data.moe_table, held_out(data.moe_table), spec)]
    preds += [Prediction(*row) for row in kernel_predictions(data.attention_kernels, kernels_held, spec.gpu)]
    preds += [Prediction(*row) for row in train_predictions(data.train_gemms, train_held, data.collectives, spec,
                                                            harness_ms)]
    if data.ffn:
        preds += [Prediction("ffn", f"{p.shape} {list(p.tokens)}", p.ms, predict_ffn(spec, p), h)
                  for p, h in zip(data.ffn, ffn_held)]
    preds += _attention_predictions(spec, data.attention, att_held)
    preds += _projection_predictions(spec, data.projections, proj_held)
    for params in (NETWORK_PARAMS if net_points else ()) + (FFN_PARAMS if data.ffn else ()):
        (*path, leaf), _, _ = params
        node = base
        for p in path:
            node = node[p]
        fitted[".".join((*path, leaf))] = node[leaf]
    fitted.update({f"gpu.{k}": v for k, v in attention.items()})
    return Calibration(spec=spec, predictions=preds, fitted=fitted)
