"""Per-layer load balance (docs/ilp.md, "How it scales", 2): min-max load of one layer with its proof.

LPT seeds a swap/move search on the heaviest rank; a pigeonhole lower bound proves the gap; where it is
open, a small integer program re-packs the heaviest rank with the lightest under a branch-and-bound node
budget (deterministic work). Models the compute tail only: no traffic, no other layers.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import pulp

from moesim.placement.ilp.costs import layer_max_load
from moesim.placement.ilp.search import Move, descend
from moesim.placement.ilp_solver import new_var, solve
from moesim.placement.policies import lpt

_NODE_LIMIT = 200  # branch-and-bound nodes per neighbourhood ILP: deterministic work, not wall time


def load_lower_bound(load_row: np.ndarray, G: int, slots: int) -> float:
    """A proven lower bound on the heaviest rank's load with at most ``slots`` experts per rank."""
    q = np.sort(np.asarray(load_row, dtype=float))[::-1]
    E = q.size
    lb = max(q.sum() / G, q[0] if E else 0.0)
    k = 1
    while k * G < E:  # the top kG+1 experts put k+1 of them on one rank
        lb = max(lb, q[k * G - k : k * G + 1].sum())
        k += 1
    if E == slots * G and slots > 1:  # every rank holds exactly `slots`: the heaviest expert's rank too
        lb = max(lb, q[0] + q[E - (slots - 1):].sum())
    return float(lb)


def _heaviest_rank_move(p: np.ndarray, a: np.ndarray, bl: np.ndarray, cnt: np.ndarray, *, slots: int) -> Move | None:
    """The swap or move of an expert off the heaviest rank that lowers the pair's maximum most (strictly)."""
    m = int(np.argmax(bl))
    top = bl[m]
    mine = np.flatnonzero(a == m)
    others = np.flatnonzero(a != m)
    best, move = top, None
    if others.size:  # swaps: i (on m) <-> j (elsewhere), delta = p_i - p_j > 0
        delta = p[mine][:, None] - p[others][None, :]
        new = np.maximum(top - delta, bl[a[others]][None, :] + delta)
        new = np.where(delta > 1e-12, new, np.inf)
        k = int(np.argmin(new))
        if new.flat[k] < best - 1e-9 * max(top, 1.0):
            best, move = new.flat[k], ("swap", mine[k // others.size], others[k % others.size])
    free = np.flatnonzero(cnt < slots)
    free = free[free != m]
    if free.size:  # moves: i (on m) -> a rank with a free slot
        new = np.maximum(top - p[mine][:, None], bl[free][None, :] + p[mine][:, None])
        k = int(np.argmin(new))
        if new.flat[k] < best - 1e-9 * max(top, 1.0):
            best, move = new.flat[k], ("move", mine[k // free.size], free[k % free.size])
    return move


def improve_layer(load_row: np.ndarray, a: np.ndarray, G: int, slots: int, max_iter: int = 10_000) -> np.ndarray:
    """Swap and move experts off the heaviest rank while that strictly lowers the pair's maximum."""
    return descend(load_row, a, G, partial(_heaviest_rank_move, slots=slots), max_iter)


def _pack_ilp(p: np.ndarray, bins: int, slots: np.ndarray, *, solver: str, time_limit_s: float, gap: float,
              incumbent: float) -> tuple[np.ndarray | None, float, str]:
    """Min-max packing of items ``p`` into ``bins`` with ``slots[b]`` items each (exact counts)."""
    n = p.size
    order = np.argsort(-p, kind="stable")
    m = pulp.LpProblem("pack", pulp.LpMinimize)
    x = {(i, b): new_var(m, f"x_{i}_{b}", 0, 1, cat="Binary") for i in range(n) for b in range(bins)}
    z = new_var(m, "z", 0)
    m += z
    for i in range(n):
        m += pulp.lpSum(x[i, b] for b in range(bins)) == 1
    for b in range(bins):
        m += pulp.lpSum(x[i, b] for i in range(n)) == int(slots[b])
        m += z >= pulp.lpSum(float(p[i]) * x[i, b] for i in range(n))
    if np.all(slots == slots[0]):  # symmetry: interchangeable bins; the r-th heaviest item opens bin <= r
        for r, i in enumerate(order):
            for b in range(r + 1, bins):
                m += x[int(i), b] == 0
    res = solve(m, solver=solver, time_limit_s=time_limit_s, gap=gap, incumbent=incumbent, node_limit=_NODE_LIMIT)
    if res.objective is None:
        return None, res.bound, res.status
    out = np.array([max(range(bins), key=lambda b: x[i, b].value() or 0) for i in range(n)])
    return out, res.bound, res.status


def balance_layer(load_row: np.ndarray, G: int, slots: int, *, gap: float, solver: str, deadline: float,
                  rounds: int = 3, hood_ranks: int = 4) -> tuple[np.ndarray, float, float]:
    """Near min-max placement of one layer: (assignment, its max load, proven lower bound).

    Where swaps leave the gap open, an ILP re-packs the heaviest rank with the ``hood_ranks - 1``
    lightest (min-max packing ILPs have a useless LP bound, so neighbourhoods stay small; a layer of at
    most ``hood_ranks`` ranks is solved whole, and then its bound is the layer's).
    """
    p = np.asarray(load_row, dtype=float)
    a = improve_layer(p, lpt(p, G, slots), G, slots)
    ub = layer_max_load(p, a, G)
    lb = load_lower_bound(p, G, slots)
    nb = min(G, hood_ranks)  # neighbourhood: the heaviest rank and the lightest others
    for _ in range(rounds):
        if ub - lb <= gap * ub or time.perf_counter() > deadline or G < 2:
            break
        bl = np.bincount(a, weights=p, minlength=G)
        ranks = np.argsort(bl, kind="stable")
        hood = np.unique(np.concatenate([ranks[-1:], ranks[: nb - 1]]))
        items = np.flatnonzero(np.isin(a, hood))
        counts = np.bincount(a[items], minlength=G)[hood]
        sub, sub_lb, _ = _pack_ilp(p[items], hood.size, counts, solver=solver, gap=gap * 0.5,
                                   time_limit_s=max(1.0, min(30.0, deadline - time.perf_counter())),
                                   incumbent=float(bl[hood].max()))
        if hood.size == G and p.size == G * slots:  # the whole layer, every rank full: its bound is global
            lb = max(lb, sub_lb)
        if sub is None:  # nothing better than the incumbent in this neighbourhood
            break
        trial = a.copy()
        trial[items] = hood[sub]
        trial = improve_layer(p, trial, G, slots)
        new = layer_max_load(p, trial, G)
        if new >= ub - 1e-9 * ub:
            break
        a, ub = trial, new
    return a, ub, min(lb, ub)
