"""The optimising placements (ilp, ilp_moetuner, affinity) against brute force, greedy and the validator.

Tiny instances are solved by enumerating every assignment; the exact chain DP and the PuLP joint ILP
must both reach that optimum. Larger random instances check the always-valid properties: never worse
than greedy, a proven bound below the objective, every placement passing the one validator.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.placement import PlacementProblem, PlanningCosts, make_placement
from moesim.placement import ilp as I
from moesim.placement.ilp_moetuner import bottleneck_assignment, deviation, moetuner, stage1_ilp
from moesim.placement.ilp_solver import highs_available, resolve_solver
from moesim.placement.profile import coactivation_counts, expert_loads, transition_counts

SOLVERS = ["cbc", pytest.param("highs", marks=pytest.mark.skipif(not highs_available(), reason="no highspy"))]

COST_FIELDS = set(PlanningCosts.__dataclass_fields__)


def problem(L: int, E: int, G: int, gpn: int, *, seed: int = 0, tokens: int = 300, k: int = 2,
            s_in: float = 1.0, s_out: float = 3.0, **extra) -> PlacementProblem:
    """A random instance: skewed loads, cross-layer affine routing, two-tier costs."""
    rng = np.random.default_rng(seed)
    ex = np.empty((tokens, L, k), dtype=np.int64)
    pop = rng.dirichlet(np.full(E, 0.7), size=L)
    succ = rng.integers(0, E, size=(L, E))
    for t in range(tokens):
        for l in range(L):
            first = succ[l, ex[t, l - 1, 0]] if l and rng.random() < 0.7 else rng.choice(E, p=pop[l])
            rest = rng.choice(np.delete(np.arange(E), first), size=k - 1, replace=False)
            ex[t, l] = [first, *rest]
    node = np.arange(G) // gpn
    s = np.where(node[:, None] == node[None, :], s_in, s_out) * (1 - np.eye(G))
    costs = dict(compute_s_per_pair=0.02, dispatch_bytes=1.0, rank_s_per_byte=s, coherent=True)
    costs.update({k: extra.pop(k) for k in list(extra) if k in COST_FIELDS})
    return PlacementProblem(num_layers=L, num_experts=E, num_ranks=G, gpus_per_node=gpn, slots_per_gpu=-(-E // G),
                            load=expert_loads(ex, E), routing=ex, costs=PlanningCosts(**costs), **extra)


def layer_assignments(E: int, G: int, slots: int) -> list[np.ndarray]:
    return [np.array(a) for a in itertools.product(range(G), repeat=E)
            if np.bincount(a, minlength=G).max() <= slots]


def brute_force(p: PlacementProblem, cm: I.CostModel) -> float:
    rows = layer_assignments(p.num_experts, p.num_ranks, p.slots_per_gpu)
    best = np.inf
    for combo in itertools.product(rows, repeat=p.num_layers):
        best = min(best, I.evaluate(p, np.stack(combo), cm).total)
    return best


TINY = [(3, 4, 2, 2), (3, 4, 2, 1), (2, 4, 4, 2), (3, 3, 3, 3)]


@pytest.mark.parametrize("L,E,G,gpn", TINY)
def test_exact_dp_is_the_brute_force_optimum(L, E, G, gpn):
    p = problem(L, E, G, gpn, seed=L * 100 + G)
    cm = I.cost_model(p)
    assign, info = I.optimise(p, method="exact")
    assert info["status"] == "optimal" and info["gap"] == 0
    assert I.evaluate(p, assign, cm).total == pytest.approx(brute_force(p, cm), rel=1e-9)
    assert info["objective"] <= info["greedy_objective"] + 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("L,E,G,gpn", TINY[:2])
def test_joint_ilp_is_the_brute_force_optimum(L, E, G, gpn, solver):
    p = problem(L, E, G, gpn, seed=7 + G)
    cm = I.cost_model(p)
    greedy = np.stack([I.lpt(p.load[l], G, p.slots_per_gpu) for l in range(L)])
    best, bound, status = I.solve_joint(p, cm, greedy, solver=solver, time_limit_s=20, gap=0.0)
    opt = brute_force(p, cm)
    assert status == "optimal"
    assert I.evaluate(p, best, cm).total == pytest.approx(opt, rel=1e-6)
    assert bound <= opt * (1 + 1e-6)


def test_load_lower_bound_is_valid_and_tight_on_pigeonhole():
    rng = np.random.default_rng(1)
    for E, G in ((5, 2), (6, 3), (6, 2), (7, 3)):
        for _ in range(5):
            load = rng.integers(1, 50, size=E).astype(float)
            slots = -(-E // G)
            opt = min(np.bincount(a, weights=load, minlength=G).max() for a in layer_assignments(E, G, slots))
            assert I.load_lower_bound(load, G, slots) <= opt + 1e-9
    # three equal experts on two ranks: one rank takes two
    assert I.load_lower_bound(np.array([10.0, 10.0, 10.0]), 2, 2) == 20.0


def test_balance_layer_proves_a_small_gap():
    rng = np.random.default_rng(2)
    load = rng.pareto(2.0, size=256) * 100 + 10
    a, ub, lb = I.balance_layer(load, 64, 4, gap=0.01, solver="auto", deadline=np.inf)
    assert np.bincount(a, minlength=64).max() == 4
    assert ub == pytest.approx(np.bincount(a, weights=load, minlength=64).max())
    assert lb <= ub and (ub - lb) / ub < 0.02


def test_linear_assignment_matches_enumeration():
    rng = np.random.default_rng(3)
    for n in (1, 3, 5):
        c = rng.random((n, n))
        col = I.linear_assignment(c)
        best = min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col) == list(range(n))
        assert c[np.arange(n), col].sum() == pytest.approx(best)


@pytest.mark.parametrize("seed", range(3))
def test_decomposition_is_valid_bounded_and_not_worse_than_greedy(seed):
    p = problem(5, 16, 4, 2, seed=seed, tokens=200)
    placement = make_placement("ilp", p, method="decompose", time_limit_s=10.0)
    info = placement.info
    assert placement.copies_per_gpu().max() <= p.slots_per_gpu
    assert info["objective"] <= info["greedy_objective"] + 1e-12
    assert info["lower_bound"] <= info["objective"] and 0 <= info["gap"] < 1
    assert info["load_lower_bound"] <= info["load_objective"]
    cm = I.cost_model(p)
    assert I.evaluate(p, placement.gpus[:, :, 0], cm).total == pytest.approx(info["objective"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_time_limit_returns_the_incumbent_with_its_gap(solver):
    p = problem(4, 16, 4, 2, seed=5, tokens=200)
    placement = make_placement("ilp", p, method="joint", time_limit_s=0.3, solver=solver, gap=0.0)
    info = placement.info
    assert info["method"].startswith("joint")
    assert info["objective"] <= info["greedy_objective"] + 1e-12
    assert info["lower_bound"] <= info["objective"]
    assert info["status"] in {"time_limit", "optimal", "within_gap"}
    assert info["status"] != "optimal" or info["gap"] <= 1e-9


def test_infeasible_and_bad_options_are_one_line_errors():
    p = problem(2, 4, 2, 2, memory_slots=3)  # 2 layers x 4 experts need 4 copies per rank
    with pytest.raises(InputError, match="memory_slots") as exc:
        make_placement("ilp", p)
    assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="memory_slots"):
        make_placement("ilp_moetuner", p)
    with pytest.raises(InputError, match="memory_slots"):  # 7 copies on 3 ranks fit 3, but not 2 x 3 slots
        make_placement("ilp", problem(2, 7, 3, 3, memory_slots=5))
    q = problem(2, 4, 2, 2)
    with pytest.raises(InputError, match="solver"):
        make_placement("ilp", q, solver="gurobi")
    with pytest.raises(InputError, match="method"):
        make_placement("ilp", q, method="magic")
    with pytest.raises(InputError, match="w_comm"):
        make_placement("ilp", q, w_comm=-1.0)
    with pytest.raises(InputError, match="time_limit_s"):
        make_placement("ilp", q, time_limit_s=0.0)
    with pytest.raises(InputError, match="method"):  # exact needs experts = ranks x slots
        make_placement("ilp", problem(2, 5, 2, 2), method="exact")


def test_uneven_experts_per_rank_are_valid():
    p = problem(3, 7, 3, 3, seed=4)  # 7 experts on 3 ranks: 3 slots, not all full
    for policy in ("ilp", "ilp_moetuner", "affinity"):
        placement = make_placement(policy, p)
        assert placement.copies_per_gpu().max() <= 3


def test_stage1_ilp_is_the_brute_force_optimum():
    rng = np.random.default_rng(6)
    load = rng.integers(1, 100, size=8).astype(float)
    best = min(deviation(load, a, 4) for a in layer_assignments(8, 4, 2) if np.bincount(a, minlength=4).min() == 2)
    start = I.lpt(load, 4, 2)
    a, bound = stage1_ilp(load, 4, 2, solver="cbc", time_limit_s=10, gap=0.0, incumbent=start)
    assert deviation(load, a, 4) == pytest.approx(best)
    assert bound <= best + 1e-6


def test_bottleneck_assignment_matches_enumeration():
    rng = np.random.default_rng(7)
    w, tie = rng.integers(0, 6, size=(4, 4)).astype(float), rng.random((4, 4))
    col = bottleneck_assignment(w, tie)
    perms = list(itertools.permutations(range(4)))
    best = min(max(w[i, p[i]] for i in range(4)) for p in perms)
    assert w[np.arange(4), col].max() == best
    ties = [sum(tie[i, p[i]] for i in range(4)) for p in perms if max(w[i, p[i]] for i in range(4)) == best]
    assert tie[np.arange(4), col].sum() == pytest.approx(min(ties))


def test_moetuner_balances_and_maps_every_layer():
    p = problem(4, 8, 4, 2, seed=8)
    assign, info = moetuner(p, solver="cbc")
    assert (np.bincount(assign.ravel() + 4 * np.repeat(np.arange(4), 8), minlength=16) == 2).all()
    assert info["stage1_lower_bound"] <= info["stage1_objective"]
    assert 0 <= info["load_gap"] < 1


def test_affinity_colocates_more_than_greedy():
    p = problem(6, 16, 4, 4, seed=9, tokens=400)
    cm = I.cost_model(p, w_compute=0.0)
    aff = make_placement("affinity", p, load_slack=0.2).gpus[:, :, 0]
    greedy = make_placement("greedy", p).gpus[:, :, 0]
    assert I.evaluate(p, aff, cm).affinity.sum() < I.evaluate(p, greedy, cm).affinity.sum()


def test_profile_counts_match_a_direct_count():
    rng = np.random.default_rng(10)
    ex = rng.integers(-1, 5, size=(50, 3, 2))
    ex[:, :, 1] = np.where(ex[:, :, 1] == ex[:, :, 0], -1, ex[:, :, 1])
    R, C = transition_counts(ex, 5), coactivation_counts(ex, 5)
    R2, C2 = np.zeros((2, 5, 5)), np.zeros((3, 5, 5))
    for t, l in itertools.product(range(50), range(3)):
        picks = [e for e in ex[t, l] if e >= 0]
        for e, f in itertools.permutations(picks, 2):
            C2[l, e, f] += 1
        if l < 2:
            for e, f in itertools.product(picks, [f for f in ex[t, l + 1] if f >= 0]):
                R2[l, e, f] += 1
    assert np.array_equal(R, R2) and np.array_equal(C, C2)
    assert np.array_equal(expert_loads(ex, 5).sum(axis=1), (ex >= 0).sum(axis=(0, 2)))


def test_solver_choice():
    assert resolve_solver("cbc") == "cbc"
    assert resolve_solver("auto") == ("highs" if highs_available() else "cbc")


def test_solve_info_reaches_results_json(tmp_path):
    from moesim.report.files import results_json
    from moesim.study.config import parse_scenario
    from moesim.study.runner import run_study
    data = {
        "clusters": [{"name": "1x8-h100", "preset": "dgx-h100", "tp": 2}],
        "model": {"name": "mixtral-8x7b", "num_layers": 4, "num_experts": 8, "top_k": 2, "d_model": 4096,
                  "d_ff": 14336},
        "workload": {"synthetic": {"tokens_per_gpu": 256, "batches": 1, "zipf_alpha": 0.8, "affinity": 0.6,
                                   "affinity_fanout": 2, "seed": 7}},
        "placements": ["contiguous", "greedy", "ilp", "ilp_moetuner", "affinity"],
        "engine": {"progress": False},
    }
    result = run_study(parse_scenario(data, "tiny_ilp"))
    runs = {r["placement"]: r for r in json.loads(json.dumps(results_json(result)))["runs"]}
    info = runs["ilp"]["placement_info"]
    assert {"objective", "lower_bound", "gap", "solve_s", "load_gap"} <= set(info)
    assert info["status"] == "optimal" and info["gap"] == 0
    for policy in ("ilp_moetuner", "affinity"):
        other = runs[policy]["placement_info"]
        assert other["lower_bound"] <= other["objective"] and 0 <= other["gap"] < 1 and "solve_s" in other
    assert "placement_info" not in runs["greedy"]


# ---------------------------------------------------------------- context-coherent dataflow (engine)


def test_coherent_traffic_matches_a_direct_count():
    from moesim.sim.traffic import coherent_traffic
    rng = np.random.default_rng(11)
    G, tp, E, T, K = 4, 2, 5, 40, 2
    ex = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(2)]) for _ in range(T)])
    ex[rng.random(ex.shape) < 0.1] = -1
    gpus = np.full((2, E, 2), -1, dtype=np.int32)  # some experts replicated on both ranks
    gpus[:, :, 0] = rng.integers(0, 2, size=(2, E))
    gpus[:, 0, 1] = 1 - gpus[:, 0, 0]
    home = rng.integers(0, G, size=T)
    ids = np.arange(T) + 100
    for dedup in (True, False):
        copies, resident = coherent_traffic(ex[:, 0], ex[:, 1], home, ids, gpus[0], gpus[1], num_gpus=G, tp=tp,
                                            dedup=dedup)
        want, held = np.zeros((G, G), dtype=np.int64), np.zeros(G)
        for t in range(T):
            def rank(layer: int, e: int) -> int:
                reps = [g for g in gpus[layer, e] if g >= 0]
                return reps[ids[t] % len(reps)]
            src = [rank(0, e) for e in ex[t, 0] if e >= 0]
            dst = [rank(1, e) for e in ex[t, 1] if e >= 0]
            pairs = {(s, d) for s in src for d in dst} if dedup else [(s, d) for s in src for d in dst]
            for s, d in pairs:
                want[s * tp + home[t] % tp, d * tp + home[t] % tp] += 1
            for s in set(src):
                held[s * tp + home[t] % tp] += 1
        assert np.array_equal(copies, want) and np.array_equal(resident, held)


def test_coherent_dataflow_moves_tokens_once_when_successors_are_colocated(cluster):
    from moesim.hardware import build_topology
    from moesim.placement import Placement
    from moesim.sim import EngineOptions, Simulation
    from moesim.traces import Trace, TraceMeta
    from moesim.traces.model import ModelSpec
    L, n = 3, 64
    model = ModelSpec(num_layers=L, num_experts=2, top_k=1, d_model=512, d_ff=1024)
    experts = np.repeat((np.arange(2 * n) % 2)[:, None, None], L, axis=1)  # a token keeps its expert id
    trace = Trace(experts=experts, meta=TraceMeta(num_experts=2, num_layers=L, top_k=1)).validate()
    layout = trace.layout(2, n)
    placement = Placement.from_assignment(np.tile([0, 1], (L, 1)), 2, "aligned")
    topo = build_topology(cluster(nodes=1, gpus_per_node=2))
    runs = {flow: Simulation(topo, model, options=EngineOptions(rate_tolerance=0.0, dataflow=flow)).run(
        trace, layout, placement) for flow in ("standard", "coherent")}
    sent = {flow: rec.gpu["bytes_out_intra"].sum() for flow, rec in runs.items()}
    assert sent["standard"] > 0
    assert sent["coherent"] * L == pytest.approx(sent["standard"])  # out at layer 0, home after layer L-1
    names = [c.name.split("[")[0] for c in runs["coherent"].collectives]
    assert names.count("dispatch") == L and names.count("combine") == 1
    assert runs["coherent"].batch_end[0] < runs["standard"].batch_end[0]
    assert (runs["coherent"].gpu["tokens"] == runs["standard"].gpu["tokens"]).all()


def test_coherent_dataflow_is_a_scenario_option():
    from moesim.study.config import parse_scenario
    base = {"clusters": ["hgx-h200"], "placements": ["greedy"],
            "model": {"num_layers": 2, "num_experts": 8, "top_k": 2, "d_model": 64, "d_ff": 128},
            "workload": {"synthetic": {"tokens_per_gpu": 8}}}
    assert parse_scenario({**base, "engine": {"dataflow": "coherent"}}, "s").engine.dataflow == "coherent"
    with pytest.raises(InputError, match="engine"):
        parse_scenario({**base, "engine": {"dataflow": "coherent", "a2a": "hierarchical"}}, "s")
    with pytest.raises(InputError, match="engine.dataflow"):
        parse_scenario({**base, "engine": {"dataflow": "sideways"}}, "s")


def test_traffic_weights_follow_the_dataflow():
    coherent = problem(3, 8, 4, 2, seed=12)
    standard = problem(3, 8, 4, 2, seed=12, coherent=False)
    assert make_placement("ilp", coherent).info["weights"] == {"compute": 1.0, "comm": 1.0, "affinity": 1.0,
                                                               "dispatch": 0.0}
    info = make_placement("ilp", standard).info
    assert info["weights"] == {"compute": 1.0, "comm": 0.0, "affinity": 0.0, "dispatch": 1.0}  # two nodes
    assert info["objective"] == pytest.approx(info["load_objective"] + info["dispatch_objective"])
    assert make_placement("ilp", standard, w_comm=2).info["weights"]["comm"] == 2.0


@pytest.mark.parametrize("seed", range(3))
def test_alignment_and_swaps_never_raise_the_exact_objective(seed):
    p = problem(5, 12, 6, 3, seed=20 + seed, tokens=150)
    cm = I.cost_model(p)
    start = np.stack([I.lpt(p.load[l], 6, 2) for l in range(5)])
    aligned = I.align_layers(p, start, cm)
    swapped = I.affinity_swaps(p, aligned, cm, deadline=np.inf)
    values = [I.evaluate(p, a, cm).total for a in (start, aligned, swapped)]
    assert values[0] >= values[1] >= values[2]
    assert values[2] < values[0]  # affine routing leaves something to gain
    assert (np.bincount(swapped.ravel() + 6 * np.repeat(np.arange(5), 12)) == 2).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_balance_layer_reaches_the_optimum_with_its_ilp(solver):
    rng = np.random.default_rng(13)
    rows = layer_assignments(8, 4, 2)
    for _ in range(3):
        load = rng.integers(1, 1000, size=8).astype(float)
        opt = min(np.bincount(a, weights=load, minlength=4).max() for a in rows)
        a, ub, lb = I.balance_layer(load, 4, 2, gap=0.0, solver=solver, deadline=np.inf)
        assert ub == pytest.approx(opt) and lb <= ub
        assert np.bincount(a, minlength=4).tolist() == [2, 2, 2, 2]


def test_routing_statistics_are_lazy_and_follow_the_problem():
    import dataclasses
    p = problem(3, 4, 2, 2, tokens=20)
    assert p.transition_counts().sum() == 20 * 2 * 2 * 2  # tokens x layer pairs x top-2 x top-2
    q = dataclasses.replace(p, routing=p.routing[:5])
    assert q.transition_counts().sum() == 5 * 2 * 2 * 2 and p.transition_counts().sum() == 160
    assert q.coactivation_counts().sum() == 5 * 3 * 2  # ordered pairs of a token's two picks, per layer
    given = dataclasses.replace(p, transitions=np.ones((2, 4, 4)))
    assert given.transition_counts().sum() == 32


# ----------------------------------------------------------------------------------------------------
# the standard dataflow's inter-node dispatch term (nodes first)


def direct_dispatch(p: PlacementProblem, assign: np.ndarray, cm: I.CostModel) -> np.ndarray:
    """Per layer: remote (token, destination) copies with homes spread evenly, over one node's NICs."""
    N, gpn = p.num_nodes, p.gpus_per_node
    out = np.zeros(p.num_layers)
    for l in range(p.num_layers):
        for t in range(p.routing.shape[0]):
            ranks = {int(assign[l, e]) for e in p.routing[t, l] if e >= 0}
            dests = {r // gpn for r in ranks} if cm.copies == "node" else ranks
            out[l] += len(dests) * (N - 1) / N  # a destination is remote unless the token lives there
    return out / N * cm.copy_s * cm.w_dispatch  # the mean node's share


@pytest.mark.parametrize("copies", ["node", "gpu"])
def test_dispatch_term_matches_a_direct_count(copies):
    p = problem(3, 12, 6, 2, seed=4, tokens=60, k=3, coherent=False, a2a_copies=copies, combine_bytes=2.0)
    cm = I.cost_model(p)
    assert cm.w_dispatch == 1.0 and cm.copies == copies
    assert cm.copy_s == pytest.approx((1.0 + 2.0) * 3.0 / 2)  # both directions, s_out per byte, 2 NICs a node
    rng = np.random.default_rng(0)
    for _ in range(3):
        assign = np.stack([rng.permutation(np.repeat(np.arange(6), 2)) for _ in range(3)])
        got = I.evaluate(p, assign, cm).dispatch
        assert got == pytest.approx(direct_dispatch(p, assign, cm))
        assert I.dispatch_lower_bound(p, cm) <= got.sum() + 1e-12
    assert I.spans(np.array([[0, 1, -1], [-1, -1, -1]]), np.array([70, 70])).tolist() == [1, 0]  # wide owners


def test_node_swaps_never_raise_their_objective():
    p = problem(2, 24, 6, 2, seed=9, tokens=120, k=4, coherent=False, a2a_copies="node")
    picks, load = p.routing[:, 0, :], p.load[0]

    def value(node_of: np.ndarray) -> float:
        bound = max(I.load_lower_bound(load[node_of == n], 2, 4) for n in range(3))
        return 2.0 * bound + 0.5 * I.spans(picks, node_of).sum()

    for start in (np.arange(24) * 3 // 24, np.arange(24) % 3):
        out = I.node_swaps(picks, load, start, 3, gpn=2, slots=4, w_load=2.0, w_span=0.5)
        assert np.bincount(out, minlength=3).tolist() == [8, 8, 8]
        assert value(out) <= value(start) + 1e-12
    assert value(I.node_swaps(picks, load, np.arange(24) % 3, 3, gpn=2, slots=4, w_load=2.0, w_span=0.5)) < \
        value(np.arange(24) % 3)


def group_limited(seed: int = 0, tokens: int = 400) -> PlacementProblem:
    """2 nodes x 2 ranks, 8 experts in 2 groups of 4; each token picks 2 experts of one group."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(4, 1.0), size=(3, 2))  # [layer, group, expert in group]
    ex = np.empty((tokens, 3, 2), dtype=np.int64)
    for t in range(tokens):
        for l in range(3):
            g = rng.integers(2)
            ex[t, l] = 4 * g + rng.choice(4, size=2, replace=False, p=pop[l, g])
    s = np.where(np.arange(4)[:, None] // 2 == np.arange(4)[None, :] // 2, 1e-3, 1.0) * (1 - np.eye(4))
    return PlacementProblem(num_layers=3, num_experts=8, num_ranks=4, gpus_per_node=2, slots_per_gpu=2,
                            load=expert_loads(ex, 8), routing=ex,
                            costs=PlanningCosts(compute_s_per_pair=0.5, rank_s_per_byte=s, a2a_copies="node"))


def test_group_limited_routing_keeps_groups_on_nodes_and_balances():
    p = group_limited()
    placement = make_placement("ilp", p)
    a = placement.gpus[:, :, 0]
    node = a // 2
    assert (node[:, :4] == node[:, :1]).all() and (node[:, 4:] == node[:, 4:5]).all()
    assert (node[:, 0] != node[:, 4]).all()  # span 1 for every token
    for l in range(3):  # and balanced as well as a group per node allows
        best = min(max(np.bincount(n0, weights=p.load[l][:4], minlength=2).max(),
                       np.bincount(n1, weights=p.load[l][4:], minlength=2).max())
                   for n0 in layer_assignments(4, 2, 2) for n1 in layer_assignments(4, 2, 2))
        assert I.layer_max_load(p.load[l], a[l], 4) == pytest.approx(best)
    info = placement.info
    assert info["method"] == "nodes_first" and info["layers_nodes_first"] == 3
    assert info["dispatch_objective"] == pytest.approx(I.dispatch_lower_bound(p, I.cost_model(p)))
    assert info["lower_bound"] <= info["objective"] < info["greedy_objective"]  # greedy splits a group
    off = make_placement("ilp", p, w_dispatch=0.0).info  # the term off: the load-only path (here the exact DP)
    assert off["weights"]["dispatch"] == 0.0 and off["method"] == "exact_dp"


def test_dispatch_term_is_off_on_one_node_and_under_the_coherent_dataflow():
    one = problem(2, 8, 4, 4, seed=1, coherent=False, a2a_copies="node")
    assert I.cost_model(one).w_dispatch == 0.0 and I.cost_model(one, w_dispatch=1.0).w_dispatch == 0.0
    assert I.cost_model(problem(2, 8, 4, 2, seed=1, a2a_copies="node")).w_dispatch == 0.0  # coherent
    assert I.cost_model(problem(2, 8, 4, 2, seed=1, coherent=False, a2a_copies="expert")).w_dispatch == 0.0
    info = make_placement("ilp", one).info
    assert info["weights"]["dispatch"] == 0.0 and info["dispatch_objective"] == 0.0
    with pytest.raises(InputError, match="w_dispatch"):
        make_placement("ilp", problem(2, 8, 4, 2, coherent=False), w_dispatch=-1.0)
    with pytest.raises(InputError, match="redundant_experts"):
        make_placement("ilp", problem(2, 8, 4, 2, coherent=False), w_dispatch=1.0, redundant_experts=2)


@pytest.mark.parametrize("seed", range(3))
def test_nodes_first_is_valid_bounded_and_not_worse_than_greedy(seed):
    p = problem(4, 16, 8, 2, seed=30 + seed, tokens=200, k=3, coherent=False, a2a_copies=("node", "gpu")[seed % 2])
    placement = make_placement("ilp", p, time_limit_s=20.0)
    info = placement.info
    cm = I.cost_model(p)
    assert cm.w_dispatch == 1.0 and placement.copies_per_gpu().max() <= p.slots_per_gpu
    assert info["objective"] <= info["greedy_objective"] + 1e-12
    assert I.evaluate(p, placement.gpus[:, :, 0], cm).total == pytest.approx(info["objective"])
    assert info["lower_bound"] <= info["objective"] and 0 <= info["gap"] < 1
    assert info["load_lower_bound"] <= info["load_objective"]
    again = make_placement("ilp", p, time_limit_s=20.0)  # deterministic
    assert np.array_equal(again.gpus, placement.gpus)
