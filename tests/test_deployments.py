"""The published-deployment scenarios (scenarios/deployments/) load and run shrunk, and the kernel choices they
rely on hold their closed forms: no align after DeepEP's low-latency dispatch, FP8 GEMMs outside the experts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.hardware import ClusterSpec, preset
from moesim.sim.compute import dense_time
from moesim.sim.kernels import LayerWork, step_times
from moesim.study import load_scenario, run_study
from moesim.traces.model import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_scenarios_smoke import shrink  # noqa: E402

# the plain scenarios; disaggregated ones (a prefill and a decode pool) are tests/test_disagg.py's
DEPLOYMENTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "scenarios" / "deployments").glob("*.yaml")
                     if "pools:" not in p.read_text())
GPU = ClusterSpec(**preset("h800")).gpu


def test_there_are_deployments():
    assert len(DEPLOYMENTS) >= 4


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.stem)
def test_deployment_runs_shrunk(path):
    scenario = shrink(load_scenario(path))
    result = run_study(scenario, progress=False)
    for run in result.runs:
        assert np.isfinite(run.metrics.e2e_ms["mean"]) and run.metrics.e2e_ms["mean"] > 0
        assert run.records.micro  # every deployment runs two micro-batches
    assert scenario.workload.seq_len or scenario.workload.kv_len  # a serving phase, so tokens/s is defined


def test_low_latency_dispatch_needs_no_align():
    """DeepEP's low-latency dispatch writes rows expert by expert: the fused pipeline skips its align step."""
    m = ModelSpec(name="m", num_layers=1, num_experts=64, top_k=8, d_model=2048, d_ff=1024)
    work = LayerWork(np.array(64.0), np.array(512.0), np.full(64, 8.0))
    plain = step_times(work, m, GPU, pipeline="fused")
    major = step_times(work, m, GPU, pipeline="fused", expert_major=True)
    assert "align" in plain and "align" not in major
    assert {k: v for k, v in plain.items() if k != "align"} == major


def test_fp8_projections_read_one_byte_weights_at_the_fp8_rate():
    m = ModelSpec(name="m", num_layers=1, num_experts=8, top_k=2, d_model=4096, d_ff=1024, num_heads=32)
    T = 64.0
    bf16 = float(dense_time(np.array(T), m, GPU)) - GPU.ffn_overhead_us * 1e-6
    fp8 = float(dense_time(np.array(T), m, GPU, dtype="fp8")) - GPU.ffn_overhead_us * 1e-6
    act = T * 2 * m.d_model * m.dtype_bytes
    assert bf16 == pytest.approx((m.dense_bytes + act) / GPU.hbm_bytes_per_s)  # decode: bound by the weights
    assert fp8 == pytest.approx((m.dense_bytes / 2 + act) / GPU.hbm_bytes_per_s)
