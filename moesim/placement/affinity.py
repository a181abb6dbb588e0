"""The ``affinity`` placement: greedy cross-layer co-location, a fast baseline for the ILP.

Layer 0 is greedy (LPT). Each later layer places its experts heaviest first onto the rank with a free
slot that received the most of the expert's tokens from the previous layer (``R[l-1, :, e]`` summed
over the experts placed on that rank), among the ranks whose load stays within ``(1 + load_slack)`` of
greedy's heaviest rank for the layer; when none qualifies, the least-loaded rank with a free slot.
So it trades at most ``load_slack`` of compute tail for co-location. Deliberately ignored: bandwidth
differences between ranks, the next layer (one forward pass), and co-activation within a layer.
"""

from __future__ import annotations

import time

import numpy as np

from moesim.errors import InputError
from moesim.placement.format import Placement
from moesim.placement.ilp import (
    check_feasible, cost_model, evaluate, layer_max_load, load_lower_bound, objective_lower_bound, solve_info,
)
from moesim.placement.policies import lpt
from moesim.placement.registry import PlacementProblem, register


def affinity_assign(problem: PlacementProblem, load_slack: float = 0.05) -> np.ndarray:
    """``assign[l, e]`` of the greedy co-location rule above."""
    if not load_slack >= 0:
        raise InputError(f"must be >= 0, got {load_slack!r}", field="load_slack")
    check_feasible(problem)
    L, E, G, s = problem.num_layers, problem.num_experts, problem.num_ranks, problem.slots_per_gpu
    R = problem.transition_counts()
    assign = np.empty((L, E), dtype=np.int64)
    assign[0] = lpt(problem.load[0], G, s)
    for l in range(1, L):
        p = problem.load[l]
        cap = layer_max_load(p, lpt(p, G, s), G) * (1 + load_slack)
        pull = np.eye(G)[assign[l - 1]].T @ R[l - 1]  # [g, e]: tokens reaching e from rank g
        bin_load, count = np.zeros(G), np.zeros(G, dtype=np.int64)
        for e in np.argsort(-p, kind="stable"):
            open_ = count < s
            fits = open_ & (bin_load + p[e] <= cap)
            if fits.any():
                score = np.where(fits, pull[:, e], -np.inf)
                g = int(np.argmax(score))  # ties: the lowest rank
            else:
                g = int(np.flatnonzero(open_)[np.argmin(bin_load[open_])])
            assign[l, e] = g
            bin_load[g] += p[e]
            count[g] += 1
    return assign


@register("affinity", pairwise=True)
def affinity(problem: PlacementProblem, *, load_slack: float = 0.05) -> Placement:
    """Greedy cross-layer co-location within ``load_slack`` of greedy's heaviest rank per layer."""
    t0 = time.perf_counter()
    assign = affinity_assign(problem, load_slack)
    cm = cost_model(problem)
    L, G, s = problem.num_layers, problem.num_ranks, problem.slots_per_gpu
    load_lb = np.array([load_lower_bound(problem.load[l], G, s) for l in range(L)])
    greedy = np.stack([lpt(problem.load[l], G, s) for l in range(L)])
    info = solve_info(problem, assign, cm, lower=objective_lower_bound(problem, cm, load_lb),
                      load_lower=float(load_lb.sum()) * cm.t_pair * cm.w_compute,
                      greedy_total=evaluate(problem, greedy, cm).total, method="greedy_colocation", solver="numpy",
                      status="heuristic", seconds=time.perf_counter() - t0)
    info["load_slack"] = load_slack
    return Placement.from_assignment(assign, problem.num_ranks, "affinity", info)
