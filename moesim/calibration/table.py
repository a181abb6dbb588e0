"""Whole MoE layers timed by someone else's harness (``moesim.bench.moe_table/1``): a table of kernel timings
with the work of each row, such as NVIDIA AIConfigurator's vLLM fused-MoE table
(benchmarks/validation/aiconfigurator/), and the fit of a pipeline's grouped GEMMs to them.

A table row is one layer's kernels replayed from a CUDA graph with no router and no all-to-all (what
AIConfigurator times), so the model's prediction for it is the sum of the pipeline's steps but the router under
``launch: cuda_graph`` (:func:`moesim.calibration.moe.predict_point`). Only totals are timed, so only what totals
identify is fitted: the grouped GEMMs' tile, compute efficiency, weight-read bandwidth share and CUDA-graph fixed
cost (bf16, then FP8 at the bf16 tile), and the alignment step's fixed cost (vLLM sorts the ids with one CUDA
kernel where the pipeline moesim measures sorts in PyTorch). The activation and top-k reduction keep the costs
fitted on moesim's own step-by-step measurements. Every third point of a (pipeline, dtype) group is held out,
as for moesim's own files.

Deliberately ignored: the row-to-row noise of a table timed once per point, and the harness's warm L2 cache
(AIConfigurator does not flush it; moesim's own harness does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.calibration.moe import GEMMS, TILES, MoEPoint
from moesim.calibration.schema import _get, _moe_work, items, number
from moesim.errors import InputError
from moesim.hardware.spec import GPUSpec, PipelineSpec, StepCost
from moesim.sim.kernels import LayerWork, gemm_work, step_times
from moesim.traces.model import ModelSpec

FORMAT = "moesim.bench.moe_table/1"


def check_moe_table(raw: dict[str, Any], src: str) -> None:
    """A ``moesim.bench.moe_table/1`` file: every record's shape, work and positive layer time."""
    for i, r in enumerate(items(raw, "records", src, required=True)):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise InputError("must be a JSON object", source=src, field=where)
        _moe_work(r, src, where)
        number(r, "layer_graph_us", src, where)
        if _get(r, "pipeline", src, where) != "fused" or r["dtype"] not in ("bf16", "fp8"):
            raise InputError(f"a table row must be of the fused pipeline in bf16 or fp8, got {r['pipeline']!r} "
                             f"{r['dtype']!r}", source=src, field=where)


def table_points(raw: dict[str, Any], src: str) -> list[MoEPoint]:
    """The records of a checked ``moesim.bench.moe_table/1`` file, as whole-layer CUDA-graph points."""
    points = []
    for r in raw["records"]:
        E = int(r["num_experts"])
        rows = np.asarray(r["rows_per_expert"], dtype=float)
        rows = np.concatenate([rows, np.zeros(max(E - rows.size, 0))])
        model = ModelSpec(name=r["shape"], num_layers=1, num_experts=E, top_k=int(r["top_k"]),
                          d_model=int(r["d_model"]), d_ff=int(r["d_ff"]))
        points.append(MoEPoint(r["shape"], r["pipeline"], r["dtype"], r["routing"], int(r["ep"]), model,
                               LayerWork(np.array(float(r["tokens"])), np.array(float(r["send_rows"])), rows),
                               {}, float(r["layer_graph_us"]) * 1e-3, launch="cuda_graph", table=True))
    return points


def _parts(points: list[MoEPoint], gpu: GPUSpec, spec: PipelineSpec,
           fp8: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per point: the two GEMMs' seconds of wave-quantised passes at full peak [P, 2] and of their bytes at full
    HBM bandwidth [P, 2], the other steps' seconds but the alignment's fixed cost, and the measured seconds."""
    peak = ((gpu.fp8_tflops or 2 * gpu.bf16_tflops) if fp8 else gpu.bf16_tflops) * 1e12
    wb = 1.0 if fp8 else 2.0
    waves, mem, rest, meas = [], [], [], []
    no_align = gpu.model_copy(update={"moe_pipelines": {**gpu.moe_pipelines, "fused": spec.model_copy(update={
        "graph_steps": {**spec.graph_steps, "align": StepCost(fixed_us=0.0, hbm_efficiency=1.0)}})}})
    for p in points:
        d, f = p.model.d_model, p.model.d_ff
        w, m = [], []
        for n, k in ((2 * f, d), (d, f)):
            tiles, nbytes = gemm_work(p.work.rows, n, k, spec, weight_bytes=wb, act_bytes=wb, out_bytes=2.0, fp8=fp8)
            w.append(float(np.ceil(tiles / gpu.sms) * 2.0 * np.prod(spec.tile(fp8)) * k / (peak / gpu.sms)))
            m.append(float(nbytes / (gpu.hbm_GBps * 1e9)))
        steps = step_times(p.work, p.model, no_align, pipeline="fused", dtype=p.dtype, launch="cuda_graph")
        waves.append(w)
        mem.append(m)
        rest.append(sum(float(v) for k, v in steps.items() if k not in (*GEMMS, "router")))
        meas.append(p.total_ms * 1e-3)
    return np.array(waves), np.array(mem), np.array(rest), np.array(meas)


def _grid(parts: tuple[np.ndarray, ...], effs: np.ndarray, meffs: np.ndarray, fixeds: np.ndarray,
          aligns: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mean |log error|, eff, mem eff, GEMM fixed s, align fixed s) of the best grid point."""
    w, m, rest, t = parts
    best = (np.inf, 0.0, 0.0, 0.0, 0.0)
    for i, eff in enumerate(effs):
        gemm = np.maximum(w[None, :, :] / eff, m[None, :, :] / meffs[:, None, None]).sum(-1)  # [meff, P]
        for fx in fixeds:
            pred = gemm[:, None, :] + 2 * fx + rest[None, None, :] + aligns[None, :, None]  # [meff, align, P]
            err = np.abs(np.log(pred / t)).mean(-1)
            j, a = np.unravel_index(int(np.argmin(err)), err.shape)
            if err[j, a] < best[0]:
                best = (float(err[j, a]), float(eff), float(meffs[j]), float(fx), float(aligns[a]))
    return best


def fit_table_pipeline(points: list[MoEPoint], held: list[bool], gpu: GPUSpec) -> dict[str, PipelineSpec]:
    """The fused pipeline refitted to the table's points not held out (see the module docstring)."""
    train = [p for p, h in zip(points, held) if not h]
    bf16 = [p for p in train if p.dtype == "bf16"]
    if not bf16:
        raise InputError("no bf16 rows to fit the fused pipeline's grouped GEMMs on", field="records")
    base = gpu.moe_pipelines["fused"]
    effs, meffs = np.linspace(0.3, 1.0, 36), np.linspace(0.3, 1.0, 36)
    fixeds, aligns = np.linspace(0.0, 1e-5, 11), np.linspace(0.0, 2e-5, 21)
    best: tuple[float, PipelineSpec] = (np.inf, base)
    for tm, tn in TILES["fused"]:
        spec = base.model_copy(update={"tile_m": tm, "tile_n": tn})
        err, eff, meff, fx, align = _grid(_parts(bf16, gpu, spec, False), effs, meffs, fixeds, aligns)
        if err < best[0]:
            steps = {**spec.graph_steps, "align": StepCost(fixed_us=round(align * 1e6, 2), hbm_efficiency=1.0)}
            best = (err, spec.model_copy(update={
                "gemm_efficiency": round(eff, 4), "gemm_hbm_efficiency": round(meff, 4),
                "graph_gemm_fixed_us": round(fx * 1e6, 2), "graph_steps": steps}))
    fp8 = [p for p in train if p.dtype == "fp8"]
    return {**gpu.moe_pipelines, "fused": _fit_fp8(fp8, gpu, best[1]) if fp8 else best[1]}


def _fit_fp8(points: list[MoEPoint], gpu: GPUSpec, spec: PipelineSpec) -> PipelineSpec:
    """The FP8 GEMMs at the alignment cost the bf16 fit gave: their own tile (block-scaled kernels tile N and K
    by the 128-wide scale blocks, so their tile need not be bf16's), efficiency, bandwidth share and fixed cost."""
    align = np.array([spec.graph_steps["align"].fixed_us * 1e-6])
    effs, meffs, fixeds = np.linspace(0.2, 1.0, 41), np.linspace(0.3, 1.0, 36), np.linspace(0.0, 1e-5, 11)
    best: tuple[float, PipelineSpec] = (np.inf, spec)
    for tm, tn in TILES["fused"]:
        trial = spec.model_copy(update={"fp8_tile_m": tm, "fp8_tile_n": tn})
        err, eff, meff, fx, _ = _grid(_parts(points, gpu, trial, True), effs, meffs, fixeds, align)
        if err < best[0]:
            best = (err, trial.model_copy(update={
                "fp8_gemm_efficiency": round(eff, 4), "fp8_gemm_hbm_efficiency": round(meff, 4),
                "graph_fp8_gemm_fixed_us": round(fx * 1e6, 2)}))
    return best[1]
