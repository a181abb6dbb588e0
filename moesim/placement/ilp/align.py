"""Alignment of consecutive layers (docs/ilp.md, "How it scales", alignment): relabel a layer's ranks.

Each layer's ranks are permuted to line up with its neighbours, an assignment problem (Hungarian, exact)
on the linear mean-send cost, kept only where the exact traffic terms fall. Moves no expert between
ranks, so the load term is untouched; the dispatch term is not seen.
"""

from __future__ import annotations

import math
import time

import numpy as np

from moesim.placement.ilp.costs import CostModel, pair_cost
from moesim.placement.registry import PlacementProblem


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square matrix (Hungarian, shortest augmenting paths).

    Returns ``col[row]``. O(n^3) with the inner loop in numpy; n is a rank count (<= a few hundred).
    """
    c = np.asarray(cost, dtype=float)
    n = c.shape[0]
    a = np.zeros((n + 1, n + 1))
    a[1:, 1:] = c
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = a[i0, 1:] - u[i0] - v[1:]
            free = ~used[1:]
            upd = free & (cur < minv[1:])
            minv[1:][upd] = cur[upd]
            way[1:][upd] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[p[1:] - 1] = np.arange(n)
    return col


def _align_cost(problem: PlacementProblem, assign: np.ndarray, layer: int, cm: CostModel) -> np.ndarray:
    """[c, g]: linear (mean-send) cost of moving layer l's rank-c cluster onto rank g, neighbours fixed."""
    G = problem.num_ranks
    R = problem.transition_counts()
    onehot = np.eye(G)[assign[layer]]  # [E, G]: expert -> current label c
    cost = np.zeros((G, G))
    if layer > 0:
        prev = np.eye(G)[assign[layer - 1]]
        T = prev.T @ R[layer - 1] @ onehot  # [g', c]: tokens from rank g' (layer l-1) to cluster c
        cost += T.T @ cm.s  # [c, g]
    if layer < problem.num_layers - 1:
        nxt = np.eye(G)[assign[layer + 1]]
        T = onehot.T @ R[layer] @ nxt  # [c, g']
        cost += T @ cm.s.T
    return cost * cm.bytes


def align_layers(problem: PlacementProblem, assign: np.ndarray, cm: CostModel, *, sweeps: int = 2,
                 deadline: float = math.inf) -> np.ndarray:
    """Relabel each layer's ranks to cut cross-layer traffic; never raises the exact objective."""
    L = problem.num_layers
    if L < 2 or (cm.w_comm == 0 and cm.w_affinity == 0):
        return assign
    out = assign.copy()
    R = problem.transition_counts()
    if not R.any():
        return out
    order = list(range(1, L)) + [layer for _ in range(sweeps - 1) for layer in (*range(L - 2, -1, -1), *range(1, L))]
    for layer in order:
        if time.perf_counter() > deadline:
            break
        col = linear_assignment(_align_cost(problem, out, layer, cm))
        trial = col[out[layer]]
        if np.array_equal(trial, out[layer]):
            continue
        before = sum(pair_cost(R[k], out[k], out[k + 1], cm) for k in (layer - 1, layer) if 0 <= k < L - 1)
        new = out.copy()
        new[layer] = trial
        after = sum(pair_cost(R[k], new[k], new[k + 1], cm) for k in (layer - 1, layer) if 0 <= k < L - 1)
        if after < before:
            out = new
    return out
