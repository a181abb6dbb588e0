"""Replicas (docs/ilp.md, "Replicas"): per layer, copy counts and their GPUs chosen together.

Minimises the heaviest GPU with every copy taking an even share of its expert's load (the engine's
``token_index`` rule): local search from greedy, then a MILP over the whole layer or over neighbourhoods
of four GPUs under node budgets. Load term only: the traffic and dispatch terms assume one rank per
expert and are not modelled with copies.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pulp

from moesim.errors import InputError
from moesim.placement.eplb import check_replica_memory
from moesim.placement.ilp.checks import check_feasible, check_options
from moesim.placement.ilp.costs import cost_model
from moesim.placement.ilp_solver import new_var, resolve_solver, solve
from moesim.placement.registry import PlacementProblem
from moesim.placement.replication import (
    copy_loads, improve_replicas, pack_replicas, place_missing, replica_counts, replica_lower_bound,
)

_REPLICA_WHOLE_LIMIT = 256  # experts x ranks x most copies up to which method auto solves a layer whole
_REPLICA_JOINT_LIMIT = 4_096  # the same, for methods exact and joint (whole layers only)
_REPLICA_WHOLE_NODES = 2_000  # branch-and-bound nodes of one whole-layer replica MILP
_REPLICA_HOOD_NODES = 100  # branch-and-bound nodes of one neighbourhood replica MILP
_REPLICA_HOOD_GPUS = 4  # GPUs in one neighbourhood: the heaviest and three others


def replica_hood_model(load_row: np.ndarray, held: np.ndarray, hood: np.ndarray, slots: int, max_copies: int,
                       grow: int | None = None) -> tuple[pulp.LpProblem, Any, Callable[[], np.ndarray]]:
    """The MILP that re-places every copy on the GPUs ``hood`` of one layer (docs/ilp.md, "Replicas").

    Experts with every copy in ``hood`` ("inner") choose their count k (1 to ``grow`` more than now, all
    counts when None) and their GPUs; the others keep their count and their copies outside, and only move
    their copies inside among the ``hood`` GPUs. The inner experts keep their total number of copies, so
    the layer keeps its ``E + N``. With ``hood`` = every GPU this is the whole layer. Returns the model, its
    objective variable and a decoder that reads the solution back into a copy mask.
    """
    p = np.asarray(load_row, dtype=float)
    hood = np.asarray(hood, dtype=np.int64)
    h = hood.size
    c = held.sum(axis=1)
    inside = held[:, hood].sum(axis=1)
    inner = np.flatnonzero((inside == c) & (c > 0))
    partial = np.flatnonzero((inside > 0) & (inside < c))
    spare = int(c[inner].sum())  # copies the inner experts share
    kmax = max(1, min(h, max_copies, spare - inner.size + 1))
    grow = kmax if grow is None else grow
    m = pulp.LpProblem("replicas", pulp.LpMinimize)
    top = new_var(m, "T", 0)
    m += top
    on: list[list[Any]] = [[] for _ in range(h)]
    load: list[list[Any]] = [[] for _ in range(h)]
    first: dict[int, list[Any]] = {}  # expert -> its "a copy on hood position j" expressions
    xs: dict[int, list[Any]] = {}
    for e in partial:
        row = [new_var(m, f"x_{e}_{j}", 0, 1, cat="Binary") for j in range(h)]
        m += pulp.lpSum(row) == int(inside[e]), f"inside_{e}"
        for j in range(h):
            on[j].append(row[j])
            load[j].append(float(p[e] / c[e]) * row[j])
        xs[int(e)] = row
        first[int(e)] = row
    ys: dict[int, dict[tuple[int, int], Any]] = {}
    counts: list[Any] = []  # k * z_k terms (pulp expressions)
    for e in inner:
        ks = range(1, min(kmax, int(c[e]) + grow) + 1)
        z = {k: new_var(m, f"z_{e}_{k}", 0, 1, cat="Binary") for k in ks}
        y = {(j, k): new_var(m, f"y_{e}_{j}_{k}", 0, 1, cat="Binary") for j in range(h) for k in z}
        m += pulp.lpSum(z.values()) == 1, f"one_count_{e}"
        for k in z:  # y[., k] = k copies on distinct GPUs when z[k], else none
            m += pulp.lpSum(y[j, k] for j in range(h)) == k * z[k], f"copies_{e}_{k}"
        for j in range(h):
            m += pulp.lpSum(y[j, k] for k in z) <= 1, f"twin_{e}_{j}"
            on[j].extend(y[j, k] for k in z)
            load[j].extend(float(p[e] / k) * y[j, k] for k in z)
        counts.extend(k * z[k] for k in z)
        ys[int(e)] = y
        first[int(e)] = [pulp.lpSum(y[j, k] for k in z) for j in range(h)]
    if inner.size:
        m += pulp.lpSum(counts) == spare, "total_copies"
    for j in range(h):
        m += pulp.lpSum(on[j]) <= slots, f"slots_{j}"
        m += top >= pulp.lpSum(load[j]), f"tail_{j}"
    if first:  # symmetry: the hood's GPUs are interchangeable, so the heaviest expert has a copy on the first
        e0 = max(first, key=lambda e: (p[e], -e))
        m += first[e0][0] == 1, "symmetry"

    def decode() -> np.ndarray:
        out = held.copy()
        out[np.ix_(np.concatenate([inner, partial]), hood)] = False
        for e, row in xs.items():
            out[e, hood[[j for j in range(h) if (row[j].value() or 0) > 0.5]]] = True
        for e, y in ys.items():
            out[e, hood[sorted({j for (j, k), v in y.items() if (v.value() or 0) > 0.5})]] = True
        return out

    return m, top, decode


def solve_replica_hood(load_row: np.ndarray, held: np.ndarray, hood: np.ndarray, slots: int, max_copies: int, *,
                       solver: str, time_limit_s: float, gap: float, node_limit: int | None,
                       grow: int | None = None) -> tuple[np.ndarray | None, float, str]:
    """Re-place the copies on ``hood`` (:func:`replica_hood_model`), searching only below their current
    heaviest GPU: (a strictly better copy mask or None, the solver's bound on the hood's heaviest GPU,
    status)."""
    p = np.asarray(load_row, dtype=float)
    hood = np.asarray(hood, dtype=np.int64)
    current = float(copy_loads(p, held)[hood].max())
    model, _, decode = replica_hood_model(p, held, hood, slots, max_copies, grow)
    res = solve(model, solver=solver, time_limit_s=time_limit_s, gap=gap, incumbent=current, node_limit=node_limit)
    if res.objective is None:
        return None, res.bound, res.status
    out = decode()
    c0, c1 = held.sum(axis=1), out.sum(axis=1)
    moved = held[:, hood].any(axis=1)
    partial = held[:, hood].sum(axis=1) < c0
    valid = ((c1 >= 1).all() and c1.sum() == c0.sum() and (out.sum(axis=0) <= np.maximum(held.sum(axis=0), slots)).all()
             and (c1 <= max_copies).all() and np.array_equal(out[~moved], held[~moved])
             and np.array_equal(c1[partial], c0[partial]))
    if not valid or float(copy_loads(p, out)[hood].max()) >= current * (1 - 1e-9):
        return None, res.bound, res.status
    return out, res.bound, res.status


def balance_replicated_layer(load_row: np.ndarray, held: np.ndarray, slots: int, max_copies: int, *, solver: str,
                             gap: float, deadline: float, rng: np.random.Generator, whole: bool,
                             hood_gpus: int = _REPLICA_HOOD_GPUS, hood_max: int = 6, rounds: int = 12,
                             patience: int = 3
                             ) -> tuple[np.ndarray, float, float, str]:
    """One layer's copies: (copy mask, heaviest GPU, proven lower bound, status).

    Local search (:func:`moesim.placement.replication.improve_replicas`) from ``held``; then either the
    whole-layer MILP (``whole``) from that incumbent, or a large-neighbourhood search: the heaviest GPU
    with ``hood_gpus - 1`` others re-placed by :func:`solve_replica_hood` under a node budget - the
    lightest GPUs first; after a failure, in turn, every GPU of a replicated expert on the heaviest one
    (at most ``hood_max``, so its count can change) and a random draw favouring light GPUs. Local search
    again after each gain, until the gap closes, ``patience`` neighbourhoods in a row fail, ``rounds`` are
    spent or the deadline passes.
    """
    p = np.asarray(load_row, dtype=float)
    E, G = held.shape
    total = int(held.sum())
    held = improve_replicas(p, held, slots, max_copies)
    ub = float(copy_loads(p, held).max())
    lb = replica_lower_bound(p, G, total)
    if ub - lb <= 1e-9 * ub or G < 2:
        return held, ub, min(lb, ub), "done"
    if whole or G <= hood_gpus:  # a neighbourhood of every GPU is the whole layer: solve it once
        left = deadline - time.perf_counter()
        sub, bound, _ = solve_replica_hood(p, held, np.arange(G), slots, max_copies, solver=solver,
                                           time_limit_s=max(0.05, left), gap=gap, node_limit=_REPLICA_WHOLE_NODES)
        if sub is not None:
            held, ub = sub, float(copy_loads(p, sub).max())
        if np.isfinite(bound):
            lb = max(lb, bound)
        return held, ub, min(lb, ub), "time_limit" if time.perf_counter() > deadline else "done"
    h = min(G, hood_gpus)
    fails = 0
    status = "done"
    for _ in range(rounds):
        if ub - lb <= gap * ub:
            break
        if time.perf_counter() > deadline:
            status = "time_limit"
            break
        bl = copy_loads(p, held)
        heavy = int(np.argmax(bl))
        order = np.argsort(bl, kind="stable")
        others = order[order != heavy]
        c = held.sum(axis=1)
        # a replicated expert on the heaviest GPU whose copies fit the neighbourhood: its count can change
        grow = [e for e in np.flatnonzero(held[:, heavy]) if 2 <= c[e] <= hood_max]
        if fails % 3 == 1 and grow:
            e = max(grow, key=lambda e: (p[e] / c[e], -e))
            mates = np.flatnonzero(held[e])
            rest = [g for g in others if not held[e, g]][: max(0, h - mates.size)]
            hood = np.sort(np.concatenate([mates, rest])).astype(np.int64)
        else:
            if fails == 0:
                partners = others[: h - 1]
            else:
                weight = (bl[heavy] - bl[others]) + 1e-12 * max(bl[heavy], 1e-300)
                partners = rng.choice(others, size=h - 1, replace=False, p=weight / weight.sum())
            hood = np.sort(np.append(partners, heavy))
        sub, _, _ = solve_replica_hood(p, held, hood, slots, max_copies, solver=solver, gap=0.0,
                                       time_limit_s=max(0.05, min(10.0, deadline - time.perf_counter())),
                                       node_limit=_REPLICA_HOOD_NODES, grow=1)
        if sub is None:
            fails += 1
            if fails >= patience:
                break
            continue
        held = improve_replicas(p, sub, slots, max_copies)
        ub = float(copy_loads(p, held).max())
        fails = 0
    return held, ub, min(lb, ub), status


def optimise_replicas(problem: PlacementProblem, redundant_experts: int, *, w_compute: float = 1.0,
                      solver: str = "auto", time_limit_s: float = 60.0, gap: float = 0.01,
                      method: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """The ``ilp`` policy with ``redundant_experts`` N > 0: ``(held [layers, experts, gpus], info)``.

    Per layer, replica counts and packing together (docs/ilp.md, "Replicas"), from greedy's answer
    (:func:`moesim.placement.replication.replicate_and_pack`), which is kept for any layer where it is
    better, so the result is never worse than ``greedy`` with the same N.
    """
    t0 = time.perf_counter()
    check_options(method, time_limit_s, gap)
    check_feasible(problem)
    L, E, G = problem.num_layers, problem.num_experts, problem.num_ranks
    N = redundant_experts
    if N < 0:
        raise InputError(f"must be >= 0, got {N}", field="redundant_experts")
    total = E + N
    slots = -(-total // G)
    max_copies = min(G, N + 1)
    if N > E * (G - 1):
        raise InputError(f"{E} experts on {G} ranks take at most {E * (G - 1)} redundant copies (one per rank "
                         f"each), got {N}", field="redundant_experts")
    try:
        check_replica_memory(problem, slots, "ilp")
    except ValueError as exc:
        raise InputError(str(exc), field="redundant_experts") from None
    if problem.memory_slots is not None and problem.memory_slots < L * slots:
        raise InputError(f"memory holds {problem.memory_slots} expert copies per rank, under {L} layers x {slots} "
                         f"copies with {N} redundant experts; lower redundant_experts", field="redundant_experts")
    solver_name = resolve_solver(solver)
    cm = cost_model(problem, w_compute, 0.0, 0.0, 0.0)
    size = E * G * max_copies
    whole = (method in ("exact", "joint") or (method == "auto" and size <= _REPLICA_WHOLE_LIMIT)
             or G <= _REPLICA_HOOD_GPUS)  # a neighbourhood of every GPU is the whole layer
    if method in ("exact", "joint") and size > _REPLICA_JOINT_LIMIT:
        raise InputError(f"method {method} with replicas solves whole layers: experts x ranks x copies = {size}, "
                         f"over {_REPLICA_JOINT_LIMIT}; use auto or decompose", field="method")
    load = np.asarray(problem.load, dtype=float)
    counts = replica_counts(load, total, G)
    greedy = pack_replicas(load, counts, G, slots)
    greedy_ub = np.array([copy_loads(load[layer], greedy[layer]).max() for layer in range(L)])
    rng = np.random.default_rng(problem.seed)
    held = np.empty_like(greedy)
    ub, lb = np.zeros(L), np.zeros(L)
    statuses, kept_greedy = [], 0
    deadline = t0 + 0.95 * time_limit_s
    for layer in range(L):
        now = time.perf_counter()
        layer_deadline = now + max(0.0, deadline - now) / (L - layer)
        start = place_missing(load[layer], greedy[layer], counts[layer], slots)
        held[layer], ub[layer], lb[layer], st = balance_replicated_layer(
            load[layer], start, slots, max_copies, solver=solver_name, gap=gap * 0.5, deadline=layer_deadline,
            rng=rng, whole=whole)
        if greedy_ub[layer] < ub[layer]:  # greedy merged a twin and came out lighter: keep its answer
            held[layer], ub[layer], kept_greedy = greedy[layer], greedy_ub[layer], kept_greedy + 1
        lb[layer] = min(lb[layer], ub[layer])
        statuses.append(st)
    scale = cm.t_pair * cm.w_compute
    objective, lower = float(ub.sum()) * scale, float(lb.sum()) * scale
    rel = (objective - lower) / objective if objective > 0 else 0.0
    if rel <= 1e-6:  # proven to the solvers' precision (CBC reports its bound to 5 decimals)
        status = "optimal"
    elif rel <= gap + 1e-12:
        status = "within_gap"
    else:
        status = "time_limit" if "time_limit" in statuses else "gap_open"
    used = ("replicas_whole" if whole else "replicas_lns") + ("+greedy" if kept_greedy else "")
    info = {
        "objective": objective, "lower_bound": lower, "gap": rel,
        "load_objective": objective, "load_lower_bound": lower, "load_gap": rel,
        "greedy_objective": float(greedy_ub.sum()) * scale, "method": used, "solver": solver_name,
        "status": status, "solve_s": round(time.perf_counter() - t0, 3),
        "weights": {"compute": cm.w_compute, "comm": 0.0, "affinity": 0.0},
        "redundant_experts": N, "merged_twins": int(L * total - held.sum()),
        "layers_proven_optimal": int(np.sum(ub - lb <= 1e-6 * np.maximum(ub, 1e-300))),
    }
    return held, info
