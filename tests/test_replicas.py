"""Replica choice rules (token index, SGLang static local, LPLB-like balanced split), greedy with redundant
experts, the memory bound on replicas, and the rules inside the engine."""

from __future__ import annotations

import numpy as np
import pulp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.hardware.presets import preset
from moesim.hardware.spec import ClusterSpec
from moesim.hardware.topology import build_topology
from moesim.placement import Capacity, Placement, PlacementProblem, make_placement, validate_placement
from moesim.placement.replication import pack_replicas, replica_counts
from moesim.sim.engine import EngineOptions, Simulation
from moesim.sim.replicas import (
    ReplicaChooser, balanced_split, check_rule, local_table, split_loads, token_index_ranks, water_fill,
)
from moesim.study.config import parse_scenario
from moesim.study import expert_loads, run_study
from moesim.traces.model import ModelSpec
from moesim.traces.synthetic import SyntheticParams, generate_trace


def test_water_fill_levels_the_lowest_bins():
    assert water_fill([0.0, 0.0], 4.0) == [2.0, 2.0]
    assert water_fill([5.0, 1.0, 3.0], 4.0) == [0.0, 3.0, 1.0]  # 1 and 3 rise to 4; 5 untouched
    assert sum(water_fill([2.0, 7.0, 7.0], 20.0)) == pytest.approx(20.0)


def _lp_optimum(counts, replicas, fixed) -> float:
    prob = pulp.LpProblem("split", pulp.LpMinimize)
    t = pulp.LpVariable("t")
    x = {(i, r): pulp.LpVariable(f"x_{i}_{r}", lowBound=0) for i, reps in enumerate(replicas) for r in reps}
    prob += t
    for i, reps in enumerate(replicas):
        prob += pulp.lpSum(x[i, r] for r in reps) == float(counts[i])
    for g in range(len(fixed)):
        prob += float(fixed[g]) + pulp.lpSum(v for (i, r), v in x.items() if r == g) <= t
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    return float(pulp.value(t))


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_split_reaches_the_lp_optimum(ranks, experts, seed):
    rng = np.random.default_rng(seed)
    fixed = rng.integers(0, 50, ranks).astype(float)
    replicas = [np.sort(rng.choice(ranks, size=int(rng.integers(2, ranks + 1)), replace=False)) for _ in range(experts)]
    counts = rng.integers(1, 100, experts)
    shares = split_loads(counts, replicas, fixed, passes=500, tol=1e-9)
    load = fixed.copy()
    for i, (reps, s) in enumerate(zip(replicas, shares)):
        assert (s >= -1e-12).all() and s.sum() == pytest.approx(counts[i])
        np.add.at(load, reps, s)
    assert load.max() <= _lp_optimum(counts, replicas, fixed) + 1e-3


def _layer(seed: int, T: int = 400, K: int = 2, E: int = 8, R: int = 4):
    rng = np.random.default_rng(seed)
    gpus = np.full((E, 2), -1)
    gpus[:, 0] = np.arange(E) % R
    gpus[0, 1] = (gpus[0, 0] + 1) % R  # expert 0 (the hottest) has two copies, expert 1 too
    gpus[1, 1] = (gpus[1, 0] + 2) % R
    p = np.arange(1, E + 1, dtype=float) ** -1.5
    experts = np.stack([rng.choice(E, size=K, replace=False, p=p / p.sum()) for _ in range(T)])
    experts[::17, 1] = -1  # some tokens with fewer experts
    home = rng.integers(0, R, T)
    return gpus, experts, home


@pytest.mark.parametrize("seed", range(5))
def test_balanced_split_serves_every_pair_from_a_holder_and_balances(seed):
    gpus, experts, home = _layer(seed)
    ranks = balanced_split(gpus, experts.T, home, 4)
    valid = experts.T >= 0
    assert (ranks[~valid] == -1).all()
    holds = np.zeros((8, 4), dtype=bool)
    for e in range(8):
        holds[e, gpus[e][gpus[e] >= 0]] = True
    assert holds[experts.T[valid], ranks[valid]].all()
    balanced = np.bincount(ranks[valid], minlength=4)
    by_index = np.bincount(token_index_ranks(gpus, experts, np.arange(len(home)))[valid], minlength=4)
    assert balanced.max() <= by_index.max()
    # the optimum, rounded: within one token per replicated expert of the fractional LP
    counts = np.bincount(experts[experts >= 0], minlength=8)
    fixed = np.bincount(gpus[2:, 0], weights=counts[2:], minlength=4)
    best = _lp_optimum(counts[:2], [np.sort(gpus[0]), np.sort(gpus[1])], fixed)
    assert balanced.max() <= best + 2


def test_balanced_split_spreads_each_replica_over_home_ranks():
    gpus = np.array([[0, 1], [2, -1], [3, -1]])
    experts = np.zeros((200, 1), dtype=np.int64)  # every token picks expert 0
    home = np.repeat(np.arange(4), 50)
    ranks = balanced_split(gpus, experts.T, home, 4)[0]
    for h in range(4):  # half of every home rank's tokens to each replica
        assert np.bincount(ranks[home == h], minlength=2)[:2].tolist() == [25, 25]


def test_local_table_prefers_same_gpu_then_node_then_spreads():
    # 8 ranks, 4 per node; expert 0 on ranks 1 and 2 (node 0); expert 1 on ranks 0 and 5 (one per node)
    gpus = np.array([[1, 2], [0, 5], [3, -1]])
    table = local_table(gpus, 8, 4)
    assert table[1, 0] == 1 and table[2, 0] == 2  # own copy
    assert set(table[[0, 3], 0]) == {1, 2}  # same node, spread over both copies
    assert sorted(table[4:, 0].tolist()) == [1, 1, 2, 2]  # no copy on node 1: spread evenly
    assert table[:4, 1].tolist() == [0, 0, 0, 0] and table[4:, 1].tolist() == [5, 5, 5, 5]
    assert (table[:, 2] == 3).all()


def test_chooser_rules_and_errors():
    gpus, experts, home = _layer(0)
    placement = Placement(num_ranks=4, gpus=gpus[None].astype(np.int32))
    assert ReplicaChooser("token_index", placement, 4).ranks(0, experts, home) is None
    local = ReplicaChooser("local", placement, 2).ranks(0, experts, home)
    valid = experts.T >= 0
    holds_home = (gpus[experts.T[valid]] == home[np.nonzero(valid)[1]][:, None]).any(axis=1)
    assert (local[valid][holds_home] == home[np.nonzero(valid)[1]][holds_home]).all()
    single = Placement.from_assignment(np.arange(8)[None] % 4, 4)
    assert ReplicaChooser("balanced_split", single, 4).ranks(0, experts, home) is None
    with pytest.raises(ValueError, match="valid: token_index, local, balanced_split"):
        check_rule("random")


# ---------------------------------------------------------------- greedy with redundant experts

def _problem(load, gpus, max_slots=None):
    L, E = load.shape
    return PlacementProblem(num_layers=L, num_experts=E, num_ranks=gpus, gpus_per_node=gpus,
                            slots_per_gpu=-(-E // gpus), load=load, max_slots_per_gpu=max_slots)


def test_replica_counts_follow_load_per_copy():
    counts = replica_counts(np.array([[9.0, 3.0, 1.0]]), 6, 3)
    assert counts.tolist() == [[3, 2, 1]]  # 9 -> 4.5 -> 3 (tie with 3: first) -> then 3/1 vs 9/3: expert 0 full
    with pytest.raises(ValueError, match="at most 2 per expert"):
        replica_counts(np.ones((1, 2)), 5, 2)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(2, 8), st.integers(1, 24), st.integers(0, 16), st.integers(0, 10_000))
def test_greedy_with_replicas_is_valid_and_no_worse(layers, gpus, experts, redundant, seed):
    rng = np.random.default_rng(seed)
    load = rng.zipf(1.5, (layers, experts)).astype(float)
    redundant = min(redundant, experts * gpus - experts)
    prob = _problem(load, gpus)
    p = make_placement("greedy", prob, redundant_experts=redundant)
    slots = -(-(experts + redundant) // gpus)
    validate_placement(p, num_layers=layers, num_experts=experts, num_ranks=gpus,
                       capacity=Capacity(slots_per_gpu=slots, expert_bytes_per_gpu=1, memory_bytes_per_gpu=1e9))
    assert p.replicas().sum() + p.info.get("merged_twins", 0) == layers * (experts + redundant)
    share = load / p.replicas()
    held = np.zeros((layers, experts, gpus), dtype=bool)
    for l in range(layers):
        for e in range(experts):
            held[l, e, p.gpus[l, e][p.gpus[l, e] >= 0]] = True
    heaviest = (held * share[:, :, None]).sum(axis=1).max(axis=1)
    assert (heaviest <= load.sum(axis=1) / gpus + share.max(axis=1) + 1e-9).all()  # the LPT bound


def test_pack_never_puts_twins_together_when_avoidable():
    load = np.array([[100.0, 1.0, 1.0, 1.0]])
    held = pack_replicas(load, np.array([[4, 1, 1, 1]]), 4, 2)
    assert held[0, 0].all() and held.sum() == 7


def test_replicas_are_bounded_by_memory():
    with pytest.raises(ValueError, match="do not fit in memory"):
        make_placement("greedy", _problem(np.ones((1, 8)), 4, max_slots=2), redundant_experts=4)


SCENARIO = {
    "name": "rep",
    "clusters": [{"preset": "hgx-h200", "nodes": 2, "gpus_per_node": 4, "name": "c"}],
    "model": {"num_layers": 2, "num_experts": 16, "top_k": 2, "d_model": 512, "d_ff": 256},
    "workload": {"synthetic": {"tokens_per_gpu": 128, "batches": 1, "zipf_alpha": 1.2, "seed": 3}},
    "placements": ["contiguous", {"policy": "eplb", "redundant_experts": 8},
                   {"policy": "greedy", "redundant_experts": 8, "name": "greedy_r8"}],
    "engine": {"progress": False},
}


@pytest.mark.parametrize("rule", ["token_index", "local", "balanced_split"])
def test_scenario_runs_replicas_under_every_rule(rule):
    sc = parse_scenario({**SCENARIO, "engine": {"progress": False, "replica_rule": rule}}, "rep.yaml")
    result = run_study(sc, progress=False)
    by = {r.name: r for r in result.runs}
    for run in result.runs:  # every token-expert pair computed once
        assert run.records.gpu["tokens"][..., ::1].sum() == by["contiguous"].records.gpu["tokens"].sum()
    imb = {n: r.metrics.compute_skew["imbalance"] for n, r in by.items()}
    assert imb["eplb"] < imb["contiguous"] and imb["greedy_r8"] < imb["contiguous"]
    if rule == "local":
        tok = parse_scenario(SCENARIO, "rep.yaml")
        base = {r.name: r for r in run_study(tok, progress=False).runs}
        assert by["eplb"].metrics.traffic_GB["inter_node_per_batch"] <= \
            base["eplb"].metrics.traffic_GB["inter_node_per_batch"]


def test_scenario_rejects_unknown_rule_and_oversized_replicas():
    with pytest.raises(InputError, match="engine.replica_rule"):
        parse_scenario({**SCENARIO, "engine": {"replica_rule": "random"}}, "rep.yaml")
    tiny = {**SCENARIO, "clusters": [{"preset": "hgx-h200", "nodes": 2, "gpus_per_node": 4, "name": "c",
                                      "gpu": {"memory_GB": 0.005}, "expert_memory_fraction": 1.0}],
            "placements": [{"policy": "eplb", "redundant_experts": 24}]}
    sc = parse_scenario(tiny, "rep.yaml")
    with pytest.raises(InputError, match=r"rep.yaml: placements.eplb.redundant_experts: .* do not fit in memory"):
        run_study(sc, progress=False)


def test_engine_counts_tokens_once_per_rule():
    spec = ClusterSpec(**{**preset("hgx-h200"), "nodes": 1, "gpus_per_node": 4, "name": "t"})
    topo = build_topology(spec)
    m = ModelSpec(num_layers=2, num_experts=8, top_k=2, d_model=256, d_ff=128)
    tr = generate_trace(num_layers=2, num_experts=8, top_k=2, num_gpus=4, tokens_per_gpu=64, batches=1,
                        params=SyntheticParams(zipf_alpha=1.0), rng=np.random.default_rng(0))
    p = make_placement("eplb", _problem(expert_loads(tr), 4), redundant_experts=4)
    for rule in ("token_index", "local", "balanced_split"):
        rec = Simulation(topo, m, options=EngineOptions(replica_rule=rule)).run(tr, tr.layout(4, 64), p)
        assert rec.gpu["tokens"].sum() == 2 * 4 * 64 * 2
