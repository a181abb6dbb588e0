"""Hierarchical and low-latency all-to-alls, group-limited routing, and DeepEP's published tables."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.calibration.deepep import LOW_LATENCY_TABLE, NORMAL_TABLE, low_latency_points, normal_points
from moesim.errors import InputError
from moesim.hardware import ClusterSpec, preset
from moesim.hardware.topology import build_topology
from moesim.placement.format import Placement
from moesim.sim.engine import EngineOptions, Simulation
from moesim.sim.traffic import hierarchical_bytes, layer_traffic
from moesim.study.config import parse_scenario
from moesim.traces.model import ModelSpec
from moesim.traces.synthetic import SyntheticParams, generate_trace


def _hierarchical_by_hand(experts: np.ndarray, home: np.ndarray, owner: np.ndarray, gpn: int) -> np.ndarray:
    """Token by token: one copy to each other node's rail peer, forwarded to each destination GPU there."""
    G = owner.max() + 1
    out = np.zeros((G, G))
    for t in range(experts.shape[0]):
        s = home[t]
        dests = sorted({int(owner[e]) for e in experts[t]})
        for n in sorted({d // gpn for d in dests}):
            via = n * gpn + s % gpn
            if n != s // gpn:
                out[s, via] += 1
            for d in dests:
                if d // gpn == n:
                    out[via, d] += d != via or d == s  # the rail peer keeps its own copy; s copies locally
    return out


def test_hierarchical_two_nodes_closed_form():
    # 2 nodes x 2 GPUs; a token on GPU 0 with experts on GPUs 2 and 3 crosses the network once (0 -> 2),
    # and GPU 2 forwards it to GPU 3 over NVLink.
    copies = np.zeros((4, 4), dtype=np.int64)
    copies[0, 2] = copies[0, 3] = 1
    node_copies = np.array([[0, 1], [0, 0], [0, 0], [0, 0]])
    out = hierarchical_bytes(copies, node_copies, 2, 10.0)
    expect = np.zeros((4, 4))
    expect[0, 2], expect[2, 3] = 10.0, 10.0
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hierarchical_matches_token_by_token(seed):
    rng = np.random.default_rng(seed)
    G, gpn, E, K, T = 8, 4, 16, 3, 300
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    home = rng.integers(0, G, T)
    owner = np.arange(E) * G // E
    tr = layer_traffic(experts, home, np.arange(T), owner[:, None], num_gpus=G, tp=1, num_experts=E, dedup=True,
                       gpus_per_node=gpn)
    nodes_by_hand = np.zeros((G, G // gpn), dtype=np.int64)
    for t in range(T):
        for n in {owner[e] // gpn for e in experts[t]}:
            nodes_by_hand[home[t], n] += 1
    np.testing.assert_array_equal(tr.node_copies, nodes_by_hand)
    np.testing.assert_array_equal(hierarchical_bytes(tr.copies, tr.node_copies, gpn, 1.0),
                                  _hierarchical_by_hand(experts, home, owner, gpn))


def _sim(nodes: int, a2a: str, dedup: bool = True, seed: int = 0, kernels: dict | None = None):
    spec = ClusterSpec(**{**preset("h800"), "nodes": nodes, "a2a_kernels": kernels or {}})
    G = spec.num_gpus
    model = ModelSpec(num_layers=2, num_experts=64, top_k=8, d_model=1024, d_ff=512)
    trace = generate_trace(num_layers=2, num_experts=64, top_k=8, num_gpus=G, tokens_per_gpu=256, batches=1,
                           params=SyntheticParams(), rng=np.random.default_rng(seed))
    placement = Placement.from_assignment(np.tile(np.arange(64) * G // 64, (2, 1)), G, "contiguous")
    sim = Simulation(build_topology(spec), model, options=EngineOptions(a2a=a2a, dedup=dedup))
    return sim.run(trace, trace.layout(G, 256), placement), trace, model


def test_hierarchical_on_one_node_is_direct():
    """On one node DeepEP's normal kernels move copies as NCCL does; given NCCL's fixed costs, nothing differs."""
    launch = preset("h800")["a2a_launch_us"]
    a, _, _ = _sim(1, "hierarchical", kernels={"deepep_normal": {"launch_us": launch, "notify_us": 0.0}})
    b, _, _ = _sim(1, "direct")
    for name in a.gpu:
        np.testing.assert_array_equal(a.gpu[name], b.gpu[name])


def test_hierarchical_sends_one_network_copy_per_node():
    hier, trace, model = _sim(2, "hierarchical")
    direct, _, _ = _sim(2, "direct")
    G, gpn = 16, 8
    owner = np.arange(64) * G // 64
    expected = 0
    for l in range(2):  # tokens x distinct remote nodes, counted straight from the trace
        nodes = owner[trace.experts[:, l, :].astype(int)] // gpn
        remote = nodes != (trace.home // gpn)[:, None]
        s = np.sort(np.where(remote, nodes, -1), axis=1)
        expected += int(((s[:, 1:] != s[:, :-1]) & (s[:, 1:] >= 0)).sum() + (s[:, 0] >= 0).sum())
    sent = hier.gpu["bytes_out_inter"].sum() / 2  # dispatch and combine carry the same copies
    assert sent == pytest.approx(expected * model.dispatch_bytes)
    assert hier.gpu["bytes_out_inter"].sum() < direct.gpu["bytes_out_inter"].sum()


def test_low_latency_sends_one_message_per_expert():
    ll, trace, _ = _sim(1, "low_latency", dedup=True)
    assert ll.gpu["recv_copies"][0, 0].sum() == trace.experts.shape[0] * 8  # no deduplication
    direct, _, _ = _sim(1, "direct")
    assert direct.gpu["recv_copies"][0, 0].sum() < ll.gpu["recv_copies"][0, 0].sum()


def test_engine_options_reject_unknown_a2a():
    with pytest.raises(ValueError, match="a2a"):
        EngineOptions(a2a="ring")


def test_group_limited_routing():
    params = SyntheticParams(zipf_alpha=0.4, gpu_mix_sigma=0.3, affinity=0.5, groups=8, topk_groups=4)
    tr = generate_trace(num_layers=3, num_experts=256, top_k=8, num_gpus=4, tokens_per_gpu=2000, batches=1,
                        params=params, rng=np.random.default_rng(0))
    e = tr.experts.astype(int)
    groups = np.sort(e // 32, axis=2)
    used = 1 + (groups[..., 1:] != groups[..., :-1]).sum(axis=2)
    assert used.max() <= 4 and used.min() >= 1
    s = np.sort(e, axis=2)
    assert (s[..., 1:] != s[..., :-1]).all()  # k distinct experts
    flat = generate_trace(num_layers=1, num_experts=256, top_k=8, num_gpus=4, tokens_per_gpu=8000, batches=1,
                          params=SyntheticParams(zipf_alpha=0.0, gpu_mix_sigma=0.0, affinity=0.0, groups=8,
                                                 topk_groups=4), rng=np.random.default_rng(1))
    counts = np.bincount(flat.experts.ravel().astype(int), minlength=256)
    mean = counts.mean()  # flat popularity stays flat: each expert within 5 sigma of its mean
    assert np.abs(counts - mean).max() < 5 * np.sqrt(mean)


@pytest.mark.parametrize("kwargs, match", [(dict(groups=3), "divide"), (dict(groups=8, topk_groups=9), "topk_groups"),
                                           (dict(groups=64, topk_groups=1), "fewer than top_k")])
def test_group_limited_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_trace(num_layers=1, num_experts=256, top_k=8, num_gpus=2, tokens_per_gpu=8, batches=1,
                       params=SyntheticParams(**kwargs), rng=np.random.default_rng(0))


def _scenario(**over):
    data = {"clusters": ["h800"],
            "model": {"num_layers": 2, "num_experts": 16, "top_k": 2, "d_model": 64, "d_ff": 32},
            "workload": {"synthetic": {"tokens_per_gpu": 8}}, "placements": ["contiguous"]}
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_scenario(data, "s.yaml")


def test_scenario_engine_a2a_and_groups():
    sc = _scenario(engine={"a2a": "hierarchical"}, workload={"synthetic": {"tokens_per_gpu": 8, "groups": 4,
                                                                           "topk_groups": 2}})
    assert sc.engine.a2a == "hierarchical" and sc.workload.synthetic.topk_groups == 2
    with pytest.raises(InputError, match=r"s\.yaml: engine.*per_gpu"):
        _scenario(engine={"a2a": "low_latency", "dispatch": "per_gpu"})
    with pytest.raises(InputError, match=r"workload\.synthetic\.groups"):
        _scenario(workload={"synthetic": {"tokens_per_gpu": 8, "groups": 3}})
    with pytest.raises(InputError, match=r"workload\.synthetic\.topk_groups"):
        _scenario(workload={"synthetic": {"tokens_per_gpu": 8, "groups": 8, "topk_groups": 9}})


def test_deepep_published_tables_reproduced():
    """DeepEP's H800 figures (not fitted): every point within 30%, median within 15% (the issue's bar).
    The small configurations run here; benchmarks/fidelity.py runs all of them."""
    normal = [p for p in normal_points() if p.ep <= 16]
    low = [p for p in low_latency_points() if p.ep <= 16]
    assert len(normal) == 4 and len(low) == 8
    errors = np.abs([p.error for p in normal + low])
    assert errors.max() < 0.30, [(p.ep, p.phase, p.quantity, round(p.error, 3)) for p in normal + low]
    assert np.median(errors) < 0.15
    assert {ep for _, ep, *_ in NORMAL_TABLE} == {8, 16, 32, 64}
    assert [row[0] for row in LOW_LATENCY_TABLE] == [8, 16, 32, 64, 128, 256]


def test_deepep_low_latency_bandwidth_is_deepeps_formula():
    # DeepEP: bandwidth = valid selections x bytes per copy / time; with every top-k slot valid that is
    # tokens x 8 x bytes / latency.
    for p_lat, p_bw in zip(*[[p for p in low_latency_points() if p.ep == 8 and p.phase == "dispatch"
                              and p.quantity == q] for q in ("latency_us", "bandwidth_GBps")]):
        assert p_bw.predicted == pytest.approx(128 * 8 * (7168 + 7168 / 128 * 4 + 16) / (p_lat.predicted * 1e-6) / 1e9)
