"""Fit the MoE kernel pipelines (:mod:`moesim.sim.kernels`) to ``moesim bench moe`` timings, and predict them.

Each record of ``moe.json`` is one MoE layer on one GPU: a model shape, a pipeline and expert dtype, T tokens
at home, T x k copies sent, the exact rows of every local expert, and the median time of every step and of the
whole layer. Per pipeline the fit is, in order:

1. every non-GEMM step: its fixed cost and its share of HBM bandwidth, by grid search over both (mean absolute
   log error over the training points of that step);
2. the bf16 grouped GEMMs (gate-up and down together): the tile shape (from the tiles real kernels use), the
   share of the per-SM peak a full tile reaches, the weight-read bandwidth share and the fixed cost per GEMM;
3. with FP8 records, the FP8 GEMM efficiency at the bf16 fit's tiles and bandwidth share.

Every third point of each (pipeline, dtype, EP slice, routing) group, ordered by shape and token count, is held
out of the fit; :func:`moe_predictions` reports every point's layer and step errors with the held-out ones
marked. The layer time adds the dispatch and combine all-to-alls as the network model predicts them (on one GPU
NCCL's copies to itself: two calls for the dispatch, rows and expert ids, one for the combine).

The same steps replayed from CUDA graphs (``moesim.bench.moe_graphs/1``, benchmarks/validation/moe_h200/graphs.py)
give each pipeline's launch-free costs (``graph_steps``, ``graph_gemm_fixed_us``; :func:`fit_graph_pipelines`):
each step's fixed cost and bandwidth share fitted as above, and the grouped GEMMs' fixed cost at the eager fit's
tiles and rates (the GEMMs' GPU work is the same; only their launch differs). Held out the same way.

Deliberately ignored: run-to-run noise beyond the medians, and clock or power states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.errors import InputError
from moesim.hardware.spec import ClusterSpec, GPUSpec, PipelineSpec, StepCost
from moesim.sim.kernels import LayerWork, gemm_work, step_bytes, step_times
from moesim.traces.model import ModelSpec

GEMMS = ("gemm_gate_up", "gemm_down")
TILES = {"torch_reference": ((64, 128), (128, 128), (128, 256), (256, 128)),
         "fused": ((16, 64), (32, 64), (64, 64), (64, 128), (128, 128)),
         "deepgemm": ((64, 64), (64, 128), (128, 128), (128, 256))}  # DeepGEMM: BLOCK_M 64/128, BLOCK_N up to 256


@dataclass(frozen=True)
class MoEPoint:
    """One measured MoE layer on one GPU (a ``moesim bench moe`` record)."""

    shape: str
    pipeline: str
    dtype: str
    routing: str
    ep: int
    model: ModelSpec
    work: LayerWork
    steps_ms: dict[str, float] = field(hash=False)
    total_ms: float = 0.0
    launch: str = "eager"  # eager PyTorch, or replayed from CUDA graphs (engine.launch)
    whole_measured: bool = True  # total_ms timed as one run (not summed from its steps)
    table: bool = False  # a row of a kernel-timing table (moesim.calibration.table): no step timed alone
    covers: tuple[str, ...] = ()  # the steps a table row timed (empty: every step but the router)
    expert_major: bool = False  # rows delivered expert by expert (DeepEP low-latency layout): no alignment
    harness: str = ""  # the eager harness that timed a table row
    harness_ms: float = 0.0  # that harness's own fixed cost, as fitted (no kernel's; never simulated)

    @property
    def tokens(self) -> int:
        return int(self.work.home)

    @property
    def phase(self) -> str:
        """``decode`` up to 512 tokens per GPU, else ``prefill``."""
        return "decode" if self.tokens <= 512 else "prefill"

    @property
    def kernels_ms(self) -> float:
        """The layer without its all-to-alls (which the network model times): the whole-layer median less the
        all-to-alls' step medians."""
        return self.total_ms - self.steps_ms.get("dispatch", 0.0) - self.steps_ms.get("combine", 0.0)

    @property
    def label(self) -> str:
        graph = " graph" if self.launch == "cuda_graph" else ""
        return f"{self.shape} ep{self.ep} {self.pipeline}{graph} {self.dtype} {self.routing} T={self.tokens}"


def event_overhead_ms(records: list[dict]) -> float:
    """What timing each step with its own CUDA events adds per step (the events' host calls slow a host-bound
    pipeline): the median over the records of (sum of the step medians - whole-layer median) / steps."""
    per = [(float(r["steps_sum_ms"]) - float(r["total_ms"])) / len(r["steps_ms"]) for r in records
           if "skipped" not in r and r.get("steps_ms")]
    return max(float(np.median(per)), 0.0) if per else 0.0


def moe_points(raw: dict, src: str) -> list[MoEPoint]:
    """The measured records of a ``moesim.bench.moe/1`` file (skipped points left out), each step's median less
    the per-step cost of timing it with events (:func:`event_overhead_ms`, measured on the same file)."""
    points = []
    overhead = event_overhead_ms(raw["records"])
    for i, r in enumerate(raw["records"]):
        if "skipped" in r:
            continue
        rows = np.asarray(r["rows_per_expert"], dtype=float)
        if rows.ndim != 1 or rows.size != int(r["local_experts"]) or (rows < 0).any():
            raise InputError("must list each local expert's rows", source=src, field=f"records[{i}].rows_per_expert")
        E = int(r["num_experts"])
        model = ModelSpec(name=r["shape"], num_layers=1, num_experts=E, top_k=int(r["top_k"]),
                          d_model=int(r["d_model"]), d_ff=int(r["d_ff"]))
        rows = np.concatenate([rows, np.zeros(max(E - rows.size, 0))])  # the other ranks' experts: no rows here
        steps = {k: float(v) for k, v in r["steps_ms"].items()}
        if any(not (v > 0 and np.isfinite(v)) for v in [*steps.values(), float(r["total_ms"])]):
            raise InputError("timings must be positive", source=src, field=f"records[{i}]")
        steps = {k: max(v - overhead, 0.5 * v) for k, v in steps.items()}
        points.append(MoEPoint(r["shape"], r["pipeline"], r["dtype"], r["routing"], int(r["ep"]), model,
                               LayerWork(np.array(float(r["tokens"])), np.array(float(r["send_rows"])), rows),
                               steps, float(r["total_ms"])))
    return points


def graph_points(raw: dict, src: str) -> list[MoEPoint]:
    """The records of a ``moesim.bench.moe_graphs/1`` file: each captured step's median replay, and the whole
    layer's where it was captured whole (else the sum of its steps), less one graph replay's own cost
    (``graph_floor_us``, measured the same way)."""
    floor = float(raw.get("graph_floor_us", 0.0)) * 1e-3
    points = []
    for i, r in enumerate(raw["records"]):
        if "error" in r:
            continue
        E = int(r["num_experts"])
        rows = np.asarray(r["rows_per_expert"], dtype=float)
        if rows.ndim != 1 or rows.size != int(r["local_experts"]) or (rows < 0).any():
            raise InputError("must list each local expert's rows", source=src, field=f"records[{i}].rows_per_expert")
        steps = {k: float(v) * 1e-3 for k, v in r["steps_graph_us"].items()}
        if not steps or any(not (v > 0 and np.isfinite(v)) for v in steps.values()):
            raise InputError("timings must be positive", source=src, field=f"records[{i}].steps_graph_us")
        whole = float(r["layer_graph_us"]) * 1e-3 - floor if "layer_graph_us" in r else \
            sum(steps.values()) - floor * len(steps)
        model = ModelSpec(name=r["shape"], num_layers=1, num_experts=E, top_k=int(r["top_k"]),
                          d_model=int(r["d_model"]), d_ff=int(r["d_ff"]))
        rows = np.concatenate([rows, np.zeros(max(E - rows.size, 0))])
        points.append(MoEPoint(r["shape"], r["pipeline"], r["dtype"], r["routing"], int(r["ep"]), model,
                               LayerWork(np.array(float(r["tokens"])), np.array(float(r["send_rows"])), rows),
                               {k: max(v - floor, 0.5 * v) for k, v in steps.items()}, whole,
                               launch="cuda_graph", whole_measured="layer_graph_us" in r))
    return points


MEDIAN_RUNS = 3  # a point measured in this many runs or more is also judged against the median of its runs


def held_out(points: list[MoEPoint]) -> list[bool]:
    """Every third point of each (pipeline, dtype, EP slice, routing) group, ordered by shape and tokens; a point
    measured in several runs is held out (or not) in all of them."""
    held = [False] * len(points)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault((p.pipeline, p.dtype, p.ep, p.routing), []).append(i)
    for idx in groups.values():
        order = sorted({(points[i].shape, points[i].tokens) for i in idx})
        out = {key for j, key in enumerate(order) if j % 3 == 1}
        for i in idx:
            held[i] = (points[i].shape, points[i].tokens) in out
    return held


def _grid_step(nbytes: np.ndarray, seconds: np.ndarray, hbm: float) -> StepCost:
    """Fixed cost and bandwidth share minimising the mean |log error| of ``fixed + bytes / (hbm x eff)``."""
    fixed = np.concatenate([[0.0], np.geomspace(1e-6, 3e-3, 160)])
    eff = np.geomspace(0.01, 1.0, 120)
    pred = fixed[:, None, None] + nbytes[None, None, :] / (hbm * eff[None, :, None])
    err = np.abs(np.log(pred / seconds[None, None, :])).mean(-1)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return StepCost(fixed_us=round(float(fixed[i]) * 1e6, 2), hbm_efficiency=round(float(eff[j]), 4))


def fit_steps(points: list[MoEPoint], gpu: GPUSpec) -> dict[str, StepCost]:
    """Each non-GEMM step's cost, from the points that ran it."""
    out: dict[str, StepCost] = {}
    byts: dict[str, list[float]] = {}
    secs: dict[str, list[float]] = {}
    for p in points:
        for name, b in step_bytes(p.work, p.model, pipeline=p.pipeline, dtype=p.dtype).items():
            if name in p.steps_ms:
                byts.setdefault(name, []).append(float(b))
                secs.setdefault(name, []).append(p.steps_ms[name] * 1e-3)
    for name in byts:
        out[name] = _grid_step(np.array(byts[name]), np.array(secs[name]), gpu.hbm_GBps * 1e9)
    return out


def _gemm_obs(points: list[MoEPoint], spec: PipelineSpec, gpu: GPUSpec,
              fp8: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (point, GEMM): seconds of one wave-quantised pass at full peak, seconds of its bytes at full HBM
    bandwidth, and the measured seconds."""
    waves, mem, meas = [], [], []
    peak = ((gpu.fp8_tflops or 2 * gpu.bf16_tflops) if fp8 else gpu.bf16_tflops) * 1e12
    for p in points:
        d, f = p.model.d_model, p.model.d_ff
        wb = 1.0 if fp8 else 2.0
        for name, n, k in (("gemm_gate_up", 2 * f, d), ("gemm_down", d, f)):
            tiles, nbytes = gemm_work(p.work.rows, n, k, spec, weight_bytes=wb, act_bytes=wb, out_bytes=2.0, fp8=fp8)
            waves.append(np.ceil(tiles / gpu.sms) * 2.0 * np.prod(spec.tile(fp8)) * k / (peak / gpu.sms))
            mem.append(nbytes / (gpu.hbm_GBps * 1e9))
            meas.append(p.steps_ms[name] * 1e-3)
    return np.array(waves, dtype=float), np.array(mem, dtype=float), np.array(meas)


def _grid_gemm(w: np.ndarray, m: np.ndarray, t: np.ndarray, effs: np.ndarray, meffs: np.ndarray,
               fixeds: np.ndarray) -> tuple[float, float, float, float]:
    """(error, eff, mem eff, fixed) minimising mean |log error| of ``max(w / eff, m / meff) + fixed``."""
    best = (np.inf, 0.0, 0.0, 0.0)
    for fx in fixeds:
        pred = np.maximum(w[None, None, :] / effs[:, None, None], m[None, None, :] / meffs[None, :, None]) + fx
        err = np.abs(np.log(pred / t[None, None, :])).mean(-1)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        if err[i, j] < best[0]:
            best = (float(err[i, j]), float(effs[i]), float(meffs[j]), float(fx))
    return best


def fit_gemms(points: list[MoEPoint], gpu: GPUSpec, pipeline: str, base: PipelineSpec) -> PipelineSpec:
    """Tiles, efficiency, weight-read bandwidth share and fixed cost of the bf16 grouped GEMMs; then the FP8
    efficiency at those."""
    effs, meffs = np.linspace(0.2, 1.0, 81), np.linspace(0.1, 1.0, 91)
    fixeds = np.concatenate([[0.0], np.geomspace(2e-6, 2e-4, 30)])
    bf16 = [p for p in points if p.dtype == "bf16"]
    best: tuple[float, PipelineSpec] = (np.inf, base)
    for tm, tn in TILES.get(pipeline, ((128, 128),)):
        spec = base.model_copy(update={"tile_m": tm, "tile_n": tn})
        err, eff, meff, fx = _grid_gemm(*_gemm_obs(bf16, spec, gpu, False), effs, meffs, fixeds)
        if err < best[0]:
            best = (err, spec.model_copy(update={"gemm_efficiency": round(eff, 4),
                                                 "gemm_hbm_efficiency": round(meff, 4),
                                                 "gemm_fixed_us": round(fx * 1e6, 2)}))
    spec = best[1]
    fp8 = [p for p in points if p.dtype == "fp8"]
    if fp8:
        _, eff, meff, fx = _grid_gemm(*_gemm_obs(fp8, spec, gpu, True), np.linspace(0.1, 1.0, 91), meffs, fixeds)
        spec = spec.model_copy(update={"fp8_gemm_efficiency": round(eff, 4), "fp8_gemm_hbm_efficiency": round(meff, 4),
                                       "fp8_gemm_fixed_us": round(fx * 1e6, 2)})
    return spec


def _a2a_bytes(p: MoEPoint) -> tuple[float, float]:
    """Bytes of the dispatch (the received rows and their int64 expert ids) and of the combine (the rows)."""
    rows = float(np.asarray(p.work.rows).sum())
    row_bytes = rows * p.model.d_model * p.model.dtype_bytes
    return row_bytes + 8.0 * rows, row_bytes


def fit_self_a2a(points: list[MoEPoint], gpu: GPUSpec) -> float:
    """Microseconds of an all-to-all among one GPU beyond its copy (at half the HBM rate): the median over the
    combine steps (one call each) of measured less copy time."""
    rate = gpu.hbm_GBps * 1e9 * gpu.hbm_efficiency / 2
    res = [p.steps_ms["combine"] * 1e-3 - _a2a_bytes(p)[1] / rate for p in points if "combine" in p.steps_ms]
    return round(max(float(np.median(res)), 0.0) * 1e6, 2) if res else 0.0


def fit_a2a_issue(points: list[MoEPoint], gpu: GPUSpec, self_us: float) -> StepCost:
    """The host's cost of issuing the dispatch's two calls after permute's sync: the median over the dispatch
    steps of measured less the two calls as the network model times them on one GPU."""
    rate = gpu.hbm_GBps * 1e9 * gpu.hbm_efficiency / 2
    res = [p.steps_ms["dispatch"] * 1e-3 - 2 * self_us * 1e-6 - _a2a_bytes(p)[0] / rate
           for p in points if "dispatch" in p.steps_ms]
    return StepCost(fixed_us=round(max(float(np.median(res)), 0.0) * 1e6, 2))


def fit_pipelines(points: list[MoEPoint], held: list[bool], gpu: GPUSpec,
                  self_us: float | None = None) -> dict[str, PipelineSpec]:
    """Every pipeline measured in ``points``, fitted on the points not held out (``self_us``: the one-GPU
    all-to-all's fixed cost, default fitted here)."""
    if self_us is None:
        self_us = fit_self_a2a([p for p, h in zip(points, held) if not h], gpu)
    out = dict(gpu.moe_pipelines)
    for pipeline in sorted({p.pipeline for p in points}):
        train = [p for p, h in zip(points, held) if not h and p.pipeline == pipeline]
        if not any(p.dtype == "bf16" for p in train):
            raise InputError(f"no bf16 points of pipeline {pipeline!r} to fit its GEMMs on", field="records")
        base = out.get(pipeline, PipelineSpec())
        steps = {**base.steps, **fit_steps(train, gpu)}
        if any("dispatch" in p.steps_ms for p in train):
            steps["a2a_issue"] = fit_a2a_issue(train, gpu, self_us)
        base = base.model_copy(update={"steps": steps})
        out[pipeline] = fit_gemms(train, gpu, pipeline, base)
    return out


def fit_graph_pipelines(points: list[MoEPoint], held: list[bool], gpu: GPUSpec) -> dict[str, PipelineSpec]:
    """Every pipeline measured under CUDA graphs in ``points``, its launch-free costs fitted on the points not
    held out, on top of ``gpu``'s (eager) fit: each captured step's fixed cost and bandwidth share, and the
    grouped GEMMs' fixed cost at the eager fit's tiles and rates."""
    out = dict(gpu.moe_pipelines)
    fixeds = np.concatenate([[0.0], np.geomspace(1e-6, 2e-4, 60)])
    for pipeline in sorted({p.pipeline for p in points}):
        base = out.get(pipeline)
        if base is None:
            raise InputError(f"pipeline {pipeline!r} was timed under CUDA graphs but never eagerly: measure it with "
                             "moesim bench moe first", field="records")
        train = [p for p, h in zip(points, held) if not h and p.pipeline == pipeline]
        update: dict = {"graph_steps": {**base.graph_steps, **fit_steps(train, gpu)}}
        for dtype, key in (("bf16", "graph_gemm_fixed_us"), ("fp8", "graph_fp8_gemm_fixed_us")):
            sel = [p for p in train if p.dtype == dtype and all(g in p.steps_ms for g in GEMMS)]
            if sel:
                fp8 = dtype == "fp8"
                eff, meff = ((base.fp8_gemm_efficiency, base.fp8_gemm_hbm_efficiency) if fp8 else
                             (base.gemm_efficiency, base.gemm_hbm_efficiency))
                fx = _grid_gemm(*_gemm_obs(sel, base, gpu, fp8), np.array([eff]), np.array([meff]), fixeds)[3]
                update[key] = round(fx * 1e6, 2)
        out[pipeline] = base.model_copy(update=update)
    return out


def one_gpu_a2a_ms(spec: ClusterSpec, nbytes: float, calls: int) -> float:
    """An all-to-all on one GPU as the network model times it (:class:`moesim.sim.network.Fabric`): ``calls``
    NCCL calls with one rank, each a fixed cost, and a device copy at half the HBM rate."""
    launch = spec.a2a_self_launch_us if spec.a2a_self_launch_us is not None else spec.a2a_launch_us
    return calls * launch * 1e-3 + nbytes / (spec.gpu.hbm_bytes_per_s / 2) * 1e3


def _graph_step_times(p: MoEPoint, gpu: GPUSpec) -> dict[str, np.ndarray]:
    """The steps a CUDA-graph record captured, as the kernel model times them replayed from graphs (a pipeline
    with host-synced steps, measured step by step, has graph costs for the others only)."""
    spec = gpu.moe_pipelines[p.pipeline]
    partial = gpu.model_copy(update={"moe_pipelines": {**gpu.moe_pipelines, p.pipeline: spec.model_copy(
        update={"graph_steps": {**spec.steps, **spec.graph_steps}})}})
    every = step_times(p.work, p.model, partial, pipeline=p.pipeline, dtype=p.dtype, launch="cuda_graph")
    return {k: v for k, v in every.items() if k in p.steps_ms}


def predict_kernels(p: MoEPoint, gpu: GPUSpec) -> tuple[float, dict[str, float]]:
    """The layer's kernel milliseconds (all-to-alls left out) and each step's, as the kernel model predicts them."""
    steps = {k: float(v) * 1e3 for k, v in step_times(p.work, p.model, gpu, pipeline=p.pipeline,
                                                          dtype=p.dtype).items()}
    return sum(steps.values()), steps


def moe_predictions(points: list[MoEPoint], held: list[bool],
                    spec: ClusterSpec) -> list[tuple[str, str, float, float, bool]]:
    """(kind, label, measured ms, predicted ms, held out) for every point's whole layer (kind ``moe-decode`` or
    ``moe-prefill`` for torch_reference, ``moe-eager-PIPELINE-PHASE`` for another pipeline run eagerly, and
    ``moe-median-PHASE`` once more against the median of its runs for a torch_reference point measured in at least
    :data:`MEDIAN_RUNS` runs: the kernels and the all-to-alls among one GPU, :func:`predict_point`) and every step it
    ran (kind ``moe-step:NAME``)."""
    out = []
    runs: dict[tuple, list[float]] = {}
    for p, h in zip(points, held):
        total, steps = predict_point(p, spec)
        graph = (f"table-{p.pipeline}-" if p.table else "graph-" if p.launch == "cuda_graph"
                 else "" if p.pipeline == "torch_reference" else f"eager-{p.pipeline}-")
        if p.whole_measured:
            out.append((f"moe-{graph}{p.phase}", p.label, p.total_ms, total, h))
            if not graph:
                runs.setdefault((p.label, p.phase, total, h), []).append(p.total_ms)
        out += [(f"moe-{graph}step:{k}", p.label, p.steps_ms[k], v, h) for k, v in steps.items() if k in p.steps_ms]
    # a point measured in several runs (eager layers vary from run to run): also against the median of its runs
    out += [(f"moe-median-{phase}", label, float(np.median(ms)), total, h)
            for (label, phase, total, h), ms in runs.items() if len(ms) >= MEDIAN_RUNS]
    return out


def predict_point(p: MoEPoint, spec: ClusterSpec) -> tuple[float, dict[str, float]]:
    """The layer's milliseconds and each step's, as the kernel and network models predict them (under CUDA
    graphs: the captured steps only)."""
    if p.table:  # a table's row: the steps it covers, and its harness's own fixed cost
        every = step_times(p.work, p.model, spec.gpu, pipeline=p.pipeline, dtype=p.dtype, launch=p.launch,
                           expert_major=p.expert_major)
        keep = p.covers or tuple(k for k in every if k != "router")
        return sum(float(every[k]) for k in keep if k in every) * 1e3 + p.harness_ms, {}
    every = step_times(p.work, p.model, spec.gpu, pipeline=p.pipeline, dtype=p.dtype, launch=p.launch) \
        if p.launch == "eager" else _graph_step_times(p, spec.gpu)
    steps = {k: float(v) * 1e3 for k, v in every.items()}
    if "dispatch" in p.steps_ms:  # the measured pipeline ran its all-to-alls (on one GPU: copies to itself)
        disp, comb = _a2a_bytes(p)
        steps["dispatch"] = one_gpu_a2a_ms(spec, disp, 2) + steps.pop("a2a_issue", 0.0)  # measured as one step
        steps["combine"] = one_gpu_a2a_ms(spec, comb, 1)
    return sum(steps.values()), steps
