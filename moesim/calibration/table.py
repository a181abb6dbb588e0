"""MoE layers timed by someone else's harness (``moesim.bench.moe_table/1``): a table of kernel timings with the
work of each row, such as NVIDIA AIConfigurator's (benchmarks/validation/aiconfigurator/), and the fit of a
fused pipeline's grouped GEMMs to them.

A row times some steps of one layer (``covers``; default every step but the router) launched eagerly or replayed
from a CUDA graph, its rows delivered token by token (aligned per expert) or expert by expert (``expert_major``,
DeepEP's low-latency layout). Rows that share a ``harness`` were timed by one eager harness whose own fixed cost
(host launches, synchronisations, a profiler) is the same for each row and is no kernel's: one such floor per
harness is fitted alongside and never enters the simulator.

Only totals are timed, so only what totals identify is fitted, per pipeline, on every third row held out:

- ``fused`` (vLLM's fused_moe: bf16 and block-FP8 Triton kernels): the grouped GEMMs' tile, compute efficiency,
  weight-read bandwidth share and CUDA-graph fixed cost, bf16 then FP8 (its own tile: block-scaled kernels tile by
  the 128-wide scale blocks), and the alignment step's fixed cost (vLLM sorts the ids with one CUDA kernel);
- ``deepgemm`` (DeepEP with DeepGEMM's FP8 grouped GEMMs, as SGLang's wide-EP and DeepSeek's stacks run them): the
  same FP8 terms, on top of the fused pipeline's other steps.

The activation and the top-k reduction keep the costs fitted on moesim's own step-by-step measurements.
Deliberately ignored: row-to-row noise of tables timed once per point, and warm L2 caches (AIConfigurator does not
flush L2; moesim's own harness does).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from moesim.calibration.moe import GEMMS, TILES, MoEPoint
from moesim.calibration.schema import _get, _moe_work, items, number
from moesim.errors import InputError
from moesim.hardware.spec import GPUSpec, PipelineSpec, StepCost
from moesim.sim.kernels import LayerWork, gemm_work, step_times
from moesim.traces.model import ModelSpec

FORMAT = "moesim.bench.moe_table/1"
STEPS = ("router", "align", "gemm_gate_up", "activation", "gemm_down", "reduce")  # a fused pipeline's steps
PIPELINES = ("fused", "deepgemm")  # the pipelines a table can refit
_EFFS, _MEFFS = np.linspace(0.2, 1.0, 41), np.linspace(0.3, 1.0, 36)
_FIXEDS = np.linspace(0.0, 4e-5, 41)  # a grouped GEMM's fixed cost under CUDA graphs, seconds


def check_moe_table(raw: dict[str, Any], src: str) -> None:
    """A ``moesim.bench.moe_table/1`` file: every record's shape, work, pipeline, steps and positive layer time."""
    for i, r in enumerate(items(raw, "records", src, required=True)):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise InputError("must be a JSON object", source=src, field=where)
        _moe_work(r, src, where)
        number(r, "layer_us", src, where)
        if _get(r, "pipeline", src, where) not in PIPELINES or r["dtype"] not in ("bf16", "fp8"):
            raise InputError(f"a table row must be of pipeline {' or '.join(PIPELINES)} in bf16 or fp8, got "
                             f"{r['pipeline']!r} {r['dtype']!r}", source=src, field=where)
        if r.get("launch", "cuda_graph") not in ("eager", "cuda_graph"):
            raise InputError(f"must be eager or cuda_graph, got {r['launch']!r}", source=src, field=f"{where}.launch")
        covers = r.get("covers", [])
        if not isinstance(covers, list) or any(c not in STEPS for c in covers):
            raise InputError(f"must list steps among {', '.join(STEPS)}", source=src, field=f"{where}.covers")


def table_points(raw: dict[str, Any], src: str) -> list[MoEPoint]:
    """The records of a checked ``moesim.bench.moe_table/1`` file, as whole-layer points."""
    points = []
    for r in raw["records"]:
        E = int(r["num_experts"])
        rows = np.asarray(r["rows_per_expert"], dtype=float)
        rows = np.concatenate([rows, np.zeros(max(E - rows.size, 0))])
        model = ModelSpec(name=r["shape"], num_layers=1, num_experts=E, top_k=int(r["top_k"]),
                          d_model=int(r["d_model"]), d_ff=int(r["d_ff"]))
        points.append(MoEPoint(r["shape"], r["pipeline"], r["dtype"], r["routing"], int(r["ep"]), model,
                               LayerWork(np.array(float(r["tokens"])), np.array(float(r["send_rows"])), rows),
                               {}, float(r["layer_us"]) * 1e-3, launch=r.get("launch", "cuda_graph"), table=True,
                               covers=tuple(r.get("covers", ())), expert_major=bool(r.get("expert_major", False)),
                               harness=str(r.get("harness", ""))))
    return points


def _parts(points: list[MoEPoint], gpu: GPUSpec, spec: PipelineSpec,
           fp8: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per point: the two GEMMs' seconds of wave-quantised passes at full peak [P, 2] and of their bytes at full
    HBM bandwidth [P, 2], the other covered steps' seconds but the alignment's fixed cost, the measured seconds."""
    peak = ((gpu.fp8_tflops or 2 * gpu.bf16_tflops) if fp8 else gpu.bf16_tflops) * 1e12
    wb = 1.0 if fp8 else 2.0
    waves, mem, rest, meas = [], [], [], []
    # the alignment's launch-free fixed cost is what the graph rows fit (as ``extras``); eager rows keep theirs
    no_align = spec.model_copy(update={"graph_steps": {**spec.graph_steps, "align": StepCost(
        fixed_us=0.0, hbm_efficiency=spec.graph_steps["align"].hbm_efficiency)}})
    for p in points:
        g = gpu.model_copy(update={"moe_pipelines": {**gpu.moe_pipelines, p.pipeline: no_align}})
        d, f = p.model.d_model, p.model.d_ff
        w, m = [], []
        for n, k in ((2 * f, d), (d, f)):
            tiles, nbytes = gemm_work(p.work.rows, n, k, spec, weight_bytes=wb, act_bytes=wb, out_bytes=2.0, fp8=fp8)
            w.append(float(np.ceil(tiles / gpu.sms) * 2.0 * np.prod(spec.tile(fp8)) * k / (peak / gpu.sms)))
            m.append(float(nbytes / (gpu.hbm_GBps * 1e9)))
        steps = step_times(p.work, p.model, g, pipeline=p.pipeline, dtype=p.dtype, launch=p.launch,
                           expert_major=p.expert_major)
        keep = p.covers or tuple(k for k in steps if k != "router")
        waves.append(w)
        mem.append(m)
        fixed = (spec.fp8_gemm_fixed_us if fp8 else spec.gemm_fixed_us) * 1e-6 if p.launch == "eager" else 0.0
        rest.append(sum(float(steps[k]) for k in keep if k in steps and k not in GEMMS) + 2 * fixed)
        meas.append(p.total_ms * 1e-3)
    return np.array(waves), np.array(mem), np.array(rest), np.array(meas)


def _grid(parts: tuple[np.ndarray, ...], effs: np.ndarray, meffs: np.ndarray, fixeds: np.ndarray,
          extras: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mean |log error|, eff, mem eff, GEMM fixed s, extra fixed s) of the best grid point; ``extras`` is an
    additive fixed cost per row (the alignment's, or a harness's floor)."""
    w, m, rest, t = parts
    best = (np.inf, 0.0, 0.0, 0.0, 0.0)
    for eff in effs:
        gemm = np.maximum(w[None, :, :] / eff, m[None, :, :] / meffs[:, None, None]).sum(-1)  # [meff, P]
        for fx in fixeds:
            pred = gemm[:, None, :] + 2 * fx + rest[None, None, :] + extras[None, :, None]  # [meff, extra, P]
            err = np.abs(np.log(pred / t)).mean(-1)
            j, a = np.unravel_index(int(np.argmin(err)), err.shape)
            if err[j, a] < best[0]:
                best = (float(err[j, a]), float(eff), float(meffs[j]), float(fx), float(extras[a]))
    return best


def _fit_bf16(points: list[MoEPoint], gpu: GPUSpec, base: PipelineSpec) -> PipelineSpec:
    """Tile, efficiency, bandwidth share and CUDA-graph fixed cost of the bf16 GEMMs, and the alignment's fixed cost
    (rows replayed from CUDA graphs)."""
    best: tuple[float, PipelineSpec] = (np.inf, base)
    for tm, tn in TILES[base_tiles(points)]:
        spec = base.model_copy(update={"tile_m": tm, "tile_n": tn})
        err, eff, meff, fx, align = _grid(_parts(points, gpu, spec, False), _EFFS, _MEFFS, _FIXEDS,
                                          np.linspace(0.0, 2e-5, 21))
        if err < best[0]:
            steps = {**spec.graph_steps, "align": StepCost(fixed_us=round(align * 1e6, 2), hbm_efficiency=1.0)}
            best = (err, spec.model_copy(update={
                "gemm_efficiency": round(eff, 4), "gemm_hbm_efficiency": round(meff, 4),
                "graph_gemm_fixed_us": round(fx * 1e6, 2), "graph_steps": steps}))
    return best[1]


def base_tiles(points: list[MoEPoint]) -> str:
    return points[0].pipeline if points and points[0].pipeline in TILES else "fused"


def _fit_fp8(points: list[MoEPoint], gpu: GPUSpec, spec: PipelineSpec) -> tuple[PipelineSpec, dict[str, float]]:
    """The FP8 GEMMs' own tile, efficiency, bandwidth share and CUDA-graph fixed cost, and each eager harness's
    floor: at each tile and efficiency, the rows replayed from CUDA graphs choose the bandwidth share and fixed cost
    (with the alignment cost the pipeline has), each harness its floor at that share; the best mean error wins."""
    graph = [p for p in points if p.launch == "cuda_graph"]
    eager = {h: [p for p in points if p.launch == "eager" and p.harness == h]
             for h in sorted({p.harness for p in points if p.launch == "eager"})}
    floors = np.linspace(0.0, 1e-3, 101)
    best: tuple[float, PipelineSpec, dict[str, float]] = (np.inf, spec, {})
    for tm, tn in TILES[base_tiles(points)]:
        trial = spec.model_copy(update={"fp8_tile_m": tm, "fp8_tile_n": tn})
        covered = all("align" in (p.covers or ("align",)) and not p.expert_major for p in graph)
        align = np.array([trial.graph_steps["align"].fixed_us * 1e-6 if covered else 0.0])
        gparts = _parts(graph, gpu, trial, True) if graph else None
        hparts = {h: _parts(rows, gpu, trial, True) for h, rows in eager.items()}
        for eff in _EFFS:
            e = np.array([eff])
            err, _, meff, fx, _ = _grid(gparts, e, _MEFFS, _FIXEDS, align) if gparts else \
                (0.0, eff, trial.fp8_gemm_hbm_efficiency, 0.0, 0.0)
            total, fitted = err * len(graph), dict[str, float]()
            for h, parts in hparts.items():
                eh, _, _, _, floor = _grid(parts, e, np.array([meff]), np.zeros(1), floors)
                total, fitted = total + eh * len(eager[h]), {**fitted, h: round(floor * 1e3, 4)}
            if total / len(points) < best[0]:
                best = (total / len(points), trial.model_copy(update={
                    "fp8_gemm_efficiency": round(float(eff), 4), "fp8_gemm_hbm_efficiency": round(meff, 4),
                    "graph_fp8_gemm_fixed_us": round(fx * 1e6, 2)}), fitted)
    return best[1], best[2]


def fit_table_pipeline(points: list[MoEPoint], held: list[bool],
                       gpu: GPUSpec) -> tuple[dict[str, PipelineSpec], dict[str, float]]:
    """Every pipeline the table has, refitted to its points not held out (see the module docstring); and each eager
    harness's fitted floor in milliseconds."""
    out, floors = dict(gpu.moe_pipelines), {}
    for pipeline in PIPELINES:
        train = [p for p, h in zip(points, held) if not h and p.pipeline == pipeline]
        if not train:
            continue
        base = out.get(pipeline) or _new_pipeline(pipeline, out)
        if pipeline == "fused":  # vLLM aligns with one CUDA kernel on S ids: its bytes are negligible
            align = StepCost(fixed_us=base.graph_steps["align"].fixed_us, hbm_efficiency=1.0)
            base = base.model_copy(update={"graph_steps": {**base.graph_steps, "align": align}})
        bf16 = [p for p in train if p.dtype == "bf16"]
        spec = _fit_bf16(bf16, gpu, base) if bf16 else base
        fp8 = [p for p in train if p.dtype == "fp8"]
        if fp8:
            spec, got = _fit_fp8(fp8, gpu, spec)
            floors.update(got)
        # the alignment is one kernel in vLLM (moe_align_block_size) and in DeepEP's scatter: launched eagerly it
        # costs what it costs replayed (the host's sync in moesim's own PyTorch stand-in is not theirs)
        out[pipeline] = spec.model_copy(update={"steps": {**spec.steps, "align": spec.graph_steps["align"]}})
    return out, floors


def _new_pipeline(name: str, pipelines: dict[str, PipelineSpec]) -> PipelineSpec:
    """A pipeline no measurement has timed step by step, from the ones that were: ``deepgemm`` runs the fused
    pipeline's steps, except that DeepEP's normal dispatch is followed by a copy of the rows into DeepGEMM's
    contiguous layout (``align``), costed as the measured row gather of torch_reference's ``regroup`` with the
    fused alignment's launch-free fixed cost."""
    fused = pipelines["fused"]
    if name != "deepgemm":
        return fused
    gather = pipelines["torch_reference"].steps["regroup"].hbm_efficiency
    align = StepCost(fixed_us=fused.graph_steps["align"].fixed_us, hbm_efficiency=gather)
    return fused.model_copy(update={"steps": {**fused.steps, "align": align},
                                    "graph_steps": {**fused.graph_steps, "align": align}})


def with_floors(points: list[MoEPoint], floors: dict[str, float]) -> list[MoEPoint]:
    """``points`` with their eager harness's fitted floor (milliseconds) attached, for predicting them."""
    return [replace(p, harness_ms=floors.get(p.harness, 0.0)) if p.launch == "eager" else p for p in points]
