"""The MoE kernel pipelines (moesim.sim.kernels) against closed forms, in the engine, and fitted to the H200.

Every step's cost is written out by hand from its bytes, FLOPs and the GPU's fitted parameters; the grouped
GEMM's tile padding and waves are counted by hand; the engine's layer is the closed form of its phases; the
shipped fit is re-checked on the measured points it held out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from moesim.hardware import ClusterSpec, build_topology, preset
from moesim.placement.format import Placement
from moesim.sim.engine import EngineOptions, Simulation
from moesim.sim.kernels import LayerWork, grouped_gemm_time, phase_times, plain_gemm_time, step_times
from moesim.traces.format import Trace, TraceMeta
from moesim.traces.model import ModelSpec

GPU = ClusterSpec(**preset("hgx-h200")).gpu
REF = GPU.moe_pipelines["torch_reference"]
REPO = Path(__file__).resolve().parents[1]
MOE_RUNS = [Path(__file__).resolve().parents[1] / "benchmarks/validation/moe_h200" / name
            for name in ("moe_h200.json", "moe_h200_run2.json")]


def dsv3(layers: int = 1) -> ModelSpec:
    return ModelSpec(name="dsv3", num_layers=layers, num_experts=256, top_k=8, d_model=7168, d_ff=2048)


def test_grouped_gemm_counts_tiles_waves_and_touched_weights():
    rows = np.zeros(256)
    rows[:3] = [1, REF.tile_m, REF.tile_m + 1]  # 1 + 1 + 2 M-tiles
    n, k = 4096, 7168
    tiles = 4 * math.ceil(n / REF.tile_n)
    tile_s = 2 * REF.tile_m * REF.tile_n * k / (GPU.bf16_tflops * 1e12 * REF.gemm_efficiency / GPU.sms)
    nbytes = 3 * k * n * 2 + rows.sum() * (k * 2 + n * 2)
    want = max(math.ceil(tiles / GPU.sms) * tile_s, nbytes / (GPU.hbm_GBps * 1e9 * REF.gemm_hbm_efficiency))
    got = grouped_gemm_time(rows, n, k, GPU, REF, weight_bytes=2, act_bytes=2, out_bytes=2)
    assert got == pytest.approx(want + REF.gemm_fixed_us * 1e-6, rel=1e-12)
    assert grouped_gemm_time(np.zeros(256), n, k, GPU, REF, weight_bytes=2, act_bytes=2, out_bytes=2) == 0


def test_many_small_experts_cost_more_than_one_large_one():
    spread, packed = np.ones(256), np.zeros(256)
    packed[0] = 256
    one = grouped_gemm_time(packed, 4096, 7168, GPU, REF, weight_bytes=2, act_bytes=2, out_bytes=2)
    many = grouped_gemm_time(spread, 4096, 7168, GPU, REF, weight_bytes=2, act_bytes=2, out_bytes=2)
    assert many > 30 * one  # 256 experts' weights read, not one


@pytest.mark.parametrize("pipeline", ["torch_reference", "fused"])
def test_memory_steps_are_fixed_cost_plus_bytes(pipeline):
    m = dsv3()
    T, k, d, f, b = 64.0, 8, 7168, 2048, 2
    rows = np.zeros(256)
    rows[:64] = 8
    R, S = rows.sum(), T * k
    spec = GPU.moe_pipelines[pipeline]
    steps = step_times(LayerWork(np.array(T), np.array(S), rows), m, GPU, pipeline=pipeline)
    bytes_of = {"permute": 2 * S * d * b + 16 * S, "regroup": 2 * R * d * b + 16 * R, "activation": 5 * R * f * b,
                "unregroup": 2 * R * d * b, "reduce": (3 * S * d + T * d) * b} if pipeline == "torch_reference" else \
               {"align": 16 * S, "activation": 3 * R * f * b, "reduce": (S * d + T * d) * b}
    for name, nbytes in bytes_of.items():
        c = spec.steps[name]
        assert steps[name] == pytest.approx(c.fixed_us * 1e-6 + nbytes / (GPU.hbm_GBps * 1e9 * c.hbm_efficiency)), name
    before, experts, after = phase_times(LayerWork(np.array(T), np.array(S), rows), m, GPU, pipeline=pipeline)
    assert before + experts + after == pytest.approx(sum(steps.values()))
    assert after == pytest.approx(steps["reduce"])


def test_fp8_adds_quantisation_and_halves_weight_bytes():
    m = dsv3()
    rows = np.zeros(256)
    rows[:128] = 1  # decode: bound by reading the weights
    work = LayerWork(np.array(16.0), np.array(128.0), rows)
    bf16 = step_times(work, m, GPU, pipeline="torch_reference")
    fp8 = step_times(work, m, GPU, pipeline="torch_reference", dtype="fp8")
    assert "quant" in fp8 and "quant_down" in fp8 and "quant" not in bf16
    assert fp8["gemm_gate_up"] < 0.75 * bf16["gemm_gate_up"]


def test_engine_layer_is_the_sum_of_its_phases(cluster):
    """Two GPUs, one expert each, every token picks the other GPU's expert half the time: the batch takes
    dense + pre-dispatch steps + dispatch + experts + combine + reduction, each as its closed form."""
    spec = cluster(nodes=1, gpus_per_node=2)
    model = ModelSpec(num_layers=1, num_experts=2, top_k=1, d_model=1024, d_ff=2048, dense_flops_per_token=0)
    n = 512
    experts = (np.arange(2 * n) % 2).reshape(2 * n, 1, 1)
    trace = Trace(experts=experts, meta=TraceMeta(num_experts=2, num_layers=1, top_k=1)).validate()
    placement = Placement.from_assignment(np.array([[0, 1]]), 2, "contiguous")
    opts = EngineOptions(rate_tolerance=0.0, moe_kernels="torch_reference", dedup=False)
    rec = Simulation(build_topology(spec), model, options=opts).run(trace, trace.layout(2, n), placement)
    rows = np.array([[n, 0], [0, n]], dtype=float)
    before, exp, after = phase_times(LayerWork(np.array([n, n], dtype=float), np.array([n, n], dtype=float), rows),
                                     model, spec.gpu, pipeline="torch_reference")
    g = rec.gpu
    assert (g["t_dispatch_join"] - g["t_dense_end"])[0, 0] == pytest.approx(before, rel=1e-9)
    assert (g["t_compute_end"] - g["t_compute_start"])[0, 0] == pytest.approx(exp, rel=1e-9)
    assert (g["t_layer_end"] - g["t_combine_done"])[0, 0] == pytest.approx(after, rel=1e-9)
    span = g["t_layer_end"][0, 0].max() - g["t_layer_start"][0, 0].min()
    assert rec.batch_end[0] - rec.batch_start[0] == pytest.approx(span, rel=1e-12)


def test_shipped_fit_holds_on_the_points_it_held_out():
    """Re-fit the H200 pipelines from the measurement and check the held-out kernel errors, phase by phase."""
    import json

    from moesim.calibration.moe import fit_pipelines, held_out, moe_points, predict_kernels

    points = [p for path in MOE_RUNS for p in moe_points(json.loads(path.read_text()), str(path))]
    held = held_out(points)
    pipes = fit_pipelines(points, held, GPU)
    shipped = GPU.moe_pipelines["torch_reference"]  # what ships is what the fit gives (to its 4 printed digits)
    assert pipes["torch_reference"].gemm_efficiency == pytest.approx(shipped.gemm_efficiency, rel=1e-3)
    gpu = GPU.model_copy(update={"moe_pipelines": pipes})
    errors: dict[str, list[float]] = {"decode": [], "prefill": []}
    for p, h in zip(points, held):
        if h and p.pipeline == "torch_reference" and p.dtype == "bf16":
            errors[p.phase].append(abs(predict_kernels(p, gpu)[0] / p.kernels_ms - 1))
    assert np.median(errors["prefill"]) < 0.05 and max(errors["prefill"]) < 0.20
    assert np.median(errors["decode"]) < 0.12 and max(errors["decode"]) < 0.35


def test_cuda_graph_launch_charges_the_graph_fitted_fixed_costs():
    """Under launch cuda_graph every fused step is its graph-fitted fixed cost plus its bytes, and the grouped
    GEMMs' fixed cost is the graph one; the rest of the GEMM model is unchanged."""
    m = dsv3()
    T, S = 32.0, 256.0
    rows = np.zeros(256)
    rows[:128] = 2
    work = LayerWork(np.array(T), np.array(S), rows)
    spec = GPU.moe_pipelines["fused"]
    assert spec.graph_steps and spec.graph_gemm_fixed_us is not None
    eager = step_times(work, m, GPU, pipeline="fused")
    graph = step_times(work, m, GPU, pipeline="fused", launch="cuda_graph")
    nbytes = {"align": 16 * S, "activation": 3 * rows.sum() * 2048 * 2, "reduce": (S * 7168 + T * 7168) * 2}
    for name, b in nbytes.items():
        c = spec.graph_steps[name]
        assert graph[name] == pytest.approx(c.fixed_us * 1e-6 + b / (GPU.hbm_GBps * 1e9 * c.hbm_efficiency)), name
    shift = (spec.graph_gemm_fixed_us - spec.gemm_fixed_us) * 1e-6
    assert graph["gemm_down"] - eager["gemm_down"] == pytest.approx(shift)
    # the steps before the dispatch are small kernels: eagerly the host's launches dominate them
    assert graph["router"] + graph["align"] < 0.25 * (eager["router"] + eager["align"])


def test_cuda_graph_launch_needs_a_pipeline_that_can_be_captured():
    with pytest.raises(ValueError, match="needs moe_kernels fused"):
        EngineOptions(moe_kernels="torch_reference", launch="cuda_graph")
    with pytest.raises(ValueError, match="CUDA-graph cost .* 'permute'"):
        step_times(LayerWork(np.array(8.0), np.array(64.0), np.ones(256)), dsv3(), GPU, pipeline="torch_reference",
                   launch="cuda_graph")


def test_shipped_graph_fit_holds_on_the_points_it_held_out():
    """Re-fit the launch-free costs from the CUDA-graph measurement; held-out whole fused layers stay close."""
    import json

    from moesim.calibration.moe import fit_graph_pipelines, graph_points, held_out, predict_point

    path = MOE_RUNS[0].parent / "moe_graphs_h200.json"
    points = graph_points(json.loads(path.read_text()), str(path))
    held = held_out(points)
    pipes = fit_graph_pipelines(points, held, GPU)
    ref = GPU.moe_pipelines["torch_reference"]
    assert pipes["torch_reference"].graph_gemm_fixed_us == pytest.approx(ref.graph_gemm_fixed_us)
    assert pipes["torch_reference"].graph_steps == ref.graph_steps
    # the fused pipeline's GEMMs are vLLM's (fitted on AIConfigurator's table, the next test): moesim's own
    # Triton stand-in for fused_moe (untuned tiles, alignment sorted in PyTorch) is slower, never faster
    spec = ClusterSpec(**preset("hgx-h200"))
    ratio = [predict_point(p, spec)[0] / p.total_ms for p, h in zip(points, held) if h and p.whole_measured]
    assert len(ratio) >= 10 and 0.6 < np.median(ratio) < 1.0


@pytest.mark.parametrize("name, pipeline, least", [("vllm_fused_moe", "fused", 100),
                                                    ("sglang_deepep_moe", "deepgemm", 15)])
def test_fused_pipelines_are_the_engines_kernels_as_aiconfigurator_timed_them(name, pipeline, least):
    """The shipped fused (vLLM fused_moe) and deepgemm (SGLang's DeepEP + DeepGEMM) pipelines refit from the H200
    tables (benchmarks/validation/aiconfigurator); their held-out rows stay close, and the H100 tables, never
    fitted, are predicted as closely on the H100's HBM and peak."""
    import json

    from moesim.calibration.moe import held_out, predict_point
    from moesim.calibration.table import check_moe_table, fit_table_pipeline, table_points, with_floors

    def points(gpu):
        path = REPO / "benchmarks" / "validation" / "aiconfigurator" / f"{name}_{gpu}.json"
        raw = json.loads(path.read_text())
        check_moe_table(raw, str(path))
        return table_points(raw, str(path))

    h200, h100 = points("h200"), points("h100")
    held = held_out(h200)
    pipes, floors = fit_table_pipeline(h200, held, GPU)
    assert pipes[pipeline] == GPU.moe_pipelines[pipeline]  # what ships is what the fit gives
    assert all(0.0 <= f < 0.5 for f in floors.values())  # a harness's own floor: a fraction of a millisecond
    for pts, spec, mask in ((with_floors(h200, floors), ClusterSpec(**preset("hgx-h200")), held),
                            (with_floors(h100, floors), ClusterSpec(**preset("dgx-h100")), [True] * len(h100))):
        for phase, bound in (("decode", 0.07), ("prefill", 0.10)):
            err = [abs(predict_point(p, spec)[0] / p.total_ms - 1) for p, m in zip(pts, mask)
                   if m and p.phase == phase]
            assert len(err) >= least and np.median(err) < bound and max(err) < 0.8, (spec.name, phase)


def test_deepgemm_fp8_gemms_outrun_vllms_triton_ones():
    """What the two tables say of the FP8 kernels: DeepGEMM reaches over twice the FP8 peak share of vLLM's
    block-FP8 Triton kernel, which runs no faster than vLLM's bf16 one."""
    fused, deep = GPU.moe_pipelines["fused"], GPU.moe_pipelines["deepgemm"]
    assert deep.fp8_gemm_efficiency > 2 * fused.fp8_gemm_efficiency
    assert fused.fp8_gemm_efficiency * GPU.fp8_tflops <= 1.05 * fused.gemm_efficiency * GPU.bf16_tflops


def test_plain_gemm_is_one_expert_holding_every_row():
    """A plain GEMM is the grouped-GEMM model with one expert and every row, at the GPU's plain-GEMM fit."""
    T, n, k = 300.0, 4096, 7168
    spec = GPU.plain_gemm
    tiles = math.ceil(T / spec.tile_m) * math.ceil(n / spec.tile_n)
    tile_s = 2 * spec.tile_m * spec.tile_n * k / (GPU.bf16_tflops * 1e12 * spec.gemm_efficiency / GPU.sms)
    nbytes = k * n * 2 + T * (k * 2 + n * 2)
    want = max(math.ceil(tiles / GPU.sms) * tile_s, nbytes / (GPU.hbm_GBps * 1e9 * spec.gemm_hbm_efficiency))
    assert plain_gemm_time(np.array(T), n, k, GPU) == pytest.approx(want + spec.gemm_fixed_us * 1e-6)
    graph = plain_gemm_time(np.array(T), n, k, GPU, launch="cuda_graph")
    assert graph == pytest.approx(want + spec.graph_gemm_fixed_us * 1e-6)
    assert plain_gemm_time(np.array(0.0), n, k, GPU) == 0.0


def test_shipped_plain_gemm_fit_holds_on_the_points_it_held_out():
    """Re-fit plain GEMMs from the H200 measurement (shared experts, dense layers, MLA/GQA projections)."""
    import json

    from moesim.calibration.gemm import fit_plain_gemm, gemm_points, gemm_predictions, held_out

    path = MOE_RUNS[0].parent / "dense_h200.json"
    points = gemm_points(json.loads(path.read_text()), str(path))
    held = held_out(points)
    assert fit_plain_gemm(points, held, GPU) == GPU.plain_gemm  # what ships is what the fit gives
    rows = gemm_predictions(points, held, ClusterSpec(**preset("hgx-h200")))
    for kind in ("gemm", "gemm-graph"):
        errors = [abs(pred / meas - 1) for k, _, meas, pred, h in rows if h and k == kind]
        assert len(errors) >= 70 and np.median(errors) < 0.10
