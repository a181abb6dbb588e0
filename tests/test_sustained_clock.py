"""The GPU under sustained load (``GPUSpec.sustained_clock``): a FLOP-bound kernel slows by 1 / clock, a memory-bound
one not; a forward on fused kernels runs at it, a decode step or eager PyTorch not; ``moesim calibrate`` fits it on
the measured H200 file (benchmarks/validation/power_h200/sustained.json) as the median of its tensor-core kernels'
burst / steady."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from moesim.calibration import calibrate, load_bench
from moesim.calibration.sustained import TENSOR, TENSOR_PARTS, fit_sustained, predict_steady
from moesim.errors import InputError
from moesim.hardware import ClusterSpec, preset
from moesim.sim.kernels import plain_gemm_time
from moesim.study.config import parse_scenario
from moesim.study.plan import prepare

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "benchmarks/validation/power_h200/sustained.json"
RUN2 = ROOT / "benchmarks/validation/power_h200/sustained_run2.json"  # adds a fused and a decode layer


def test_flop_bound_work_slows_by_the_clock_and_memory_bound_work_does_not():
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    hot = gpu.at_sustained_clock()
    c = gpu.sustained_clock
    assert 0.5 < c < 1.0 and hot.sustained_clock == 1.0 and hot.at_sustained_clock() is hot
    assert hot.bf16_tflops == pytest.approx(gpu.bf16_tflops * c) and hot.fp8_tflops == pytest.approx(gpu.fp8_tflops * c)
    assert hot.hbm_GBps == gpu.hbm_GBps and hot.memory_GB == gpu.memory_GB
    spec = gpu.plain_gemm
    for dtype in ("bf16", "fp8"):  # 16k rows of a 7168 x 18432 GEMM: waves of tiles, FLOP-bound
        big = [float(plain_gemm_time(np.array(16384.0), 18432, 7168, g, dtype=dtype)) for g in (gpu, hot)]
        fixed = (spec.fp8_gemm_fixed_us if dtype == "fp8" else spec.gemm_fixed_us) * 1e-6
        assert (big[1] - fixed) == pytest.approx((big[0] - fixed) / c, rel=1e-9)
        small = [float(plain_gemm_time(np.array(1.0), 18432, 7168, g, dtype=dtype)) for g in (gpu, hot)]
        assert small[1] == pytest.approx(small[0], rel=1e-12)  # one row: reading the weights, HBM-bound


def _scenario(kernels: str = "deepgemm", **workload):
    return {"clusters": [{"name": "c", "preset": "hgx-h200", "nodes": 1}],
            "model": {"preset": "deepseek-v3", "num_layers": 2, "first_dense_layers": 0},
            "workload": {**workload, "synthetic": {"tokens_per_gpu": 256}}, "placements": ["contiguous"],
            "engine": {"moe_kernels": kernels}}


def test_fused_forwards_run_at_the_sustained_clock_decode_and_eager_pytorch_at_boost():
    """auto: a prefill (or attention-less forward) on the serving engines' fused kernels is sustained; a decode step
    (mostly memory-bound) and eager PyTorch (memory-bound operator passes between its GEMMs: the measured eager layer
    slowed 1.025x, the fused one 1.145x) stay at boost; engine.clock overrides either way."""
    prefill, decode = _scenario(seq_len=256), _scenario(kv_len=1024)
    assert parse_scenario(prefill, "s.yaml").sustained and parse_scenario(_scenario("fused"), "s.yaml").sustained
    assert not parse_scenario(decode, "s.yaml").sustained
    assert not parse_scenario(_scenario("torch_reference", seq_len=256), "s.yaml").sustained
    assert not parse_scenario(_scenario("ffn", seq_len=256), "s.yaml").sustained
    assert parse_scenario({**decode, "engine": {"clock": "sustained"}}, "s.yaml").sustained
    assert not parse_scenario({**prefill, "engine": {"moe_kernels": "deepgemm", "clock": "boost"}}, "s.yaml").sustained
    with pytest.raises(InputError, match="engine.clock"):
        parse_scenario({**prefill, "engine": {"clock": "turbo"}}, "s.yaml")
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    for data, peak in ((prefill, gpu.bf16_tflops * gpu.sustained_clock), (decode, gpu.bf16_tflops)):
        plan = prepare(parse_scenario(data, "s.yaml"), build=False)
        assert plan.clusters[0].topology.cluster.gpu.bf16_tflops == pytest.approx(peak)


def test_calibrate_fits_the_median_of_the_tensor_kernels_and_checks_the_rest():
    raw = json.loads(MEASURED.read_text())
    k = raw["kernels"]
    want = statistics.median(k[n]["burst_ms"] / k[n]["steady_ms"] for n in TENSOR)
    points = load_bench([MEASURED]).sustained
    assert fit_sustained(points) == pytest.approx(want)
    copy = next(p for p in points if p.kernel == "hbm_copy")
    assert predict_steady(copy, want) == copy.burst_ms  # memory-bound: unchanged
    eager = next(p for p in points if p.kernel == "layer")  # eager PyTorch: at boost, predicted unchanged
    assert eager.burst_ms == pytest.approx(sum(raw["layer_parts"].values())) and eager.tensor_share == 0.0
    run2 = json.loads(RUN2.read_text())["kernels"]
    fused, decode = (next(p for p in load_bench([RUN2]).sustained if p.kernel == n)
                     for n in ("fused_layer", "decode_layer"))
    parts = run2["fused_layer"]["parts"]
    assert fused.burst_ms == pytest.approx(sum(parts.values()))
    assert fused.tensor_share == pytest.approx(sum(v for n, v in parts.items() if n in TENSOR_PARTS) / fused.burst_ms)
    assert 0.8 < fused.tensor_share < 1.0
    assert decode.burst_ms == run2["decode_layer"]["burst_ms"] and predict_steady(decode, want) == decode.burst_ms
    cal = calibrate(load_bench([MEASURED]))
    assert cal.fitted["gpu.sustained_clock"] == pytest.approx(want)
    assert cal.spec.gpu.sustained_clock == pytest.approx(want)
    held = [p for p in cal.predictions if p.kind == "sustained-check"]
    assert {p.held_out for p in held} == {True} and len(held) == 2
    assert all(abs(p.predicted_ms / p.measured_ms - 1) < 0.10 for p in cal.predictions if p.kind.startswith("sust"))


def test_bad_sustained_file_names_the_field(tmp_path):
    raw = json.loads(MEASURED.read_text())
    del raw["kernels"]["attention"]["steady_ms"]
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"kernels\.attention\.steady_ms"):
        load_bench([bad])
    raw = json.loads(MEASURED.read_text())
    raw["kernels"] = {"hbm_copy": raw["kernels"]["hbm_copy"]}
    bad.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="no tensor-core kernel"):
        load_bench([bad])


def test_the_cpu_run_of_the_measurement_writes_what_calibrate_reads(tmp_path):
    """moesim.measure.sustained on the CPU (tiny shapes, float32, no nvidia-smi): its file loads as benchmark points
    and fits a clock (meaningless on a CPU; the plumbing is what is checked)."""
    pytest.importorskip("torch")
    from moesim.measure import sustained

    path = sustained.run(tmp_path, cpu=True, seconds=0.05, rest=0.0, reps=2, log=lambda line: None)
    raw = json.loads(path.read_text())
    assert raw["format"] == "moesim.bench.sustained/1" and set(raw["kernels"]) >= set(TENSOR) | {"hbm_copy", "layer"}
    assert all(r["chunks"] and r["burst_ms"] > 0 and r["steady_ms"] > 0 for r in raw["kernels"].values())
    points = load_bench([path]).sustained
    assert {p.kernel for p in points} == set(raw["kernels"]) and 0 < fit_sustained(points) <= 1.0
