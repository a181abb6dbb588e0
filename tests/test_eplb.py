"""EPLB: DeepSeek's README example exactly, torch's tie order, the primitives' invariants, the policy."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.placement import Capacity, PlacementProblem, make_placement, validate_placement
from moesim.placement.eplb import (
    _std_sort_desc, balanced_packing, placement_from_phy2log, rebalance_experts, redundant_count,
    replicate_experts, torch_sort_desc,
)

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_reproduces_the_deepseek_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
    # the reference's other two outputs for the same call
    np.testing.assert_array_equal(logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
    np.testing.assert_array_equal(log2phy, [
        [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1], [8, 10],
         [14, -1]],
        [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1], [1, -1],
         [5, -1]]])


def test_global_policy_when_nodes_do_not_divide_groups():
    # 3 groups on 2 nodes: the reference falls back to one group on one node (output of the reference)
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    np.testing.assert_array_equal(phy2log, [[10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
                                            [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7]])
    np.testing.assert_array_equal(logcnt.sum(axis=1), [16, 16])


def test_sort_keeps_torch_tie_order():
    # torch.tensor(x).sort(descending=True).indices on CPU (libstdc++ introsort: unstable past 16 items)
    assert _std_sort_desc([1.0] * 17) == [8, 16, 15, 14, 13, 12, 11, 10, 9, 0, 7, 6, 5, 4, 3, 2, 1]
    assert _std_sort_desc([0.5] * 20) == [10, 19, 18, 17, 16, 15, 14, 13, 12, 11, 0, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert _std_sort_desc([1.0, 2.0, 1.0, 2.0, 1.0, 2.0]) == [1, 3, 5, 0, 2, 4]  # insertion sort: stable
    assert _std_sort_desc([]) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=0, max_size=200), st.integers(0, 3))
def test_sort_emulation_sorts_and_permutes(values, shape):
    x = np.array(values, dtype=float)
    if shape == 1:
        x = np.sort(x)
    elif shape == 2:
        x = np.sort(x)[::-1]
    order = _std_sort_desc(x.tolist())
    assert sorted(order) == list(range(x.size))
    assert (np.diff(x[order]) <= 0).all()
    np.testing.assert_array_equal(torch_sort_desc(x[None, :])[0], order)


def test_sort_emulation_matches_torch_when_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for trial in range(100):
        n = int(rng.integers(1, 300))
        x = rng.integers(0, int(rng.integers(1, 5)), n).astype(np.float32)
        if trial % 5 == 0:
            x = np.sort(x)
        expected = torch.tensor(x).sort(descending=True).indices.tolist()
        assert _std_sort_desc(x.tolist()) == expected, trial


def test_balanced_packing_fills_packs_evenly_heaviest_first():
    w = np.array([[10.0, 1, 9, 2, 8, 3], [1, 1, 1, 1, 1, 1]])
    pack, rank = balanced_packing(w, 3)
    # 10->0, 9->1, 8->2, then 3 joins the lightest (8), 2 the next (9), 1 the last (10): all packs weigh 11
    np.testing.assert_array_equal(pack[0], [0, 0, 1, 1, 2, 2])
    for row in range(2):
        assert np.bincount(pack[row], minlength=3).tolist() == [2, 2, 2]
        for p in range(3):  # ranks inside a pack are 0..size-1
            assert sorted(rank[row][pack[row] == p]) == [0, 1]


def test_balanced_packing_one_item_per_pack_is_identity():
    pack, rank = balanced_packing(np.array([[3.0, 1.0, 2.0]]), 3)
    assert pack.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]]


def test_replicate_experts_gives_extra_slots_to_heaviest_per_copy():
    phy2log, rank, cnt = replicate_experts(np.array([[8.0, 3.0, 4.0]]), 6)
    # 8 -> copy (8/2=4 ties 4: first maximum, expert 0) -> 8/3 vs 4 -> expert 2 -> 8/3 vs 3 vs 2 -> expert 1
    assert phy2log.tolist() == [[0, 1, 2, 0, 0, 2]]
    assert rank.tolist() == [[0, 0, 0, 1, 2, 1]]
    assert cnt.tolist() == [[3, 1, 2]]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 2), (8, 4)]), st.integers(1, 4),
       st.integers(0, 2), st.integers(0, 10_000), st.booleans())
def test_rebalance_invariants(layers, gpus_nodes, groups_mult, extra, seed, ties):
    gpus, nodes = gpus_nodes
    groups = nodes * groups_mult
    E = groups * 2
    P = E + (-E) % gpus + gpus * extra
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 3, (layers, E)) if ties else rng.random((layers, E)) * 100
    phy2log, log2phy, logcnt = rebalance_experts(w, P, groups, nodes, gpus)
    assert phy2log.shape == (layers, P)
    for l in range(layers):
        np.testing.assert_array_equal(np.bincount(phy2log[l], minlength=E), logcnt[l])  # every copy counted
        assert (logcnt[l] >= 1).all()
        for e in range(E):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == logcnt[l, e] and (phy2log[l, slots] == e).all()
        if nodes > 1 and groups % nodes == 0:  # hierarchical: a group's copies stay on one node
            node_of_slot = np.arange(P) // (P // nodes)
            for g in range(groups):
                members = np.isin(phy2log[l], np.arange(g * 2, g * 2 + 2))
                assert len(set(node_of_slot[members])) == 1


def test_rebalance_rejects_what_the_reference_asserts():
    with pytest.raises(ValueError, match="split evenly over 8 GPUs"):
        rebalance_experts(README_WEIGHT, 15, 4, 2, 8)
    with pytest.raises(ValueError, match="nodes"):
        rebalance_experts(README_WEIGHT, 16, 4, 3, 8)
    with pytest.raises(ValueError, match="groups"):
        rebalance_experts(README_WEIGHT, 16, 8, 2, 8)
    with pytest.raises(ValueError, match="cannot hold"):
        rebalance_experts(README_WEIGHT, 8, 4, 2, 8)


def test_deepseek_v3_shape_is_fast():
    rng = np.random.default_rng(0)
    w = (rng.zipf(1.3, (58, 256)) * 100).astype(float)
    rebalance_experts(w, 288, 8, 4, 32)  # warm
    t0 = time.perf_counter()
    phy2log, _, _ = rebalance_experts(w, 288, 8, 4, 32)
    wall = time.perf_counter() - t0
    assert phy2log.shape == (58, 288)
    assert wall < 0.5  # benchmarks/bench_eplb.py measures it; here only a generous guard for slow CI


# ---------------------------------------------------------------- the eplb policy

def _problem(load: np.ndarray, gpus: int, gpus_per_node: int, max_slots: int | None = None) -> PlacementProblem:
    L, E = load.shape
    return PlacementProblem(num_layers=L, num_experts=E, num_ranks=gpus, gpus_per_node=gpus_per_node,
                            slots_per_gpu=-(-E // gpus), load=load, max_slots_per_gpu=max_slots)


def test_policy_turns_slots_into_gpus():
    p = make_placement("eplb", _problem(README_WEIGHT.astype(float), 8, 4), redundant_experts=4, num_groups=4)
    assert p.info["mode"] == "hierarchical" and p.info["redundant_experts"] == 4
    phy2log, _, _ = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    for l in range(2):
        for slot, e in enumerate(phy2log[l]):
            assert slot // 2 in p.gpus[l, e]
    assert (p.copies_per_gpu() <= 2).all() and p.replicas().sum() == 32 - p.info["merged_twins"]


def test_policy_merges_twins_on_one_gpu():
    # the global README variant puts both copies of expert 1 on GPU 7 in layer 0 (slots 14, 15) and both
    # copies of expert 8 on GPU 6 in layer 1 (slots 12, 13)
    phy2log, _, _ = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    p = placement_from_phy2log(phy2log, 12, 8, "eplb")
    assert p.info["merged_twins"] == 2
    assert p.gpus[0, 1][p.gpus[0, 1] >= 0].tolist() == [7]
    assert p.gpus[1, 8][p.gpus[1, 8] >= 0].tolist() == [6]
    assert p.gpus[1, 7][p.gpus[1, 7] >= 0].tolist() == [4, 7]
    validate_placement(p, num_layers=2, num_experts=12, num_ranks=8)


def test_policy_defaults_fill_slots_and_balance_better_than_no_replicas():
    rng = np.random.default_rng(3)
    load = np.stack([np.arange(1, 65) ** -1.2 * 1e4 for _ in range(2)])[:, rng.permutation(64)]
    prob = _problem(load, 8, 8)
    assert redundant_count(64, 8, None) == 0
    plain = make_placement("eplb", prob)
    more = make_placement("eplb", prob, redundant_experts=16)

    def max_gpu_load(p):
        share = load / p.replicas()
        out = np.zeros((2, 8))
        for l in range(2):
            for e in range(64):
                for g in p.gpus[l, e][p.gpus[l, e] >= 0]:
                    out[l, g] += share[l, e]
        return out.max(axis=1)

    assert (max_gpu_load(more) < max_gpu_load(plain)).all()
    validate_placement(more, num_layers=2, num_experts=64, num_ranks=8,
                       capacity=Capacity(slots_per_gpu=10, expert_bytes_per_gpu=1, memory_bytes_per_gpu=20))


def test_policy_errors_are_clear():
    prob = _problem(README_WEIGHT.astype(float), 8, 4)
    with pytest.raises(ValueError, match="fill the 8 GPUs"):
        make_placement("eplb", prob, redundant_experts=3)
    with pytest.raises(ValueError, match="must divide the 12 experts"):
        make_placement("eplb", prob, num_groups=8, redundant_experts=4)
    # 5 groups on 2 nodes would fall back to the global policy, hiding that 5 groups cannot split 12 experts
    with pytest.raises(ValueError, match="num_groups=5 must divide the 12 experts"):
        make_placement("eplb", prob, num_groups=5, redundant_experts=4)
    with pytest.raises(ValueError, match="num_groups=0 must divide"):
        make_placement("eplb", prob, num_groups=0, redundant_experts=4)
    with pytest.raises(ValueError, match=r"do not fit in memory \(room for 2: .*\); lower redundant_experts to "
                                         r"at most 4$"):
        make_placement("eplb", _problem(README_WEIGHT.astype(float), 8, 4, max_slots=2), redundant_experts=12)
    make_placement("eplb", _problem(README_WEIGHT.astype(float), 8, 4, max_slots=2), redundant_experts=4)
    with pytest.raises(ValueError, match="hierarchical mode needs"):
        make_placement("eplb", prob, num_groups=3, mode="hierarchical", redundant_experts=4)
    g = make_placement("eplb", prob, num_groups=4, mode="global", redundant_experts=4)
    assert g.info["mode"] == "global"
