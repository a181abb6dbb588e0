"""The monolithic joint ILP (docs/ilp.md, "Linearisation"; ``method: joint``), in PuLP.

Binaries ``x[l, e, g]``, the communication products linearised exactly for two-tier costs, memory as a
hard constraint. For small instances only (it does not scale); ignores the dispatch term.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pulp

from moesim.errors import InputError
from moesim.placement.ilp.costs import CostModel, evaluate
from moesim.placement.ilp_solver import new_var, solve
from moesim.placement.registry import PlacementProblem

_JOINT_LIMIT = 200_000  # variables of the monolithic joint ILP (method: joint)


def joint_model(problem: PlacementProblem, cm: CostModel, layers: range | None = None,
                fixed: dict[int, np.ndarray] | None = None) -> tuple[pulp.LpProblem, dict[tuple[int, int, int], Any]]:
    """The monolithic MoETuner-style ILP (docs/ilp.md, "Linearisation") over ``layers``; ``fixed`` pins
    some layers.

    Needs a two-tier cost (``CostModel.two_tier``). Returns the model and its ``x[l, e, g]`` binaries.
    """
    tiers = cm.two_tier
    if tiers is None:
        raise InputError("the joint ILP needs same-node and cross-node costs that are uniform per tier",
                         field="rank_s_per_byte")
    E, G = problem.num_experts, problem.num_ranks
    N = -(-G // problem.gpus_per_node)
    layers = layers if layers is not None else range(problem.num_layers)
    Ls = list(layers)
    m = pulp.LpProblem("moetuner_joint", pulp.LpMinimize)
    x = {(layer, e, g): new_var(m, f"x_{layer}_{e}_{g}", 0, 1, cat="Binary")
         for layer in Ls for e in range(E) for g in range(G)}
    objective = [_add_layer_rows(m, x, problem, cm, layer, fixed) for layer in Ls]
    if problem.memory_slots is not None:
        for g in range(G):
            m += pulp.lpSum(x[layer, e, g] for layer in Ls for e in range(E)) <= problem.memory_slots, f"memory_{g}"
    if cm.w_comm != 0 or cm.w_affinity != 0:
        objective += [_add_send_rows(m, x, problem, cm, layer, tiers) for layer in Ls[:-1]]
    if not fixed or Ls[0] not in fixed:  # symmetry: ranks are interchangeable, so expert 0 starts on rank 0
        m += x[Ls[0], 0, 0] == 1, "symmetry"
        if N == 1:
            for e in range(E):
                for g in range(e + 1, G):
                    m += x[Ls[0], e, g] == 0, f"symmetry_{e}_{g}"
    m += pulp.lpSum(objective)
    return m, x


def _add_layer_rows(m: pulp.LpProblem, x: dict[tuple[int, int, int], Any], problem: PlacementProblem,
                    cm: CostModel, layer: int, fixed: dict[int, np.ndarray] | None) -> Any:
    """Layer l's placement rows (one rank per expert, slots per rank, pinned experts) and its compute-tail
    variable; returns the layer's compute term of the objective."""
    E, G, slots = problem.num_experts, problem.num_ranks, problem.slots_per_gpu
    C = new_var(m, f"C_{layer}", 0)
    for e in range(E):
        m += pulp.lpSum(x[layer, e, g] for g in range(G)) == 1, f"one_rank_{layer}_{e}"
    for g in range(G):
        m += pulp.lpSum(x[layer, e, g] for e in range(E)) <= slots, f"slots_{layer}_{g}"
        m += C >= pulp.lpSum(float(problem.load[layer, e]) * x[layer, e, g] for e in range(E)), f"tail_{layer}_{g}"
    if fixed and layer in fixed:
        for e in range(E):
            m += x[layer, e, int(fixed[layer][e])] == 1, f"fixed_{layer}_{e}"
    return cm.w_compute * cm.t_pair * C


def _add_send_rows(m: pulp.LpProblem, x: dict[tuple[int, int, int], Any], problem: PlacementProblem,
                   cm: CostModel, layer: int, tiers: tuple[float, float]) -> Any:
    """The linearised sends from layer l to layer l+1 (``d``: off the rank, ``q``: off the node) and the
    busiest rank's send ``M_l``; returns the pair's communication and affinity terms of the objective."""
    s_in, s_out = tiers
    G, gpn = problem.num_ranks, problem.gpus_per_node
    N = -(-G // gpn)
    R = problem.transition_counts()
    send: list[list[Any]] = [[] for _ in range(G)]
    for e, f in zip(*np.nonzero(R[layer])):
        w = float(R[layer, e, f]) * cm.bytes
        for g in range(G):
            d = new_var(m, f"d_{layer}_{e}_{f}_{g}", 0)
            m += d >= x[layer, e, g] - x[layer + 1, f, g]
            send[g].append(w * s_in * d)
            if N > 1 and s_out != s_in:
                n = g // gpn
                q = new_var(m, f"q_{layer}_{e}_{f}_{g}", 0)
                m += q >= x[layer, e, g] - pulp.lpSum(x[layer + 1, f, h] for h in range(n * gpn, min(G, (n + 1) * gpn)))
                send[g].append(w * (s_out - s_in) * q)
    M = new_var(m, f"M_{layer}", 0)
    for g in range(G):
        m += M >= pulp.lpSum(send[g]), f"send_{layer}_{g}"
    return cm.w_comm * M + cm.w_affinity / G * pulp.lpSum(t for row in send for t in row)


def check_joint_size(problem: PlacementProblem) -> None:
    """An InputError when the joint model would be too large to build (``method: joint`` is for small
    instances)."""
    G = problem.num_ranks
    size = (problem.num_layers * problem.num_experts * G
            + G * sum(int(np.count_nonzero(r)) for r in problem.transition_counts())
            * (2 if G > problem.gpus_per_node else 1))
    if size > _JOINT_LIMIT:
        raise InputError(f"method joint would build {size} variables (limit {_JOINT_LIMIT}); the monolithic ILP is "
                         "for small instances: use auto or decompose", field="method")


def _canonical(assign: np.ndarray, gpn: int, G: int) -> np.ndarray:
    """Relabel ranks (nodes, then ranks in nodes) so layer 0 meets the joint model's symmetry rows."""
    N = G // gpn
    first = assign[0]
    node_order, seen = [], set()
    for e in range(first.size):
        n = int(first[e]) // gpn
        if n not in seen:
            seen.add(n)
            node_order.append(n)
    node_order += [n for n in range(N) if n not in seen]
    perm = np.empty(G, dtype=np.int64)
    for new_n, n in enumerate(node_order):
        local_order, lseen = [], set()
        for e in range(first.size):
            g = int(first[e])
            if g // gpn == n and g not in lseen:
                lseen.add(g)
                local_order.append(g)
        local_order += [g for g in range(n * gpn, (n + 1) * gpn) if g not in lseen]
        for j, g in enumerate(local_order):
            perm[g] = new_n * gpn + j
    return perm[assign]


def solve_joint(problem: PlacementProblem, cm: CostModel, incumbent: np.ndarray, *, solver: str,
                time_limit_s: float, gap: float) -> tuple[np.ndarray, float, str]:
    """Solve the joint ILP from ``incumbent``: (best assignment, proven lower bound, status)."""
    model, x = joint_model(problem, cm)
    G, gpn = problem.num_ranks, problem.gpus_per_node
    start = _canonical(incumbent, gpn, G) if G % gpn == 0 else incumbent
    for (layer, e, g), var in x.items():
        var.setInitialValue(1 if start[layer, e] == g else 0)
    inc_val = evaluate(problem, start, cm).total
    res = solve(model, solver=solver, time_limit_s=time_limit_s, gap=gap, incumbent=inc_val * (1 + 1e-9),
                warm_start=True)
    if res.status == "infeasible" and res.objective is None and not np.isfinite(res.bound):
        raise InputError("joint ILP infeasible", field="memory_slots")
    best = start
    if res.objective is not None:
        sol = np.zeros_like(start)
        for (layer, e, g), var in x.items():
            if (var.value() or 0) > 0.5:
                sol[layer, e] = g
        if evaluate(problem, sol, cm).total < inc_val:
            best = sol
    return best, res.bound, res.status
