"""The placement optimisers' hardware costs (moesim.sim.costs) are the engine's: closed forms on the topology,
and the same numbers the engine's compute model gives (this test fails if the two diverge)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.hardware import build_topology
from moesim.sim.costs import compute_s_per_pair, expert_seconds, hardware_costs, rank_seconds_per_byte
from moesim.sim.engine import EngineOptions, Simulation
from moesim.traces.model import ModelSpec

MODEL = ModelSpec(name="fine", num_layers=2, num_experts=64, top_k=6, d_model=2048, d_ff=1408)


def test_seconds_per_byte_two_tiers(cluster):
    spec = cluster(nodes=2, gpus_per_node=4)
    s = rank_seconds_per_byte(build_topology(spec), 1)
    assert s[0, 1] == pytest.approx(1 / spec.nvlink.bytes_per_s)
    assert s[0, 5] == pytest.approx(spec.gpus_per_nic / spec.network.nic_bytes_per_s)
    assert np.all(np.diag(s) == 0)


def test_oversubscribed_uplinks_slow_cross_leaf_pairs(cluster):
    flat = {"rail_optimized": False, "nodes_per_leaf": 1}
    one = rank_seconds_per_byte(build_topology(cluster(nodes=2, gpus_per_node=4, network=flat)), 1)
    two = rank_seconds_per_byte(build_topology(cluster(nodes=2, gpus_per_node=4,
                                                       network={**flat, "oversubscription": 2.0})), 1)
    assert two[0, 5] == pytest.approx(2 * one[0, 5])  # a leaf's uplinks carry its 4 GPUs' flows at half rate
    assert two[0, 1] == pytest.approx(one[0, 1])


@pytest.mark.parametrize("kernels", ["torch_reference", "fused", "ffn"])
def test_optimiser_and_engine_read_the_same_compute(cluster, kernels):
    spec = cluster(nodes=1, gpus_per_node=8)
    topo = build_topology(spec)
    opts = EngineOptions(moe_kernels=kernels)
    sim = Simulation(topo, MODEL, options=opts)
    per_rank = 8  # experts per rank
    r0 = 512.0 * MODEL.top_k
    rows = np.zeros((2, MODEL.num_experts))
    for i, r in enumerate((0.75 * r0, 1.25 * r0)):
        rows[i, :per_rank] = r / per_rank
    engine = sim._compute(np.zeros(2), np.zeros(2), rows)[2]  # the engine's expert phase for those rows
    assert engine == pytest.approx(expert_seconds(np.array([0.75 * r0, 1.25 * r0]), MODEL, spec.gpu, 1, opts,
                                                  per_rank), rel=1e-12)
    slope = compute_s_per_pair(topo, MODEL, 1, opts, 512.0)
    assert slope == pytest.approx((engine[1] - engine[0]) / (0.5 * r0), rel=1e-12)
    assert hardware_costs(topo, MODEL, tp=1, options=opts, tokens_per_gpu=512.0).compute_s_per_pair == slope


def test_prepared_problem_plans_with_the_shared_costs(tiny_scenario_data):
    from moesim.study import parse_scenario, prepare

    plan = prepare(parse_scenario(tiny_scenario_data, "tiny.yaml"))
    for cp in plan.clusters:
        assert cp.problem is not None and cp.costs is not None
        assert cp.problem.costs is cp.costs  # the policies plan on the very numbers the study predicts with
        assert cp.costs.layer_fixed_s > 0
