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
from moesim.sim.kernels import LayerWork, grouped_gemm_time, phase_times, step_times
from moesim.traces.format import Trace, TraceMeta
from moesim.traces.model import ModelSpec

GPU = ClusterSpec(**preset("hgx-h200")).gpu
REF = GPU.moe_pipelines["torch_reference"]
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
