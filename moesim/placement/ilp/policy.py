"""The ``ilp`` policy: chooses the method (exact chain DP, decomposition, joint ILP) and reports its gap.

Runs the stages of the other modules in order under one time budget and never returns worse than greedy
on the same objective. See docs/ilp.md for the method and what it ignores.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.placement.format import Placement
from moesim.placement.ilp.align import align_layers
from moesim.placement.ilp.balance import balance_layer, load_lower_bound
from moesim.placement.ilp.chain_dp import chain_dp, use_chain_dp
from moesim.placement.ilp.checks import check_feasible, check_options
from moesim.placement.ilp.costs import CostModel, cost_model, evaluate, objective_lower_bound, solve_info
from moesim.placement.ilp.joint import check_joint_size, solve_joint
from moesim.placement.ilp.nodes import place_nodes_first
from moesim.placement.ilp.replicas import optimise_replicas
from moesim.placement.ilp.swaps import affinity_swaps
from moesim.placement.ilp_solver import resolve_solver
from moesim.placement.policies import lpt
from moesim.placement.registry import PlacementProblem, register
from moesim.placement.replication import placement_from_mask


def optimise(problem: PlacementProblem, *, w_compute: float = 1.0, w_comm: float | None = None,
             w_affinity: float | None = None, w_dispatch: float | None = None, solver: str = "auto",
             time_limit_s: float = 60.0, gap: float = 0.01, method: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """The ``ilp`` policy as a function returning ``(assign, info)``; weights as in :func:`cost_model`."""
    t0 = time.perf_counter()
    check_options(method, time_limit_s, gap)
    check_feasible(problem)
    solver_name = resolve_solver(solver)
    cm = cost_model(problem, w_compute, w_comm, w_affinity, w_dispatch)
    deadline = t0 + time_limit_s
    L, G, s = problem.num_layers, problem.num_ranks, problem.slots_per_gpu
    greedy = np.stack([lpt(problem.load[layer], G, s) for layer in range(L)])
    greedy_total = evaluate(problem, greedy, cm).total
    load_lb = np.array([load_lower_bound(problem.load[layer], G, s) for layer in range(L)])
    if use_chain_dp(problem, cm, method):
        return _exact_dp(problem, cm, load_lb, greedy_total, t0)
    assign, used, searched = _decompose(problem, cm, load_lb, solver=solver_name, gap=gap, t0=t0,
                                        time_limit_s=time_limit_s)
    lower = objective_lower_bound(problem, cm, load_lb)
    status = "heuristic"
    if method == "joint":
        assign, lower, status, used = _joint(problem, cm, assign, lower, solver=solver_name, gap=gap,
                                             deadline=deadline)
    if greedy_total < evaluate(problem, assign, cm).total:
        assign, used = greedy, f"{used}+greedy"
    info = solve_info(problem, assign, cm, lower=lower, load_lower=float(load_lb.sum()) * cm.t_pair * cm.w_compute,
                      greedy_total=greedy_total, method=used, solver=solver_name, status=status,
                      seconds=time.perf_counter() - t0)
    if searched is not None:
        info["layers_nodes_first"] = searched
    if info["gap"] <= gap + 1e-12:
        info["status"] = "optimal" if info["gap"] <= 1e-9 else "within_gap"
    elif status == "heuristic":
        info["status"] = "gap_open" if searched in (None, L) else "time_limit"
    return assign, info


def _exact_dp(problem: PlacementProblem, cm: CostModel, load_lb: np.ndarray, greedy_total: float,
              t0: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The chain DP's optimum with its info: proven optimal, so the bound is the objective itself."""
    assign = chain_dp(problem, cm)
    total = evaluate(problem, assign, cm).total
    load_lower = float(load_lb.sum()) * cm.t_pair * cm.w_compute
    if cm.w_comm == 0 and cm.w_affinity == 0:  # the load term is the whole objective: the DP proved it too
        load_lower = total
    info = solve_info(problem, assign, cm, lower=total, load_lower=load_lower,
                      greedy_total=greedy_total, method="exact_dp", solver="numpy", status="optimal",
                      seconds=time.perf_counter() - t0)
    return assign, info


def _decompose(problem: PlacementProblem, cm: CostModel, load_lb: np.ndarray, *, solver: str, gap: float,
               t0: float, time_limit_s: float) -> tuple[np.ndarray, str, int | None]:
    """Balance each layer (raising ``load_lb`` in place to each layer's proven bound), nodes first when the
    dispatch term is on, align layers, trade experts for affinity: ``(assign, method, layers searched by
    nodes first or None)``."""
    L, G, s = problem.num_layers, problem.num_ranks, problem.slots_per_gpu
    balanced = np.empty((L, problem.num_experts), dtype=np.int64)
    for layer in range(L):
        a, _, lb = balance_layer(problem.load[layer], G, s, gap=gap * 0.5, solver=solver,
                                 deadline=t0 + 0.5 * time_limit_s)
        balanced[layer] = a
        load_lb[layer] = max(load_lb[layer], lb)
    used, searched = "decompose", None
    if cm.w_dispatch:  # nodes first: group what tokens pick together on few nodes, then balance inside
        balanced, searched = place_nodes_first(problem, balanced, cm, deadline=t0 + 0.7 * time_limit_s)
        used = "nodes_first"
    # one forward sweep on large clusters: the Hungarian is O(ranks^3) and later sweeps gain little there
    assign = align_layers(problem, balanced, cm, sweeps=2 if G <= 16 else 1, deadline=t0 + 0.7 * time_limit_s)
    assign = affinity_swaps(problem, assign, cm, deadline=t0 + 0.9 * time_limit_s)
    if (cm.w_dispatch and assign is not balanced
            and evaluate(problem, assign, cm).total > evaluate(problem, balanced, cm).total):
        assign = balanced  # the traffic stages do not see the dispatch term: keep their result only if it helps
    return assign, used, searched


def _joint(problem: PlacementProblem, cm: CostModel, assign: np.ndarray, lower: float, *, solver: str, gap: float,
           deadline: float) -> tuple[np.ndarray, float, str, str]:
    """``method: joint``: the monolithic ILP from the decomposed answer, ``(assign, lower bound, status,
    method)``; with the dispatch term (which the model lacks) its answer is kept only if it is better."""
    check_joint_size(problem)
    before = assign
    assign, bound, status = solve_joint(problem, cm, assign, solver=solver, gap=gap,
                                        time_limit_s=max(0.05, deadline - time.perf_counter()))
    lower = max(lower, bound) if np.isfinite(bound) else lower  # also bounds the objective with dispatch
    used = "joint"
    if cm.w_dispatch:  # the joint model has no dispatch term: its optimum proves nothing about ours
        status = "time_limit" if status == "time_limit" else "heuristic"
        if evaluate(problem, before, cm).total < evaluate(problem, assign, cm).total:
            assign, used = before, "nodes_first"
    return assign, lower, status, used


@register("ilp", replicas="redundant_experts", pairwise=True)
def ilp(problem: PlacementProblem, *, w_compute: float = 1.0, w_comm: float | None = None,
        w_affinity: float | None = None, w_dispatch: float | None = None, solver: str = "auto",
        time_limit_s: float = 60.0, gap: float = 0.01, method: str = "auto", redundant_experts: int = 0) -> Placement:
    """MoETuner's joint objective (compute tail, communication tail, cross-layer traffic) with a proven gap.

    With ``redundant_experts`` N > 0: N extra copies, their counts and every copy's GPU chosen together
    per layer to minimise the heaviest GPU (load term only; :func:`optimise_replicas`).
    """
    if redundant_experts:
        for name, w in (("w_comm", w_comm), ("w_affinity", w_affinity), ("w_dispatch", w_dispatch)):
            if w:
                raise InputError("with redundant_experts the ilp optimises the load term only; leave it unset or 0",
                                 field=name)
        held, info = optimise_replicas(problem, redundant_experts, w_compute=w_compute, solver=solver,
                                       time_limit_s=time_limit_s, gap=gap, method=method)
        return placement_from_mask(held, "ilp", info)
    assign, info = optimise(problem, w_compute=w_compute, w_comm=w_comm, w_affinity=w_affinity,
                            w_dispatch=w_dispatch, solver=solver, time_limit_s=time_limit_s, gap=gap, method=method)
    return Placement.from_assignment(assign, problem.num_ranks, "ilp", info)
