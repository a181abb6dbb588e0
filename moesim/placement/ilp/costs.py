"""The ``ilp`` objective (docs/ilp.md, "Objective"): its coefficients, its value term by term, its bound.

Models, in seconds over the profiling window: each layer's compute tail (heaviest rank), the
communication tail and mean send between consecutive layers (coherent dataflow), and the standard
dataflow's inter-node dispatch + combine counted on the profile's tokens. Also what a policy reports
(:func:`solve_info`) and a proven lower bound on the whole objective. Deliberately ignored: NVLink
dispatch inside a node, the tokens' actual homes (uniform over nodes), the busiest node's NICs (the mean
node is counted), per-link contention beyond a rank's own sends, and de-duplication of copies when a
token's next experts share a rank. Details and the reasons: docs/ilp.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.placement.registry import PlacementProblem


@dataclass(frozen=True)
class CostModel:
    """Objective coefficients, in seconds: ``t_pair`` per token-expert pair (x w_compute), ``s`` per byte."""

    t_pair: float
    s: np.ndarray  # [G, G] seconds per byte between ranks, 0 on the diagonal
    bytes: float
    w_compute: float
    w_comm: float
    w_affinity: float
    two_tier: tuple[float, float] | None = None  # (same node, other node) s/byte when ``s`` has that form
    w_dispatch: float = 0.0
    copy_s: float = 0.0  # seconds one node's NICs spend on one (token, remote destination) copy, both directions
    copies: str = "node"  # what one dispatch copy goes to: "node" (hierarchical) or "gpu" (direct, deduplicated)


def cost_model(problem: PlacementProblem, w_compute: float = 1.0, w_comm: float | None = None,
               w_affinity: float | None = None, w_dispatch: float | None = None) -> CostModel:
    """Coefficients from the problem's hardware costs (``problem.costs``; unit costs by default).

    ``w_comm`` and ``w_affinity`` default to 1 under the context-coherent dataflow (``costs.coherent``),
    where tokens travel from expert to expert, and to 0 under the standard one, where they go home after
    every layer and co-locating consecutive layers saves nothing. ``w_dispatch`` (the standard dataflow's
    inter-node dispatch + combine, :func:`dispatch_terms`) defaults to 1 under the standard dataflow on more
    than one node when the problem has its routing and copies go per node or per rank, else to 0.
    """
    hw = problem.costs
    default = 1.0 if hw.coherent else 0.0
    w_comm = default if w_comm is None else w_comm
    w_affinity = default if w_affinity is None else w_affinity
    if hw.a2a_copies not in ("node", "gpu", "expert"):
        raise InputError(f"must be node, gpu or expert, got {hw.a2a_copies!r}", field="a2a_copies")
    G, gpn = problem.num_ranks, problem.gpus_per_node
    applies = (not hw.coherent and problem.num_nodes > 1 and problem.routing is not None
               and hw.a2a_copies != "expert")
    w_dispatch = (1.0 if applies else 0.0) if w_dispatch is None else w_dispatch
    for name, w in (("w_compute", w_compute), ("w_comm", w_comm), ("w_affinity", w_affinity),
                    ("w_dispatch", w_dispatch)):
        if not (w >= 0 and math.isfinite(w)):
            raise InputError(f"must be a finite number >= 0, got {w!r}", field=name)
    if w_dispatch and not applies:  # nothing to count, or a term the engine does not have
        w_dispatch = 0.0
    if hw.rank_s_per_byte is not None:
        s = np.asarray(hw.rank_s_per_byte, dtype=float)
        if s.shape != (G, G):
            raise InputError(f"rank_s_per_byte must be [{G}, {G}], got {list(s.shape)}", field="rank_s_per_byte")
        s = s * (1 - np.eye(G))
    else:
        s = 1.0 - np.eye(G)
    node = np.arange(G) // gpn
    same = (node[:, None] == node[None, :]) & ~np.eye(G, dtype=bool)
    other = node[:, None] != node[None, :]
    intra = s[same] if same.any() else np.zeros(1)
    inter = s[other] if other.any() else np.zeros(1)
    uniform = np.ptp(intra) <= 1e-12 * max(intra.max(), 1e-300) and np.ptp(inter) <= 1e-12 * max(inter.max(), 1e-300)
    transfer = hw.dispatch_bytes
    both = transfer + (hw.combine_bytes if hw.combine_bytes is not None else transfer)
    # a node's NICs together: gpus_per_node ranks, each at 1 / (its cross-node seconds per byte)
    copy_s = both * float(inter.mean()) / gpn if other.any() else 0.0
    return CostModel(t_pair=hw.compute_s_per_pair, s=s, bytes=transfer,
                     w_compute=w_compute, w_comm=w_comm, w_affinity=w_affinity,
                     two_tier=(float(intra.max()), float(inter.max())) if uniform else None,
                     w_dispatch=w_dispatch, copy_s=copy_s, copies=hw.a2a_copies)


def layer_picks(problem: PlacementProblem, layer: int) -> np.ndarray:
    """[T, K] expert ids of layer l in the profiling window (int64, -1 = none), cached on the problem."""
    key = ("picks", layer)
    if key not in problem._cache:
        problem._cache[key] = np.ascontiguousarray(np.asarray(problem.routing)[:, layer, :], dtype=np.int64)
    return problem._cache[key]


def _distinct(sorted_rows: np.ndarray) -> np.ndarray:
    """[T] distinct values >= 0 per row of an ascending-sorted [T, K] array."""
    o = sorted_rows
    return (o[:, 0] >= 0).astype(np.int64) + ((o[:, 1:] != o[:, :-1]) & (o[:, 1:] >= 0)).sum(axis=1)


def spans(picks: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """[T] distinct owners (nodes or ranks: ``owner[expert]``) of each token's picks (-1 = no pick)."""
    owner = np.asarray(owner, dtype=np.int64)
    if owner.max(initial=0) < 64:  # a bit per owner, OR over the picks, count the bits
        table = np.append(np.left_shift(np.uint64(1), owner.astype(np.uint64)), np.uint64(0))  # [-1]: nothing
        mask = np.zeros(picks.shape[0], dtype=np.uint64)
        for j in range(picks.shape[1]):
            mask |= table[picks[:, j]]
        return np.bitwise_count(mask).astype(np.int64)
    return _distinct(np.sort(np.where(picks >= 0, np.append(owner, -1)[picks], -1), axis=1))


def dispatch_scale(problem: PlacementProblem, cm: CostModel) -> float:
    """Seconds per (token, destination) pair in the mean node's dispatch + combine time.

    With homes spread evenly over N nodes a destination is remote with probability (N-1)/N, and the
    remote copies are shared by N nodes' NICs: the mean node spends ``copy_s x (N-1)/N^2`` per pair.
    """
    N = problem.num_nodes
    return cm.w_dispatch * cm.copy_s * (N - 1) / (N * N)


def dispatch_terms(problem: PlacementProblem, assign: np.ndarray, cm: CostModel) -> np.ndarray:
    """[L] weighted inter-node dispatch + combine time of the standard dataflow, per layer.

    Counted on the profile's tokens: the distinct destination nodes (``copies == "node"``, hierarchical
    all-to-all) or destination ranks (``"gpu"``, direct) of each token's picks, times
    :func:`dispatch_scale`. Zero when ``w_dispatch`` is 0.
    """
    L = problem.num_layers
    out = np.zeros(L)
    if cm.w_dispatch == 0:
        return out
    scale = dispatch_scale(problem, cm)
    for layer in range(L):
        owner = assign[layer] // problem.gpus_per_node if cm.copies == "node" else assign[layer]
        out[layer] = scale * float(spans(layer_picks(problem, layer), np.asarray(owner)).sum())
    return out


def dispatch_lower_bound(problem: PlacementProblem, cm: CostModel) -> float:
    """Every token spans at least ceil(distinct picks / experts a node (rank) holds) destinations."""
    if cm.w_dispatch == 0:
        return 0.0
    cap = problem.slots_per_gpu * (problem.gpus_per_node if cm.copies == "node" else 1)
    total = 0.0
    for layer in range(problem.num_layers):
        distinct = _distinct(np.sort(layer_picks(problem, layer), axis=1))
        total += float((-(-distinct // cap)).sum())
    return dispatch_scale(problem, cm) * total


def layer_max_load(load_row: np.ndarray, a: np.ndarray, G: int) -> float:
    return float(np.bincount(a, weights=load_row, minlength=G).max())


def sends(R: np.ndarray, a: np.ndarray, b: np.ndarray, cm: CostModel) -> np.ndarray:
    """[G] seconds each rank spends sending layer-l outputs (placement ``a``) to layer l+1 (``b``)."""
    G = cm.s.shape[0]
    per_expert = (R * cm.s[a][:, b]).sum(axis=1) * cm.bytes
    return np.bincount(a, weights=per_expert, minlength=G)


def pair_cost(R: np.ndarray, a: np.ndarray, b: np.ndarray, cm: CostModel) -> float:
    sd = sends(R, a, b, cm)
    return cm.w_comm * float(sd.max()) + cm.w_affinity * float(sd.mean())


@dataclass(frozen=True)
class Breakdown:
    compute: np.ndarray  # [L] weighted compute tail
    comm: np.ndarray  # [L-1] weighted communication tail
    affinity: np.ndarray  # [L-1] weighted mean send
    dispatch: np.ndarray | None = None  # [L] weighted inter-node dispatch + combine (standard dataflow)

    @property
    def total(self) -> float:
        extra = float(self.dispatch.sum()) if self.dispatch is not None else 0.0
        return float(self.compute.sum() + self.comm.sum() + self.affinity.sum()) + extra


def evaluate(problem: PlacementProblem, assign: np.ndarray, cm: CostModel) -> Breakdown:
    """The joint objective of ``assign[l, e]`` (one rank per expert), term by term."""
    L, G = problem.num_layers, problem.num_ranks
    compute = (np.array([layer_max_load(problem.load[layer], assign[layer], G) for layer in range(L)])
               * cm.t_pair * cm.w_compute)
    comm, aff = np.zeros(max(L - 1, 0)), np.zeros(max(L - 1, 0))
    for layer in range(L - 1):
        if cm.w_comm == 0 and cm.w_affinity == 0:  # no traffic terms: the routing statistics are not needed
            break
        sd = sends(problem.transition_counts()[layer], assign[layer], assign[layer + 1], cm)
        comm[layer], aff[layer] = cm.w_comm * sd.max(), cm.w_affinity * sd.mean()
    return Breakdown(compute, comm, aff, dispatch_terms(problem, assign, cm))


def objective_lower_bound(problem: PlacementProblem, cm: CostModel, load_lb: np.ndarray) -> float:
    """Sum of separate proven bounds: compute tail per layer, and the traffic no placement can keep local.

    A layer-l expert shares a rank with at most ``slots`` experts of layer l+1 (a node with at most
    ``slots x ranks per node``), so at most the top ``slots`` of its row of R stays on its rank (and
    likewise per column); the rest pays at least the cheapest same-node cost, and what cannot stay in the
    node at least the cheapest cross-node cost. The busiest rank sends at least the mean. Plus the
    dispatch term's bound (:func:`dispatch_lower_bound`).
    """
    L, G, s, gpn = problem.num_layers, problem.num_ranks, problem.slots_per_gpu, problem.gpus_per_node
    R = problem.transition_counts()
    total = float(load_lb.sum()) * cm.t_pair * cm.w_compute + dispatch_lower_bound(problem, cm)
    if cm.w_comm == 0 and cm.w_affinity == 0:
        return total
    node = np.arange(G) // gpn
    same = (node[:, None] == node[None, :]) & ~np.eye(G, dtype=bool)
    other = node[:, None] != node[None, :]
    off = cm.s[~np.eye(G, dtype=bool)]
    if not off.size:
        return total
    s_in = float(cm.s[same].min()) if same.any() else float(off.min())
    s_out = float(cm.s[other].min()) if other.any() else s_in
    s_in = min(s_in, s_out)

    def kept(m: np.ndarray, k: int) -> float:
        rows = np.sort(m, axis=1)[:, ::-1][:, :k].sum()
        cols = np.sort(m, axis=0)[::-1][:k].sum()
        return float(min(rows, cols))

    for layer in range(L - 1):
        moved_rank = max(0.0, R[layer].sum() - kept(R[layer], s))
        moved_node = max(0.0, R[layer].sum() - kept(R[layer], s * gpn)) if other.any() else 0.0
        cost = (s_in * moved_rank + (s_out - s_in) * moved_node) * cm.bytes
        total += (cm.w_comm + cm.w_affinity) * cost / G
    return total


def solve_info(problem: PlacementProblem, assign: np.ndarray, cm: CostModel, *, lower: float, load_lower: float,
               greedy_total: float, method: str, solver: str, status: str, seconds: float) -> dict[str, Any]:
    """What a policy reports (-> results.json): the objective, its proven bound and gap, term by term."""
    br = evaluate(problem, assign, cm)
    total = br.total
    load_ub = float(br.compute.sum())
    lower = min(lower, total)
    load_lower = min(load_lower, load_ub)
    return {
        "objective": total, "lower_bound": lower,
        "gap": (total - lower) / total if total > 0 else 0.0,
        "load_objective": load_ub, "load_lower_bound": load_lower,
        "load_gap": (load_ub - load_lower) / load_ub if load_ub > 0 else 0.0,
        "comm_objective": float(br.comm.sum()), "affinity_objective": float(br.affinity.sum()),
        "dispatch_objective": float(br.dispatch.sum()) if br.dispatch is not None else 0.0,
        "greedy_objective": greedy_total, "method": method, "solver": solver, "status": status,
        "solve_s": round(seconds, 3),
        "weights": {"compute": cm.w_compute, "comm": cm.w_comm, "affinity": cm.w_affinity,
                    "dispatch": cm.w_dispatch},
    }
