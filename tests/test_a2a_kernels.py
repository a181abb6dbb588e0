"""All-to-all kernel families (engine.a2a): each pays its own fixed costs and reaches its own link shares.

Closed forms from the cluster's spec: a collective takes the family's launch (plus its count exchange before a
dispatch, plus its per-peer cost times the busiest rank's peers), then the bytes at the links' rates, then
the path latency.
"""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from moesim.errors import InputError
from moesim.hardware import ClusterSpec, build_topology, deep_merge, preset
from moesim.hardware.spec import A2A_ALIASES, A2A_FAMILIES
from moesim.placement.format import Placement
from moesim.sim.engine import EngineOptions, Simulation
from moesim.sim.network import Fabric, kernel_cost
from moesim.study.config import parse_scenario
from moesim.traces.model import ModelSpec
from moesim.traces.synthetic import SyntheticParams, generate_trace


def _run(topo, nbytes, kernel, notify=False):
    env = simpy.Environment()
    fabric = Fabric(env, topo)
    proc = env.process(fabric.collective("t", np.asarray(nbytes, dtype=float), kernel=kernel, notify=notify))
    env.run()
    return proc.value


def _uniform(G, nbytes):
    m = np.full((G, G), float(nbytes))
    np.fill_diagonal(m, 0.0)
    return m


@pytest.mark.parametrize("family", A2A_FAMILIES)
@pytest.mark.parametrize("notify", [False, True])
def test_each_family_pays_its_own_fixed_costs(node8, family, notify):
    spec = node8.cluster
    k = spec.a2a_kernels.family(family)
    launch = (k.launch_us if k.launch_us is not None else spec.a2a_launch_us) * 1e-6
    fixed = launch + (k.notify_us * 1e-6 if notify else 0.0) + k.per_peer_us * 1e-6 * 7
    nbytes = 1e6
    result = _run(node8, _uniform(8, nbytes), family, notify)
    rate = spec.nvlink.GBps * 1e9 * (k.nvlink_efficiency or spec.nvlink.efficiency)
    expected = fixed + 7 * nbytes / rate + spec.nvlink.latency_us * 1e-6
    assert result.gpu_done == pytest.approx(np.full(8, expected), rel=1e-12)


def test_a_small_decode_collective_is_not_charged_nccls_launch(node8):
    """DeepEP's low-latency kernels and the one-sided NVLink kernels cost their own launch, not NCCL's call."""
    spec = node8.cluster
    tiny = _uniform(8, 7 * 1024)  # a few decode tokens per peer
    nccl = _run(node8, tiny, "nccl").gpu_done.max()
    for family in ("deepep_low_latency", "nvlink_one_sided"):
        own = spec.a2a_kernels.family(family).launch_us * 1e-6
        t = _run(node8, tiny, family).gpu_done.max()
        assert t - own == pytest.approx(nccl - spec.a2a_launch_us * 1e-6, rel=1e-12)
        assert t < nccl


def test_per_peer_cost_counts_the_busiest_ranks_peers(cluster):
    topo = build_topology(cluster(nodes=1, a2a_kernels={"nccl": {"per_peer_us": 2.0}}))
    m = np.zeros((8, 8))
    m[0, 1:] = 1e3  # GPU 0 sends to 7 peers; every other GPU to none
    m[3, 4] = 1e3
    base = build_topology(cluster(nodes=1))
    assert _run(topo, m, "nccl").gpu_done.max() - _run(base, m, "nccl").gpu_done.max() == pytest.approx(7 * 2e-6)


def test_family_bandwidth_share_replaces_the_links_efficiency(cluster):
    """A family reaching half the NVLink line rate moves the same bytes at half the rate."""
    topo = build_topology(cluster(nodes=1, a2a_kernels={"nvlink_one_sided": {"nvlink_efficiency": 0.35}}))
    spec = topo.cluster
    result = _run(topo, _uniform(8, 4e6), "nvlink_one_sided")
    launch = spec.a2a_kernels.nvlink_one_sided.launch_us * 1e-6
    expected = launch + 7 * 4e6 / (spec.nvlink.GBps * 1e9 * 0.35) + spec.nvlink.latency_us * 1e-6
    assert result.gpu_done == pytest.approx(np.full(8, expected), rel=1e-12)
    assert kernel_cost(topo, "nccl").capacity is topo.capacity  # the others keep the links' own shares


def test_rdma_share_slows_only_the_network(cluster):
    topo = build_topology(cluster(nodes=2, a2a_kernels={"deepep_low_latency": {"rdma_efficiency": 0.47}}))
    cost = kernel_cost(topo, "deepep_low_latency")
    kind = np.array(topo.link_kind)
    np.testing.assert_allclose(cost.capacity[kind == "nic"], topo.capacity[kind == "nic"] * 0.47 / 0.94)
    np.testing.assert_array_equal(cost.capacity[kind != "nic"], topo.capacity[kind != "nic"])


def test_aliases_name_the_families():
    assert {EngineOptions(a2a=a).a2a for a in A2A_ALIASES} == {"nccl", "deepep_normal", "deepep_low_latency"}
    assert EngineOptions().a2a == "nccl"
    with pytest.raises(ValueError, match="nvlink_one_sided"):
        EngineOptions(a2a="ring")


def _layer(spec: ClusterSpec, a2a: str):
    G = spec.num_gpus
    model = ModelSpec(num_layers=2, num_experts=32, top_k=4, d_model=512, d_ff=256)
    trace = generate_trace(num_layers=2, num_experts=32, top_k=4, num_gpus=G, tokens_per_gpu=64, batches=1,
                           params=SyntheticParams(), rng=np.random.default_rng(0))
    placement = Placement.from_assignment(np.tile(np.arange(32) * G // 32, (2, 1)), G, "contiguous")
    sim = Simulation(build_topology(spec), model, options=EngineOptions(a2a=a2a, moe_kernels="fused"))
    return sim.run(trace, trace.layout(G, 64), placement)


@pytest.mark.parametrize("alias", sorted(A2A_ALIASES))
def test_an_alias_runs_exactly_as_its_family(alias):
    spec = ClusterSpec(**{**preset("h800"), "nodes": 2})
    a, b = _layer(spec, alias), _layer(spec, A2A_ALIASES[alias])
    for name in a.gpu:
        np.testing.assert_array_equal(a.gpu[name], b.gpu[name])


def test_nvlink_one_sided_runs_inside_one_nvlink_domain():
    nvl72 = ClusterSpec(**preset("gb200-nvl72"))
    rec = _layer(nvl72, "nvlink_one_sided")
    assert rec.gpu["bytes_out_inter"].sum() == 0 and rec.gpu["bytes_out_intra"].sum() > 0
    with pytest.raises(ValueError, match="one NVLink domain.*2 nodes of 8 GPUs"):
        _layer(ClusterSpec(**{**preset("h800"), "nodes": 2}), "nvlink_one_sided")


def _scenario(clusters, **engine):
    return parse_scenario({"clusters": clusters,
                           "model": {"num_layers": 2, "num_experts": 16, "top_k": 2, "d_model": 64, "d_ff": 32},
                           "workload": {"synthetic": {"tokens_per_gpu": 8}}, "placements": ["contiguous"],
                           "engine": engine}, "s.yaml")


def test_scenario_refuses_one_sided_nvlink_across_nodes():
    assert _scenario(["gb200-nvl72"], a2a="nvlink_one_sided").engine.a2a == "nvlink_one_sided"
    with pytest.raises(InputError, match=r"s\.yaml: engine\.a2a: .*one NVLink domain.*'h800-2x8' spans 2 nodes"):
        _scenario([{"preset": "h800", "nodes": 2}], a2a="nvlink_one_sided")


def test_cluster_yaml_sets_a_familys_costs():
    sc = _scenario([{"preset": "h800", "a2a_kernels": {"deepep_low_latency": {"launch_us": 12.5, "sms": 4}}}],
                   a2a="deepep_low_latency", overlap="two_batch")
    kernels = sc.clusters[0].spec.a2a_kernels
    assert kernels.deepep_low_latency.launch_us == 12.5 and kernels.deepep_low_latency.sms == 4
    assert kernels.nccl.launch_us is None  # the cluster's a2a_launch_us
    with pytest.raises(InputError, match=r"a2a_kernels\.deepep_normal\.launch"):
        _scenario([{"preset": "h800", "a2a_kernels": {"deepep_normal": {"launch": 3}}}])
    with pytest.raises(InputError, match=r"a2a_kernels\.nccl\.per_peer_us"):
        _scenario([{"preset": "h800", "a2a_kernels": {"nccl": {"per_peer_us": -1}}}])


def test_family_sms_slow_the_overlapped_compute():
    from moesim.sim.overlap import slowdown

    spec = ClusterSpec(**deep_merge(preset("h800"), {"a2a_kernels": {"deepep_normal": {"sms": 33}}}))
    model = ModelSpec(num_layers=1, num_experts=8, top_k=2, d_model=64, d_ff=32)
    for a2a, sms in (("deepep_normal", 33), ("deepep_low_latency", 0), ("nvlink_one_sided", 16), ("nccl", 24)):
        sim = Simulation(build_topology(spec), model, options=EngineOptions(a2a=a2a, moe_kernels="fused"))
        assert slowdown(sim) == pytest.approx(spec.gpu.sms / (spec.gpu.sms - sms))
