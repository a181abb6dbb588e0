"""The ``ilp_moetuner`` placement: MoETuner's two stages as the paper describes them (arXiv 2502.06643).

Stage 1 (ILP-1), per layer: balanced clustering - binary ``x[e, c]``, every expert in one cluster, the
same number of experts per cluster (so every GPU holds the same number of experts in total over the
layers: the paper's memory constraint), minimise ``sum_c |T[c] - mean|`` with ``T[c]`` the cluster's
profiled load (absolute values through ``dev[c] >= +-(T[c] - mean)``). Solved exactly with PuLP when the
layer is small; otherwise a swap local search from LPT gives the incumbent and the bound
``sum_c |T[c] - mean| >= 2 (max_c T[c] - mean) >= 2 (LB_max - mean)`` (deviations sum to zero; LB_max from
:func:`moesim.placement.ilp.balance.load_lower_bound`) proves the gap, with the ILP run only where it is open.

Stage 2 (ILP-2), per layer in order: map layer l's clusters one-to-one onto GPUs, minimising the heaviest
GPU-pair traffic divided by that pair's bandwidth, the traffic being the layer-(l-1)-to-l transitions
``R`` aggregated by cluster. With layer l-1 already placed, pair (g', g) carries ``T[cluster at g', c]``
when cluster c sits on g, so the objective is ``max over assigned (c, g)`` of
``w[c, g] = max_{g' != g} T[., c] x bytes x s[g', g]``: a linear bottleneck assignment, solved exactly by
bisection on the threshold with a perfect-matching test (Hopcroft-Karp), ties broken by the least total
cost (Hungarian). Layer 0 keeps cluster c on GPU c.

``stage1_gap`` is ``(sum of deviations - proven bound) / total load``: the share of tokens that could
still be placed better. (Relative to the deviation itself it would be meaningless: a perfect balance
has deviation 0.) The ILP runs on a layer only when this share exceeds ``gap``.

Deliberately ignored: the paper allows per-layer cluster sizes to differ as long as totals over layers
are equal; here every layer has equal sizes (``slots_per_gpu``), which satisfies the same memory
constraint and keeps each layer's expert count per GPU equal.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import networkx as nx
import numpy as np
import pulp

from moesim.placement.format import Placement
from moesim.placement.ilp import (
    check_feasible, cost_model, evaluate, improve_layer, linear_assignment, load_lower_bound, objective_lower_bound,
    solve_info,
)
from moesim.placement.ilp.checks import check_budget
from moesim.placement.ilp.search import Move, descend
from moesim.placement.ilp_solver import new_var, resolve_solver, solve
from moesim.placement.policies import lpt
from moesim.placement.registry import PlacementProblem, register

_EXACT_VARS = 256  # experts x clusters up to which stage 1 may run its ILP (where the gap is open)
_NODE_LIMIT = 200  # branch-and-bound nodes per layer: deterministic work, not wall time


def deviation(load_row: np.ndarray, a: np.ndarray, G: int) -> float:
    """Stage 1's objective: sum over clusters of |load - mean|."""
    t = np.bincount(a, weights=load_row, minlength=G)
    return float(np.abs(t - t.mean()).sum())


def deviation_search(load_row: np.ndarray, a: np.ndarray, G: int, max_iter: int = 5000) -> np.ndarray:
    """Best-improvement swaps of two experts between clusters while sum |T - mean| falls."""
    p = np.asarray(load_row, dtype=float)
    mu = np.bincount(a, weights=p, minlength=G).mean()
    return descend(p, a, G, partial(_deviation_swap, mu=mu), max_iter)


def _deviation_swap(p: np.ndarray, a: np.ndarray, t: np.ndarray, counts: np.ndarray, *, mu: float) -> Move | None:
    """The swap of two experts between clusters that lowers sum |T - mean| most, if any does."""
    d = p[:, None] - p[None, :]  # i leaves a[i], j leaves a[j]
    ti, tj = t[a][:, None], t[a][None, :]
    gain = np.abs(ti - d - mu) + np.abs(tj + d - mu) - np.abs(ti - mu) - np.abs(tj - mu)
    gain[a[:, None] == a[None, :]] = np.inf
    k = int(np.argmin(gain))
    if not gain.flat[k] < -1e-9 * max(mu, 1.0):
        return None
    i, j = divmod(k, p.size)
    return ("swap", i, j)


def stage1_ilp(load_row: np.ndarray, G: int, slots: int, *, solver: str, time_limit_s: float, gap: float,
               incumbent: np.ndarray) -> tuple[np.ndarray, float]:
    """ILP-1 for one layer: (best assignment, proven lower bound on sum |T - mean|)."""
    p = np.asarray(load_row, dtype=float)
    E = p.size
    mu = p.sum() / G
    m = pulp.LpProblem("moetuner_stage1", pulp.LpMinimize)
    x = {(e, c): new_var(m, f"x_{e}_{c}", 0, 1, cat="Binary") for e in range(E) for c in range(G)}
    dev = [new_var(m, f"dev_{c}", 0) for c in range(G)]
    m += pulp.lpSum(dev)
    for e in range(E):
        m += pulp.lpSum(x[e, c] for c in range(G)) == 1
    exact = E == slots * G
    for c in range(G):
        size = pulp.lpSum(x[e, c] for e in range(E))
        m += (size == slots) if exact else (size <= slots)
        load = pulp.lpSum(float(p[e]) * x[e, c] for e in range(E))
        m += dev[c] >= load - mu
        m += dev[c] >= mu - load
    order = np.argsort(-p, kind="stable")
    for r, e in enumerate(order):  # clusters are interchangeable: the r-th heaviest expert opens cluster <= r
        for c in range(r + 1, G):
            m += x[int(e), c] == 0
    inc = deviation(p, incumbent, G)
    for (e, c), var in x.items():
        var.setInitialValue(1 if incumbent[e] == c else 0)
    res = solve(m, solver=solver, time_limit_s=time_limit_s, gap=gap, incumbent=inc * (1 + 1e-9) + 1e-9,
                warm_start=True, node_limit=_NODE_LIMIT)
    best = incumbent
    if res.objective is not None:
        sol = np.array([max(range(G), key=lambda c: x[e, c].value() or 0) for e in range(E)])
        if np.bincount(sol, minlength=G).max() <= slots and deviation(p, sol, G) < inc:
            best = sol
    return best, res.bound


def bottleneck_assignment(w: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """``col[row]`` minimising the largest ``w[row, col]`` used, then the sum of ``tiebreak``."""
    n = w.shape[0]
    values = np.unique(w)
    lo, hi = 0, values.size - 1
    while lo < hi:  # smallest threshold with a perfect matching
        mid = (lo + hi) // 2
        rows, cols = np.nonzero(w <= values[mid])
        g: nx.Graph[int] = nx.Graph()
        g.add_nodes_from(range(2 * n))
        g.add_edges_from(zip(rows.tolist(), (cols + n).tolist()))
        match = nx.bipartite.hopcroft_karp_matching(g, top_nodes=range(n))
        if sum(1 for k in match if k < n) == n:
            hi = mid
        else:
            lo = mid + 1
    allowed = w <= values[lo]
    big = (np.abs(tiebreak).sum() + 1.0) * 2
    return linear_assignment(np.where(allowed, tiebreak, big))


def moetuner(problem: PlacementProblem, *, solver: str = "auto", time_limit_s: float = 60.0,
             gap: float = 0.01) -> tuple[np.ndarray, dict[str, Any]]:
    """Both stages; returns ``(assign, info)``."""
    t0 = time.perf_counter()
    check_budget(time_limit_s, gap)
    check_feasible(problem)
    name = resolve_solver(solver)
    L, E, G, s = problem.num_layers, problem.num_experts, problem.num_ranks, problem.slots_per_gpu
    stage1_deadline = t0 + 0.8 * time_limit_s
    clusters = np.empty((L, E), dtype=np.int64)
    ub1, lb1, load_lb = np.zeros(L), np.zeros(L), np.zeros(L)
    for layer in range(L):
        p = problem.load[layer]
        a = deviation_search(p, improve_layer(p, lpt(p, G, s), G, s), G)
        mu = p.sum() / G
        load_lb[layer] = load_lower_bound(p, G, s)
        lb = 2 * max(0.0, load_lb[layer] - mu)
        ub = deviation(p, a, G)
        if ub - lb > gap * p.sum() and E * G <= _EXACT_VARS and time.perf_counter() < stage1_deadline:
            left = max(1.0, (stage1_deadline - time.perf_counter()) / max(L - layer, 1))
            a, bound = stage1_ilp(p, G, s, solver=name, time_limit_s=left, gap=gap, incumbent=a)
            ub = deviation(p, a, G)
            lb = max(lb, bound) if np.isfinite(bound) else lb
        clusters[layer], ub1[layer], lb1[layer] = a, ub, min(lb, ub)
    # stage 2: clusters onto GPUs, layer by layer
    cm = cost_model(problem)  # bandwidths for stage 2; the reported objective is the ilp's, same weights
    R = problem.transition_counts()
    assign = clusters.copy()
    tails = np.zeros(max(L - 1, 0))
    for layer in range(1, L):
        onehot_prev = np.eye(G)[assign[layer - 1]]  # [E, G]: rank of each layer l-1 expert
        onehot_c = np.eye(G)[clusters[layer]]  # [E, G]: cluster of each layer-l expert
        T = onehot_prev.T @ R[layer - 1] @ onehot_c * cm.bytes  # [g', c]: bytes from rank g' to cluster c
        pair = T[:, :, None] * cm.s[:, None, :]  # [g', c, g] seconds if c sits on g
        w = pair.max(axis=0)  # [c, g]: heaviest pair into g (s is 0 on the diagonal)
        col = bottleneck_assignment(w, pair.sum(axis=0))
        assign[layer] = col[clusters[layer]]
        tails[layer - 1] = float(w[np.arange(G), col].max())
    greedy = np.stack([lpt(problem.load[layer], G, s) for layer in range(L)])
    info = solve_info(problem, assign, cm, lower=objective_lower_bound(problem, cm, load_lb),
                      load_lower=float(load_lb.sum()) * cm.t_pair * cm.w_compute,
                      greedy_total=evaluate(problem, greedy, cm).total, method="two_stage", solver=name,
                      status="two_stage", seconds=time.perf_counter() - t0)
    info.update({
        "stage1_objective": float(ub1.sum()), "stage1_lower_bound": float(lb1.sum()),
        "stage1_gap": float((ub1.sum() - lb1.sum()) / problem.load.sum()) if problem.load.sum() > 0 else 0.0,
        "stage2_pair_tail_s": float(tails.sum()),
    })
    return assign, info


@register("ilp_moetuner", pairwise=True)
def ilp_moetuner(problem: PlacementProblem, *, solver: str = "auto", time_limit_s: float = 60.0,
                 gap: float = 0.01) -> Placement:
    """MoETuner's two stages: balanced clusters per layer, then bandwidth-aware cluster-to-GPU mapping."""
    assign, info = moetuner(problem, solver=solver, time_limit_s=time_limit_s, gap=gap)
    return Placement.from_assignment(assign, problem.num_ranks, "ilp_moetuner", info)
