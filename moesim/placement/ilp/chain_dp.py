"""Exact chain DP (docs/ilp.md, "How it scales", 1): the optimum of small instances, gap 0.

The objective is a chain over layers and invariant under relabelling ranks within nodes and nodes, so a
shortest path over symmetry-reduced layer states is the joint ILP's optimum. Needs every rank full
(experts = ranks x slots), equal nodes and two-tier costs; ignores the dispatch term (not a chain).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from moesim.errors import InputError
from moesim.placement.ilp.costs import CostModel
from moesim.placement.registry import PlacementProblem

_DP_LIMIT = 4_000_000  # states x next states x relabellings evaluated by the exact chain DP
_DP_CELLS = 10_000_000  # states x relabellings x experts x ranks held by the DP per layer


def _set_partitions(items: tuple[int, ...], size: int) -> list[list[tuple[int, ...]]]:
    """Partitions of ``items`` into blocks of ``size``, canonical (blocks ordered by smallest item)."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for comb in itertools.combinations(rest, size - 1):
        block = (first, *comb)
        remaining = tuple(i for i in rest if i not in comb)
        for tail in _set_partitions(remaining, size):
            out.append([block, *tail])
    return out


def _count_partitions(n: int, size: int) -> int:
    return math.factorial(n) // (math.factorial(size) ** (n // size) * math.factorial(n // size)) if n else 1


def chain_dp_size(problem: PlacementProblem) -> int | None:
    """Work of the exact DP (states^2 x relabellings), or None when it does not apply."""
    E, G, gpn, s = problem.num_experts, problem.num_ranks, problem.gpus_per_node, problem.slots_per_gpu
    if E != s * G or G % gpn:
        return None
    N = G // gpn
    states = _count_partitions(E, s * gpn) * _count_partitions(s * gpn, s) ** N
    relabel = math.factorial(N) * math.factorial(gpn) ** N
    if states * relabel * E * G > _DP_CELLS:  # the labelled next placements would not fit in memory
        return None
    return states * states * relabel


def use_chain_dp(problem: PlacementProblem, cm: CostModel, method: str) -> bool:
    """Whether ``method`` runs the exact DP here (``exact``: always, and an error where it cannot; ``auto``:
    where it is small enough); it needs a two-tier cost and no dispatch term."""
    dp = chain_dp_size(problem)
    use_dp = dp is not None and cm.two_tier is not None and cm.w_dispatch == 0 and (
        method == "exact" or (method == "auto" and dp <= _DP_LIMIT))
    if method == "exact" and not use_dp:
        raise InputError("method exact needs experts = ranks x slots, two-tier costs, no dispatch term and a small "
                         f"instance (states^2 x relabellings <= {_DP_LIMIT}, states x relabellings x experts x ranks "
                         f"<= {_DP_CELLS}); use auto or decompose", field="method")
    return use_dp


def _dp_states(E: int, G: int, gpn: int, s: int) -> np.ndarray:
    """[S, E] rank of each expert, one row per placement up to relabelling ranks in nodes and nodes."""
    N = G // gpn
    rows = []
    for nodes in _set_partitions(tuple(range(E)), s * gpn):
        inner = [_set_partitions(grp, s) for grp in nodes]
        for combo in itertools.product(*inner):
            row = np.empty(E, dtype=np.int64)
            for n, blocks in enumerate(combo):
                for j, block in enumerate(blocks):
                    row[list(block)] = n * gpn + j
            rows.append(row)
    assert N == len(nodes)
    return np.array(rows)


def _relabellings(G: int, gpn: int) -> np.ndarray:
    """[A, G] every rank permutation that keeps nodes together."""
    N = G // gpn
    local = np.array(list(itertools.permutations(range(gpn))), dtype=np.int64)  # [gpn!, gpn]
    nodes = np.array(list(itertools.permutations(range(N))), dtype=np.int64)  # [N!, N]
    out = []
    for choice in itertools.product(range(len(local)), repeat=N):
        within = np.concatenate([local[c] for c in choice])  # local rank of each rank after relabelling
        node_of = np.repeat(np.arange(N), gpn)
        out.append(nodes[:, node_of] * gpn + within[None, :])
    return np.concatenate(out)


def chain_dp(problem: PlacementProblem, cm: CostModel) -> np.ndarray:
    """The optimal ``assign[l, e]`` by shortest path over symmetry-reduced layer states (two-tier costs)."""
    E, G, gpn, s, L = (problem.num_experts, problem.num_ranks, problem.gpus_per_node, problem.slots_per_gpu,
                       problem.num_layers)
    states = _dp_states(E, G, gpn, s)  # [S, E]
    perms = _relabellings(G, gpn)  # [A, G]
    S, A = len(states), len(perms)
    onehot = np.eye(G)[states]  # [S, E, G]
    loads = np.einsum("le,seg->lsg", problem.load, onehot).max(axis=2) * cm.t_pair * cm.w_compute  # [L, S]
    nxt = perms[:, states].transpose(1, 0, 2).reshape(S * A, E)  # labelled next placements, index q*A + a
    R = problem.transition_counts()
    assert cm.two_tier is not None
    s_in, s_out = cm.two_tier
    N = G // gpn
    nxt_onehot = np.eye(G)[nxt.T].transpose(0, 2, 1).reshape(E, -1)  # [f, G*B]: rank of f in each placement
    order = np.argsort(states, axis=1, kind="stable")  # experts of each state grouped by rank, s per rank
    cols = np.arange(E)
    value = loads[0].copy()
    back = np.zeros((L, S, 2), dtype=np.int64)
    for layer in range(L - 1):
        # Two-tier cost: e on rank g pays s_in for each pick of f off g, and s_out - s_in more off g's node.
        ry = (R[layer] @ nxt_onehot).reshape(E, G, -1)  # [E, G, B]: e's picks landing on each rank
        out = R[layer].sum(axis=1)[None, :, None]  # [1, E, 1]: e's picks in all
        per = s_in * (out - ry[cols, states])  # [S, E, B]: e's send seconds (per byte) in each pair
        if N > 1 and s_out != s_in:
            ry_node = ry.reshape(E, N, gpn, -1).sum(axis=2)  # [E, N, B]
            per += (s_out - s_in) * (out - ry_node[cols, states // gpn])
        per *= cm.bytes
        trans = cm.w_affinity / G * per.sum(axis=1)  # mean over ranks of the send time, [S, S*A]
        if cm.w_comm:
            grouped = per[np.arange(S)[:, None], order].reshape(S, G, E // G, -1)
            trans += cm.w_comm * grouped.sum(axis=2).max(axis=1)  # busiest rank's send
        total = value[:, None] + trans
        best = total.argmin(axis=0)
        bv = total[best, np.arange(S * A)].reshape(S, A)
        ba = bv.argmin(axis=1)
        value = bv[np.arange(S), ba] + loads[layer + 1]
        back[layer + 1, :, 0] = best.reshape(S, A)[np.arange(S), ba]
        back[layer + 1, :, 1] = ba
    q = int(np.argmin(value))
    chain = [(q, 0)]
    for layer in range(L - 1, 0, -1):
        i, a = back[layer, q]
        chain.append((int(i), int(a)))
        q = int(i)
    chain.reverse()  # chain[l] = (state at l, relabelling from l's frame to l+1's)
    assign = np.empty((L, E), dtype=np.int64)
    phi = np.arange(G)
    for layer in range(L):
        st, _ = chain[layer]
        assign[layer] = phi[states[st]]
        if layer < L - 1:
            phi = phi[perms[chain[layer][1]]]
    return assign
