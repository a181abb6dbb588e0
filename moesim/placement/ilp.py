"""The ``ilp`` placement: MoETuner's joint objective (load, communication, cross-layer routing), solved with
proven optimality gaps, by decomposition where the monolithic integer program does not scale.

What is optimised (every term in seconds over the profiling window; ``CostModel``):

- compute tail, per layer: ``w_compute x t_pair x max_g sum_{e on g} load[l, e]`` (the heaviest EP rank);
- communication tail, per layer pair (context-coherent dataflow, :mod:`moesim.sim.engine`): tokens of
  expert e at layer l move to the rank of each of their layer-(l+1) experts f; rank g's send time is
  ``sum_{e on g, f} R[l, e, f] x bytes x s[g, rank(f)]`` with ``s`` the seconds per byte between ranks
  (NVLink inside a node, the NIC across nodes, both from the hardware model; 0 on one rank);
  ``w_comm x max_g send_g`` is the tail (the busiest GPU's outgoing links);
- cross-layer term: ``w_affinity x mean_g send_g``, the total traffic the placement did not co-locate;
- dispatch term, per layer (standard dataflow, more than one node; :func:`dispatch_terms`): the mean
  node's NIC time for dispatch + combine, ``w_dispatch x c x (N-1)/N^2 x sum_t span(t)`` with
  ``span(t)`` the distinct nodes (``a2a_copies == "node"``: hierarchical all-to-all, one network copy per
  token and destination node) or distinct ranks (``"gpu"``: direct, de-duplicated per rank) of token t's
  picks in the profile, homes uniform over the N nodes (a destination is remote with probability
  (N-1)/N) and ``c`` the seconds one copy in both directions costs a node's NICs together.

``w_comm`` and ``w_affinity`` default to 1 when the scenario's dataflow is coherent and to 0 under the
standard dataflow (tokens return home after every layer, so co-location saves nothing); ``w_dispatch``
defaults to 1 under the standard dataflow on more than one node (copies per node or per rank) and is 0
otherwise; see :func:`cost_model`. ``method: joint`` also runs the monolithic ILP below from the
decomposed answer (small instances), returning the incumbent and the solver's bound at ``time_limit_s``.

Constraints: every expert on one rank per layer, at most ``slots_per_gpu`` experts per rank and layer,
and at most ``memory_slots`` expert copies per rank over all layers (the memory budget; hard).

Linearisation (the joint model, :func:`joint_model`). The product ``x[l,e,g] (1 - x[l+1,f,g])`` ("e on g
sends to f elsewhere") is a continuous ``d[l,e,f,g] >= x[l,e,g] - x[l+1,f,g]``, ``d >= 0`` (ExFlow's
device); across nodes ``q[l,e,f,g] >= x[l,e,g] - u[l+1,f,node(g)]`` with ``u`` the node sums. Both
appear only with non-negative cost in a minimisation, so every feasible point over-estimates the true
cost and an optimum sets them to ``max(0, .)``, the exact products: the model's optimum is the true one.
This is exact for a two-tier cost (same node / different node), which is what the presets build.

Method (``method="auto"``):

1. *Exact chain DP* when the instance is small (Mixtral-like: 8 experts). The objective is a chain,
   ``sum_l f_l(a_l) + sum_l g_l(a_l, a_{l+1})``, invariant under relabelling GPUs within nodes and nodes
   within the cluster. States are the placements of one layer up to that symmetry (105 for 8 experts on 4
   ranks); a transition is one hierarchy-preserving relabelling; the shortest path over layers is the
   optimum (its LP is a network flow, integral - this is the joint ILP in extended form, with zero gap).
2. Otherwise *decomposition* with proven bounds:
   a. per layer, min-max load: LPT (greedy) seeds a swap local search; a lower bound
      ``max(total/G, max load, pigeonhole sums of the top kG+1 loads)`` proves the gap; where it is not
      proven below ``gap``, a large-neighbourhood ILP (PuLP) re-packs the heaviest rank with the three
      lightest, under a branch-and-bound node budget (deterministic), so its size does not grow with
      the cluster; a layer of at most four ranks is solved whole and its bound is the layer's;
   b. cross-layer alignment: each layer's ranks are relabelled to line up with its neighbours, an
      assignment problem per layer (exact, Hungarian), in forward and backward sweeps (one forward
      sweep above 16 ranks);
   b'. nodes first, when the dispatch term is on (:func:`place_nodes_first`): per layer, experts to
      nodes by swap local search between nodes (:func:`node_swaps`; compute tail as the largest per-node
      load bound, plus the dispatch term counted exactly and incrementally on a token sample),
      from both the contiguous node partition and the balanced one, then each node's experts balanced
      over its ranks; the best of those and the balanced layer on the exact layer terms. The dispatch
      term's bound is one destination per ``slots x ranks per node`` distinct picks of a token (valid,
      loose: the joint gap stays open, and ``load_gap`` grows by what is traded for fewer nodes);
   c. affinity swaps: two experts of one layer trade ranks when the exact joint objective falls
      (screened by a vectorised first-order estimate), load tail included (b and c do not see the
      dispatch term: their result is kept only if the whole objective falls).
3. The answer is never worse than greedy: greedy is evaluated with the same objective and kept if better.

Replicas (``redundant_experts: N > 0``, :func:`optimise_replicas`): per layer, how many copies each expert
gets and which GPUs hold them are chosen together, minimising the heaviest GPU's load with every copy
taking an even share of its expert's load (the engine's ``token_index`` rule; ``balanced_split`` can only
do better, so the figure is conservative for it; ``local`` may do worse). Constraints: ``E + N`` copies in
all, at least one and at most ``min(G, N + 1)`` per expert, no two on one GPU, ``ceil((E + N) / G)`` per
GPU; memory as ``greedy`` (``PlacementProblem.max_slots_per_gpu``, and ``memory_slots`` over the layers).
The MILP (:func:`replica_hood_model`): binaries ``z[e,k]`` (e has k copies) and ``y[e,g,k]`` (a copy of e on
g while e has k), ``sum_k z[e,k] = 1``, ``sum_g y[e,g,k] = k z[e,k]``, ``sum_k y[e,g,k] <= 1``,
``sum_{e,k} k z[e,k] = E + N``, copies per GPU ``sum_{e,k} y[e,g,k] <= slots``, GPU load
``sum_{e,k} (load_e / k) y[e,g,k] <= T``, minimise ``T``. ``y`` is the product ``x[e,g] z[e,k]`` of the
placement and count binaries written out (``x[e,g] = sum_k y[e,g,k]``), exact for integers and tighter
than the inequality ``w >= x + z - 1``, whose LP relaxation is 0. GPUs are interchangeable, so the heaviest
expert has a copy on the first. Method:

1. start from ``greedy`` with the same N (EPLB's counts, longest-processing-time packing; a copy its
   end-game merged into a twin is re-placed) and improve it by local search
   (:func:`moesim.placement.replication.improve_replicas`: moves, swaps, and re-counts that give a copy
   of one expert's slot to another);
2. small layers (``experts x ranks x most copies <= 256``, at most 4 ranks, or ``method: exact / joint``):
   the whole-layer MILP from that incumbent (HiGHS gets it as a cutoff), under a branch-and-bound node
   budget;
3. larger layers: a large-neighbourhood search - the heaviest GPU and three others (the lightest; every
   GPU of a replicated expert on the heaviest, so its count can change; a seeded random draw), the MILP
   restricted to their copies: experts wholly inside choose count (up to one more than now) and GPUs,
   the others move only their copies inside; node-budgeted, local search after each gain;
4. bound: ``max(total / G, m*)`` with ``m*`` the least possible heaviest copy, which EPLB's count rule
   attains (:func:`moesim.placement.replication.replica_lower_bound`), or the whole-layer MILP's bound.
   The layer's result is never worse than greedy's: greedy is kept where it is better.

With replicas the objective is the load term only: the traffic terms above assume one rank per expert
(with copies, tokens split over ranks and the cross-layer term becomes a product of three placements), so
``w_comm`` / ``w_affinity`` / ``w_dispatch`` must be left unset or 0 (defaults are ignored).

The info dict (-> results.json) holds ``objective`` and ``lower_bound`` (seconds), ``gap``, the load
term alone (``load_objective``, ``load_lower_bound``, ``load_gap``), ``greedy_objective``,
``solve_s``, ``method``, ``solver`` and ``status`` (``dispatch_objective``, and ``layers_nodes_first``
when nodes first ran; with replicas also ``redundant_experts``, ``merged_twins`` and
``layers_proven_optimal``; no traffic terms). Deliberately ignored: the standard dataflow's NVLink
dispatch/combine (with homes spread evenly it is proportional to the load term), the tokens' actual
homes (taken as uniform over nodes), the busiest node's NICs (the dispatch term counts the mean node),
per-link contention beyond a GPU's own sends, and the de-duplication of copies when a token's next
experts share a rank (``R`` counts top-k x top-k pairs; same-layer co-activation is
counted by :mod:`moesim.placement.profile` but not yet in the objective).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pulp

from moesim.errors import InputError
from moesim.placement.format import Placement
from moesim.placement.ilp_solver import new_var, resolve_solver, solve
from moesim.placement.eplb import check_replica_memory
from moesim.placement.policies import lpt
from moesim.placement.registry import PlacementProblem, register
from moesim.placement.replication import (
    copy_loads, improve_replicas, pack_replicas, place_missing, placement_from_mask, replica_counts,
    replica_lower_bound,
)

METHODS = ("auto", "exact", "joint", "decompose")
_DP_LIMIT = 4_000_000  # states x next states x relabellings evaluated by the exact chain DP
_DP_CELLS = 10_000_000  # states x relabellings x experts x ranks held by the DP per layer
_JOINT_LIMIT = 200_000  # variables of the monolithic joint ILP (method: joint)
_NODE_LIMIT = 200  # branch-and-bound nodes per neighbourhood ILP: deterministic work, not wall time
_REPLICA_WHOLE_LIMIT = 256  # experts x ranks x most copies up to which method auto solves a layer whole
_REPLICA_JOINT_LIMIT = 4_096  # the same, for methods exact and joint (whole layers only)
_REPLICA_WHOLE_NODES = 2_000  # branch-and-bound nodes of one whole-layer replica MILP
_REPLICA_HOOD_NODES = 100  # branch-and-bound nodes of one neighbourhood replica MILP
_REPLICA_HOOD_GPUS = 4  # GPUs in one neighbourhood: the heaviest and three others


# ----------------------------------------------------------------------------------------------------
# cost model and evaluation


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
    """Coefficients from the problem's hardware fields; unit costs where the problem has none.

    ``w_comm`` and ``w_affinity`` default to 1 under the context-coherent dataflow (``problem.coherent``),
    where tokens travel from expert to expert, and to 0 under the standard one, where they go home after
    every layer and co-locating consecutive layers saves nothing. ``w_dispatch`` (the standard dataflow's
    inter-node dispatch + combine, :func:`dispatch_terms`) defaults to 1 under the standard dataflow on more
    than one node when the problem has its routing and copies go per node or per rank, else to 0.
    """
    default = 1.0 if problem.coherent else 0.0
    w_comm = default if w_comm is None else w_comm
    w_affinity = default if w_affinity is None else w_affinity
    if problem.a2a_copies not in ("node", "gpu", "expert"):
        raise InputError(f"must be node, gpu or expert, got {problem.a2a_copies!r}", field="a2a_copies")
    G, gpn = problem.num_gpus, problem.gpus_per_node
    applies = (not problem.coherent and problem.num_nodes > 1 and problem.routing is not None
               and problem.a2a_copies != "expert")
    w_dispatch = (1.0 if applies else 0.0) if w_dispatch is None else w_dispatch
    for name, w in (("w_compute", w_compute), ("w_comm", w_comm), ("w_affinity", w_affinity),
                    ("w_dispatch", w_dispatch)):
        if not (w >= 0 and math.isfinite(w)):
            raise InputError(f"must be a finite number >= 0, got {w!r}", field=name)
    if w_dispatch and not applies:  # nothing to count, or a term the engine does not have
        w_dispatch = 0.0
    if problem.rank_s_per_byte is not None:
        s = np.asarray(problem.rank_s_per_byte, dtype=float)
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
    transfer = problem.transfer_bytes or 1.0
    both = transfer + (problem.combine_bytes if problem.combine_bytes is not None else transfer)
    # a node's NICs together: gpus_per_node ranks, each at 1 / (its cross-node seconds per byte)
    copy_s = both * float(inter.mean()) / gpn if other.any() else 0.0
    return CostModel(t_pair=problem.compute_s_per_pair or 1.0, s=s, bytes=transfer,
                     w_compute=w_compute, w_comm=w_comm, w_affinity=w_affinity,
                     two_tier=(float(intra.max()), float(inter.max())) if uniform else None,
                     w_dispatch=w_dispatch, copy_s=copy_s, copies=problem.a2a_copies)


def improving_pairs(delta: np.ndarray, candidates: int) -> Iterator[tuple[int, int]]:
    """``(i, j)`` of the ``candidates`` most negative entries of the square ``delta``, best first (stable),
    while they are negative: the swaps worth trying, in the order to try them."""
    k = min(candidates, delta.size - 1)
    flat = np.argpartition(delta, k, axis=None)[:k]
    for f in flat[np.argsort(delta.flat[flat], kind="stable")]:
        if not delta.flat[f] < 0:
            return
        yield divmod(int(f), delta.shape[1])


def _picks(problem: PlacementProblem, l: int) -> np.ndarray:
    """[T, K] expert ids of layer l in the profiling window (int64, -1 = none), cached on the problem."""
    key = ("picks", l)
    if key not in problem._cache:
        problem._cache[key] = np.ascontiguousarray(np.asarray(problem.routing)[:, l, :], dtype=np.int64)
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
    for l in range(L):
        owner = assign[l] // problem.gpus_per_node if cm.copies == "node" else assign[l]
        out[l] = scale * float(spans(_picks(problem, l), np.asarray(owner)).sum())
    return out


def dispatch_lower_bound(problem: PlacementProblem, cm: CostModel) -> float:
    """Every token spans at least ceil(distinct picks / experts a node (rank) holds) destinations."""
    if cm.w_dispatch == 0:
        return 0.0
    cap = problem.slots_per_gpu * (problem.gpus_per_node if cm.copies == "node" else 1)
    total = 0.0
    for l in range(problem.num_layers):
        distinct = _distinct(np.sort(_picks(problem, l), axis=1))
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
    L, G = problem.num_layers, problem.num_gpus
    compute = np.array([layer_max_load(problem.load[l], assign[l], G) for l in range(L)]) * cm.t_pair * cm.w_compute
    comm, aff = np.zeros(max(L - 1, 0)), np.zeros(max(L - 1, 0))
    for l in range(L - 1):
        if cm.w_comm == 0 and cm.w_affinity == 0:  # no traffic terms: the routing statistics are not needed
            break
        sd = sends(problem.transition_counts()[l], assign[l], assign[l + 1], cm)
        comm[l], aff[l] = cm.w_comm * sd.max(), cm.w_affinity * sd.mean()
    return Breakdown(compute, comm, aff, dispatch_terms(problem, assign, cm))


# ----------------------------------------------------------------------------------------------------
# per-layer load: bounds, local search, large-neighbourhood ILP


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


def improve_layer(load_row: np.ndarray, a: np.ndarray, G: int, slots: int, max_iter: int = 10_000) -> np.ndarray:
    """Swap and move experts off the heaviest rank while that strictly lowers the pair's maximum."""
    p = np.asarray(load_row, dtype=float)
    a = a.copy()
    bl = np.bincount(a, weights=p, minlength=G)
    cnt = np.bincount(a, minlength=G)
    for _ in range(max_iter):
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
        if move is None:
            break
        if move[0] == "swap":
            i, j = move[1], move[2]
            gi, gj = a[i], a[j]
            a[i], a[j] = gj, gi
            bl[gi] += p[j] - p[i]
            bl[gj] += p[i] - p[j]
        else:
            i, g = move[1], move[2]
            bl[a[i]] -= p[i]
            cnt[a[i]] -= 1
            a[i] = g
            bl[g] += p[i]
            cnt[g] += 1
    return a


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


# ----------------------------------------------------------------------------------------------------
# nodes first: the standard dataflow's inter-node dispatch on multi-node clusters


def _layer_value(problem: PlacementProblem, l: int, a: np.ndarray, cm: CostModel) -> float:
    """Compute tail + dispatch term of layer l under placement row ``a`` (exact, on every profile token)."""
    G, gpn = problem.num_gpus, problem.gpus_per_node
    val = cm.w_compute * cm.t_pair * layer_max_load(problem.load[l], a, G)
    if cm.w_dispatch:
        owner = a // gpn if cm.copies == "node" else a
        val += dispatch_scale(problem, cm) * float(spans(_picks(problem, l), owner).sum())
    return val


_SEARCH_TOKENS = 32_768  # profile tokens the node search counts (every k-th); the final choice counts all


def _node_move_gains(c: np.ndarray, tok_sorted: np.ndarray, exp_sorted: np.ndarray, node_of: np.ndarray,
                     E: int, N: int) -> np.ndarray:
    """[E, N] change of the summed token spans if expert e alone moved to node n (its own node: 0)."""
    own = node_of[exp_sorted]
    solo = np.bincount(exp_sorted, weights=c[tok_sorted, own] == 1, minlength=E)  # tokens e alone brings to its node
    if N <= 10:  # histogram of (expert, nodes the token reaches) and the nodes each mask misses
        bits = 1 << np.arange(N)
        mask = ((c > 0) * bits).sum(axis=1)
        hist = np.bincount(exp_sorted * (1 << N) + mask[tok_sorted], minlength=E << N).reshape(E, 1 << N)
        missing = ((np.arange(1 << N)[:, None] & bits[None, :]) == 0).astype(float)  # [masks, N]
        add = hist @ missing
    else:
        add = np.stack([np.bincount(exp_sorted, weights=c[tok_sorted, n] == 0, minlength=E) for n in range(N)], axis=1)
    out = add - solo[:, None]
    out[np.arange(E), node_of] = 0.0
    return out


def node_swaps(picks: np.ndarray, load_row: np.ndarray, node_of: np.ndarray, N: int, *, gpn: int, slots: int,
               w_load: float, w_span: float, max_rounds: int = 40, candidates: int | None = None) -> np.ndarray:
    """Swap experts between nodes while ``w_load x max_n bound_n + w_span x sum of token node spans`` falls.

    ``bound_n`` is :func:`load_lower_bound` of node n's experts over its ``gpn`` ranks of ``slots``: no
    split of the node has a lighter heaviest rank (its load over the ranks, or its heaviest expert with
    the lightest others of a full rank), and the balancing inside the node then nearly attains it.

    Exact and incremental on the tokens of ``picks`` [T, K]: ``c[t, n]`` counts token t's picks on node n,
    so a swap of e (node A) and f (node B) changes the span of a token picking e but not f by
    ``[c[t, B] == 0] - [c[t, A] == 1]`` (and symmetrically). Candidates are screened by the sum of the
    two single moves' span changes (exact unless a token picks both) plus an estimate of the two nodes'
    bounds, the best ``candidates`` per round tried in order; each is kept only if the exact
    objective falls. Rounds, not the clock, bound the work, so the result is deterministic.
    """
    T, K = picks.shape
    E = load_row.size
    p = np.asarray(load_row, dtype=float)
    node_of = np.asarray(node_of, dtype=np.int64).copy()
    flat_e = picks.ravel()
    flat_t = np.repeat(np.arange(T, dtype=np.int64), K)
    ok = flat_e >= 0
    order = np.argsort(flat_e[ok], kind="stable")
    exp_sorted = flat_e[ok][order]
    tok_sorted = flat_t[ok][order]
    bounds = np.searchsorted(exp_sorted, np.arange(E + 1))
    members = [tok_sorted[bounds[e]: bounds[e + 1]] for e in range(E)]
    c = np.bincount(tok_sorted * N + node_of[exp_sorted], minlength=T * N).reshape(T, N).astype(np.int16)
    nl = np.bincount(node_of, weights=p, minlength=N)

    def node_bound(members_of: np.ndarray) -> float:  # the heaviest rank a node's experts force
        return load_lower_bound(p[members_of], gpn, slots) if members_of.size else 0.0

    q = np.array([node_bound(np.flatnonzero(node_of == n)) for n in range(N)])
    candidates = candidates or max(16, 2 * E)
    tol = 1e-12 * max(w_load * q.max() + w_span * T, 1e-300)
    upper = np.tri(E, dtype=bool)
    for _ in range(max_rounds):
        move = _node_move_gains(c, tok_sorted, exp_sorted, node_of, E, N)
        span_d = move[:, node_of] + move[:, node_of].T  # [e, f]: e -> node(f), f -> node(e)
        # screening estimate of each node's bound after a swap: its load spread over its ranks, or its
        # heaviest expert (e gone, f arrived) plus what the rest of that expert's rank held before
        top1, top2, arg1 = np.zeros(N), np.zeros(N), np.full(N, -1)
        for n in range(N):
            mine = np.flatnonzero(node_of == n)
            if mine.size:
                srt = mine[np.argsort(-p[mine], kind="stable")]
                arg1[n], top1[n] = srt[0], p[srt[0]]
                top2[n] = p[srt[1]] if srt.size > 1 else 0.0
        filler = np.maximum(q - top1, 0.0)  # the rest of the heaviest expert's rank, as bounded now
        pe = p[:, None] - p[None, :]
        na, nb = node_of[:, None], node_of[None, :]
        ids = np.arange(E)
        hot_a = np.maximum(np.where(ids[:, None] == arg1[na], top2[na], top1[na]), p[None, :])
        hot_b = np.maximum(np.where(ids[None, :] == arg1[nb], top2[nb], top1[nb]), p[:, None])
        new_a = np.maximum((nl[na] - pe) / gpn, hot_a + filler[na])
        new_b = np.maximum((nl[nb] + pe) / gpn, hot_b + filler[nb])
        top = q.max()
        order_n = np.argsort(q, kind="stable")[::-1]
        m1, m2, m3 = (q[order_n[i]] if i < N else 0.0 for i in range(3))
        rest = np.where((na != order_n[0]) & (nb != order_n[0]), m1,  # the heaviest node other than A and B
                        np.where((na != order_n[1]) & (nb != order_n[1]), m2, m3))
        delta = w_span * span_d + w_load * (np.maximum(np.maximum(new_a, new_b), rest) - top)
        delta[(na == nb) | upper] = np.inf
        touched: set[int] = set()
        improved = False
        for i, j in improving_pairs(delta, candidates):
            if i in touched or j in touched:
                continue
            A, B = node_of[i], node_of[j]
            ti, tj = members[i], members[j]
            ti = ti[~(picks[ti] == j).any(axis=1)]  # tokens picking i but not j
            tj = tj[~(picks[tj] == i).any(axis=1)]
            ds = (int(np.count_nonzero(c[ti, B] == 0)) - int(np.count_nonzero(c[ti, A] == 1))
                  + int(np.count_nonzero(c[tj, A] == 0)) - int(np.count_nonzero(c[tj, B] == 1)))
            node_of[i], node_of[j] = B, A
            q2 = q.copy()
            q2[A] = node_bound(np.flatnonzero(node_of == A))
            q2[B] = node_bound(np.flatnonzero(node_of == B))
            d = w_span * ds + w_load * (q2.max() - q.max())
            if d < -tol:
                c[ti, A] -= 1
                c[ti, B] += 1
                c[tj, B] -= 1
                c[tj, A] += 1
                nl[A] += p[j] - p[i]
                nl[B] += p[i] - p[j]
                q = q2
                touched.update((i, j))
                improved = True
            else:
                node_of[i], node_of[j] = A, B
        if not improved:
            break
    return node_of


def split_nodes(load_row: np.ndarray, node_of: np.ndarray, gpn: int, slots: int) -> np.ndarray:
    """Ranks for a node partition: each node's experts balanced over its ``gpn`` ranks (LPT + swaps)."""
    a = np.empty(node_of.size, dtype=np.int64)
    for n in np.unique(node_of):
        mine = np.flatnonzero(node_of == n)
        row = np.asarray(load_row, dtype=float)[mine]
        a[mine] = n * gpn + improve_layer(row, lpt(row, gpn, slots), gpn, slots)
    return a


def place_nodes_first(problem: PlacementProblem, balanced: np.ndarray, cm: CostModel, *,
                      deadline: float) -> tuple[np.ndarray, int]:
    """Per layer, nodes first (:func:`node_swaps` from the contiguous node partition and from the balanced
    placement's), then ranks within each node; the best of those and ``balanced`` by the exact layer terms.

    Returns the placement and the number of layers searched (all of them unless ``deadline`` passed).
    """
    L, E, G, gpn, s = (problem.num_layers, problem.num_experts, problem.num_gpus, problem.gpus_per_node,
                       problem.slots_per_gpu)
    N = problem.num_nodes
    if G % gpn:  # nodes of unequal size: keep the balanced placement (the term is still counted)
        return balanced, 0
    out = balanced.copy()
    w_load = cm.w_compute * cm.t_pair  # on the heaviest rank a node's experts force
    w_span = dispatch_scale(problem, cm)
    contiguous = np.arange(E) * N // E
    searched = 0
    for l in range(L):
        if time.perf_counter() > deadline:
            break
        searched += 1
        picks = _picks(problem, l)
        stride = -(-picks.shape[0] // _SEARCH_TOKENS)  # every stride-th token stands for stride of them
        best, best_val = balanced[l], _layer_value(problem, l, balanced[l], cm)
        for start in (contiguous, balanced[l] // gpn):
            node_of = node_swaps(picks[::stride], problem.load[l], start, N, gpn=gpn, slots=s, w_load=w_load,
                                 w_span=w_span * stride)
            a = split_nodes(problem.load[l], node_of, gpn, s)
            val = _layer_value(problem, l, a, cm)
            if val < best_val:
                best, best_val = a, val
        out[l] = best
    return out, searched


# ----------------------------------------------------------------------------------------------------
# alignment of consecutive layers: assignment problems


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


def _align_cost(problem: PlacementProblem, assign: np.ndarray, l: int, cm: CostModel) -> np.ndarray:
    """[c, g]: linear (mean-send) cost of moving layer l's rank-c cluster onto rank g, neighbours fixed."""
    G = problem.num_gpus
    R = problem.transition_counts()
    onehot = np.eye(G)[assign[l]]  # [E, G]: expert -> current label c
    cost = np.zeros((G, G))
    if l > 0:
        prev = np.eye(G)[assign[l - 1]]
        T = prev.T @ R[l - 1] @ onehot  # [g', c]: tokens from rank g' (layer l-1) to cluster c
        cost += T.T @ cm.s  # [c, g]
    if l < problem.num_layers - 1:
        nxt = np.eye(G)[assign[l + 1]]
        T = onehot.T @ R[l] @ nxt  # [c, g']
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
    order = list(range(1, L)) + [l for _ in range(sweeps - 1) for l in (*range(L - 2, -1, -1), *range(1, L))]
    for l in order:
        if time.perf_counter() > deadline:
            break
        col = linear_assignment(_align_cost(problem, out, l, cm))
        trial = col[out[l]]
        if np.array_equal(trial, out[l]):
            continue
        before = sum(pair_cost(R[k], out[k], out[k + 1], cm) for k in (l - 1, l) if 0 <= k < L - 1)
        new = out.copy()
        new[l] = trial
        after = sum(pair_cost(R[k], new[k], new[k + 1], cm) for k in (l - 1, l) if 0 <= k < L - 1)
        if after < before:
            out = new
    return out


# ----------------------------------------------------------------------------------------------------
# affinity swaps


def _layer_terms(problem: PlacementProblem, assign: np.ndarray, l: int, cm: CostModel) -> float:
    """Every objective term that depends on layer l's placement."""
    R = problem.transition_counts()
    G, L = problem.num_gpus, problem.num_layers
    total = cm.w_compute * cm.t_pair * layer_max_load(problem.load[l], assign[l], G)
    for k in (l - 1, l):
        if 0 <= k < L - 1:
            total += pair_cost(R[k], assign[k], assign[k + 1], cm)
    return total


def affinity_swaps(problem: PlacementProblem, assign: np.ndarray, cm: CostModel, *, deadline: float,
                   sweeps: int = 2, rounds: int = 4, candidates: int | None = None) -> np.ndarray:
    """Swap experts of one layer between ranks while the exact joint objective falls.

    Per layer and round, candidates are screened by a first-order estimate - the change of the mean
    send time (linear in the swap, the neighbouring layers being fixed) plus the change of the heaviest
    rank's load - and the best ``candidates`` pairs are tried in order, each kept only if the exact
    objective terms of the layer fall (updated in O(experts) per try). Iteration counts, not the clock,
    bound the work (``deadline`` is a safety net), so the result does not depend on the machine.
    """
    L, G, E = problem.num_layers, problem.num_gpus, problem.num_experts
    if L < 2 or cm.w_affinity + cm.w_comm == 0 or not problem.transition_counts().any():
        return assign
    R = problem.transition_counts()
    out = assign.copy()
    candidates = candidates or max(8, min(E, 2 * G))
    wl = cm.w_compute * cm.t_pair
    for _ in range(sweeps):
        changed = False
        for l in range(L):
            if time.perf_counter() > deadline:
                return out
            p = problem.load[l]
            a = out[l].copy()
            # exact state of the layer's terms: rank loads, sends into layer l, sends out of layer l
            h_out = R[l] @ cm.s[:, out[l + 1]].T * cm.bytes if l < L - 1 else np.zeros((E, G))  # [e, g]
            prev = out[l - 1] if l > 0 else None
            h_in = R[l - 1].T @ cm.s[prev] * cm.bytes if l > 0 else np.zeros((E, G))  # [e, g]: into e on g
            bl = np.bincount(a, weights=p, minlength=G)
            s_out = np.bincount(a, weights=h_out[np.arange(E), a], minlength=G)
            if l > 0:
                per_prev = (R[l - 1] * cm.s[prev][:, a]).sum(axis=1) * cm.bytes  # [e'] send of layer l-1 experts
                s_in = np.bincount(prev, weights=per_prev, minlength=G)

            def terms(bl: np.ndarray, s_in: np.ndarray | None, s_out: np.ndarray) -> float:
                val = wl * bl.max()
                for sd in ((s_in, s_out) if s_in is not None else (s_out,)):
                    if l < L - 1 or sd is s_in:
                        val += cm.w_comm * sd.max() + cm.w_affinity * sd.mean()
                return val

            s_in_cur = s_in if l > 0 else None
            cur = terms(bl, s_in_cur, s_out)
            h = (h_out + h_in) * (cm.w_affinity + cm.w_comm) / G  # screening: linear in the swap
            for _ in range(rounds):
                X = h[:, a]  # X[e, e'] = h[e, rank of e']
                d = np.diag(X)
                delta = X + X.T - d[:, None] - d[None, :]
                top = np.argsort(bl)[::-1]
                m1, m2 = bl[top[0]], bl[top[1]] if G > 1 else 0.0
                dp = p[:, None] - p[None, :]
                new_i = bl[a][:, None] - dp  # rank of e after e leaves and e' arrives
                new_j = bl[a][None, :] + dp
                rest = np.where((a[:, None] == top[0]) | (a[None, :] == top[0]), m2, m1)
                delta += wl * (np.maximum(np.maximum(new_i, new_j), rest) - m1)
                delta[(a[:, None] == a[None, :]) | np.tri(E, dtype=bool)] = np.inf
                touched: set[int] = set()
                improved = False
                for i, j in improving_pairs(delta, candidates):
                    if i in touched or j in touched:
                        continue
                    gi, gj = a[i], a[j]
                    bl2 = bl.copy()
                    bl2[gi] += p[j] - p[i]
                    bl2[gj] += p[i] - p[j]
                    so2 = s_out.copy()
                    so2[gi] += h_out[j, gi] - h_out[i, gi]
                    so2[gj] += h_out[i, gj] - h_out[j, gj]
                    si2 = None
                    if l > 0:
                        change = (R[l - 1][:, i] - R[l - 1][:, j]) * (cm.s[prev, gj] - cm.s[prev, gi]) * cm.bytes
                        si2 = s_in_cur + np.bincount(prev, weights=change, minlength=G)
                    val = terms(bl2, si2, so2)
                    if val < cur - 1e-12 * max(cur, 1e-300):
                        a[i], a[j] = gj, gi
                        bl, s_out, s_in_cur, cur = bl2, so2, si2, val
                        improved = changed = True
                        touched.update((i, j))
                if not improved:
                    break
            out[l] = a
        if not changed:
            break
    return out


# ----------------------------------------------------------------------------------------------------
# exact chain DP over symmetry-reduced layer states


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
    E, G, gpn, s = problem.num_experts, problem.num_gpus, problem.gpus_per_node, problem.slots_per_gpu
    if E != s * G or G % gpn:
        return None
    N = G // gpn
    states = _count_partitions(E, s * gpn) * _count_partitions(s * gpn, s) ** N
    relabel = math.factorial(N) * math.factorial(gpn) ** N
    if states * relabel * E * G > _DP_CELLS:  # the labelled next placements would not fit in memory
        return None
    return states * states * relabel


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
    E, G, gpn, s, L = (problem.num_experts, problem.num_gpus, problem.gpus_per_node, problem.slots_per_gpu,
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
    for l in range(L - 1):
        # Two-tier cost: e on rank g pays s_in for each pick of f off g, and s_out - s_in more off g's node.
        ry = (R[l] @ nxt_onehot).reshape(E, G, -1)  # [E, G, B]: e's picks landing on each rank
        out = R[l].sum(axis=1)[None, :, None]  # [1, E, 1]: e's picks in all
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
        value = bv[np.arange(S), ba] + loads[l + 1]
        back[l + 1, :, 0] = best.reshape(S, A)[np.arange(S), ba]
        back[l + 1, :, 1] = ba
    q = int(np.argmin(value))
    chain = [(q, 0)]
    for l in range(L - 1, 0, -1):
        i, a = back[l, q]
        chain.append((int(i), int(a)))
        q = int(i)
    chain.reverse()  # chain[l] = (state at l, relabelling from l's frame to l+1's)
    assign = np.empty((L, E), dtype=np.int64)
    phi = np.arange(G)
    for l in range(L):
        st, _ = chain[l]
        assign[l] = phi[states[st]]
        if l < L - 1:
            phi = phi[perms[chain[l][1]]]
    return assign


# ----------------------------------------------------------------------------------------------------
# the joint ILP in PuLP


def joint_model(problem: PlacementProblem, cm: CostModel, layers: range | None = None,
                fixed: dict[int, np.ndarray] | None = None) -> tuple[pulp.LpProblem, dict[tuple[int, int, int], Any]]:
    """The monolithic MoETuner-style ILP (module docstring) over ``layers``; ``fixed`` pins some layers.

    Needs a two-tier cost (``CostModel.two_tier``). Returns the model and its ``x[l, e, g]`` binaries.
    """
    tiers = cm.two_tier
    if tiers is None:
        raise InputError("the joint ILP needs same-node and cross-node costs that are uniform per tier",
                         field="rank_s_per_byte")
    s_in, s_out = tiers
    E, G, gpn, slots = problem.num_experts, problem.num_gpus, problem.gpus_per_node, problem.slots_per_gpu
    layers = layers if layers is not None else range(problem.num_layers)
    Ls = list(layers)
    R = problem.transition_counts()
    N = -(-G // gpn)
    m = pulp.LpProblem("moetuner_joint", pulp.LpMinimize)
    x = {(l, e, g): new_var(m, f"x_{l}_{e}_{g}", 0, 1, cat="Binary") for l in Ls for e in range(E) for g in range(G)}
    objective = []
    for l in Ls:
        C = new_var(m, f"C_{l}", 0)
        for e in range(E):
            m += pulp.lpSum(x[l, e, g] for g in range(G)) == 1, f"one_rank_{l}_{e}"
        for g in range(G):
            m += pulp.lpSum(x[l, e, g] for e in range(E)) <= slots, f"slots_{l}_{g}"
            m += C >= pulp.lpSum(float(problem.load[l, e]) * x[l, e, g] for e in range(E)), f"tail_{l}_{g}"
        objective.append(cm.w_compute * cm.t_pair * C)
        if fixed and l in fixed:
            for e in range(E):
                m += x[l, e, int(fixed[l][e])] == 1, f"fixed_{l}_{e}"
    if problem.memory_slots is not None:
        for g in range(G):
            m += pulp.lpSum(x[l, e, g] for l in Ls for e in range(E)) <= problem.memory_slots, f"memory_{g}"
    for l in Ls[:-1]:
        if cm.w_comm == 0 and cm.w_affinity == 0:
            break
        send: list[list[Any]] = [[] for _ in range(G)]
        for e, f in zip(*np.nonzero(R[l])):
            w = float(R[l, e, f]) * cm.bytes
            for g in range(G):
                d = new_var(m, f"d_{l}_{e}_{f}_{g}", 0)
                m += d >= x[l, e, g] - x[l + 1, f, g]
                send[g].append(w * s_in * d)
                if N > 1 and s_out != s_in:
                    n = g // gpn
                    q = new_var(m, f"q_{l}_{e}_{f}_{g}", 0)
                    m += q >= x[l, e, g] - pulp.lpSum(x[l + 1, f, h] for h in range(n * gpn, min(G, (n + 1) * gpn)))
                    send[g].append(w * (s_out - s_in) * q)
        M = new_var(m, f"M_{l}", 0)
        for g in range(G):
            m += M >= pulp.lpSum(send[g]), f"send_{l}_{g}"
        objective.append(cm.w_comm * M + cm.w_affinity / G * pulp.lpSum(t for row in send for t in row))
    if not fixed or Ls[0] not in fixed:  # symmetry: ranks are interchangeable, so expert 0 starts on rank 0
        m += x[Ls[0], 0, 0] == 1, "symmetry"
        if N == 1:
            for e in range(E):
                for g in range(e + 1, G):
                    m += x[Ls[0], e, g] == 0, f"symmetry_{e}_{g}"
    m += pulp.lpSum(objective)
    return m, x


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
    G, gpn = problem.num_gpus, problem.gpus_per_node
    start = _canonical(incumbent, gpn, G) if G % gpn == 0 else incumbent
    for (l, e, g), var in x.items():
        var.setInitialValue(1 if start[l, e] == g else 0)
    inc_val = evaluate(problem, start, cm).total
    res = solve(model, solver=solver, time_limit_s=time_limit_s, gap=gap, incumbent=inc_val * (1 + 1e-9),
                warm_start=True)
    if res.status == "infeasible" and res.objective is None and not np.isfinite(res.bound):
        raise InputError("joint ILP infeasible", field="memory_slots")
    best = start
    if res.objective is not None:
        sol = np.zeros_like(start)
        for (l, e, g), var in x.items():
            if (var.value() or 0) > 0.5:
                sol[l, e] = g
        if evaluate(problem, sol, cm).total < inc_val:
            best = sol
    return best, res.bound, res.status


# ----------------------------------------------------------------------------------------------------
# replicas (redundant_experts > 0): counts and packing chosen together, per layer, load term only


def replica_hood_model(load_row: np.ndarray, held: np.ndarray, hood: np.ndarray, slots: int,
                       max_copies: int, grow: int | None = None) -> tuple[pulp.LpProblem, Any, Callable[[], np.ndarray]]:
    """The MILP that re-places every copy on the GPUs ``hood`` of one layer (module docstring, replicas).

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
    counts = []
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

    Per layer, replica counts and packing together (module docstring, replicas), from greedy's answer
    (:func:`moesim.placement.replication.replicate_and_pack`), which is kept for any layer where it is
    better, so the result is never worse than ``greedy`` with the same N.
    """
    t0 = time.perf_counter()
    check_options(method, time_limit_s, gap)
    check_feasible(problem)
    L, E, G = problem.num_layers, problem.num_experts, problem.num_gpus
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
    greedy_ub = np.array([copy_loads(load[l], greedy[l]).max() for l in range(L)])
    rng = np.random.default_rng(problem.seed)
    held = np.empty_like(greedy)
    ub, lb = np.zeros(L), np.zeros(L)
    statuses, kept_greedy = [], 0
    deadline = t0 + 0.95 * time_limit_s
    for l in range(L):
        now = time.perf_counter()
        layer_deadline = now + max(0.0, deadline - now) / (L - l)
        start = place_missing(load[l], greedy[l], counts[l], slots)
        held[l], ub[l], lb[l], st = balance_replicated_layer(
            load[l], start, slots, max_copies, solver=solver_name, gap=gap * 0.5, deadline=layer_deadline,
            rng=rng, whole=whole)
        if greedy_ub[l] < ub[l]:  # greedy merged a twin and came out lighter: keep its answer
            held[l], ub[l], kept_greedy = greedy[l], greedy_ub[l], kept_greedy + 1
        lb[l] = min(lb[l], ub[l])
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


# ----------------------------------------------------------------------------------------------------
# the policy


def check_feasible(problem: PlacementProblem) -> None:
    """One-line InputError naming the constraint an instance cannot meet."""
    E, G, s, L = problem.num_experts, problem.num_gpus, problem.slots_per_gpu, problem.num_layers
    if E > s * G:
        raise InputError(f"infeasible: {E} experts do not fit {G} ranks x {s} slots per layer", field="slots_per_gpu")
    if problem.memory_slots is not None and problem.memory_slots * G < L * E:
        raise InputError(f"infeasible: {L} layers x {E} experts need {L * E} expert copies, memory holds "
                         f"{problem.memory_slots} per rank x {G} ranks", field="memory_slots")
    if problem.memory_slots is not None and problem.memory_slots < L * s:
        # feasible only with per-layer counts balanced across layers, which these policies do not plan
        raise InputError(f"memory holds {problem.memory_slots} expert copies per rank, under {L} layers x {s} "
                         "slots; add ranks or memory", field="memory_slots")
    if problem.load.shape != (L, E):
        raise InputError(f"load must be [{L}, {E}], got {list(problem.load.shape)}", field="load")


def check_options(method: str, time_limit_s: float, gap: float) -> None:
    if method not in METHODS:
        raise InputError(f"must be one of {', '.join(METHODS)}, got {method!r}", field="method")
    if not time_limit_s > 0:
        raise InputError(f"must be > 0, got {time_limit_s!r}", field="time_limit_s")
    if not 0 <= gap < 1:
        raise InputError(f"must be in [0, 1), got {gap!r}", field="gap")


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


def objective_lower_bound(problem: PlacementProblem, cm: CostModel, load_lb: np.ndarray) -> float:
    """Sum of separate proven bounds: compute tail per layer, and the traffic no placement can keep local.

    A layer-l expert shares a rank with at most ``slots`` experts of layer l+1 (a node with at most
    ``slots x ranks per node``), so at most the top ``slots`` of its row of R stays on its rank (and
    likewise per column); the rest pays at least the cheapest same-node cost, and what cannot stay in the
    node at least the cheapest cross-node cost. The busiest rank sends at least the mean. Plus the
    dispatch term's bound (:func:`dispatch_lower_bound`).
    """
    L, G, s, gpn = problem.num_layers, problem.num_gpus, problem.slots_per_gpu, problem.gpus_per_node
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

    for l in range(L - 1):
        moved_rank = max(0.0, R[l].sum() - kept(R[l], s))
        moved_node = max(0.0, R[l].sum() - kept(R[l], s * gpn)) if other.any() else 0.0
        cost = (s_in * moved_rank + (s_out - s_in) * moved_node) * cm.bytes
        total += (cm.w_comm + cm.w_affinity) * cost / G
    return total


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
    L, G, s = problem.num_layers, problem.num_gpus, problem.slots_per_gpu
    greedy = np.stack([lpt(problem.load[l], G, s) for l in range(L)])
    greedy_total = evaluate(problem, greedy, cm).total
    load_lb = np.array([load_lower_bound(problem.load[l], G, s) for l in range(L)])
    dp = chain_dp_size(problem)
    use_dp = dp is not None and cm.two_tier is not None and cm.w_dispatch == 0 and (
        method == "exact" or (method == "auto" and dp <= _DP_LIMIT))
    if method == "exact" and not use_dp:
        raise InputError("method exact needs experts = ranks x slots, two-tier costs, no dispatch term and a small instance "
                         f"(states^2 x relabellings <= {_DP_LIMIT}, states x relabellings x experts x ranks <= "
                         f"{_DP_CELLS}); use auto or decompose", field="method")
    if use_dp:
        assign = chain_dp(problem, cm)
        total = evaluate(problem, assign, cm).total
        load_lower = float(load_lb.sum()) * cm.t_pair * cm.w_compute
        if cm.w_comm == 0 and cm.w_affinity == 0:  # the load term is the whole objective: the DP proved it too
            load_lower = total
        info = solve_info(problem, assign, cm, lower=total, load_lower=load_lower,
                     greedy_total=greedy_total, method="exact_dp", solver="numpy", status="optimal",
                     seconds=time.perf_counter() - t0)
        return assign, info
    # decomposition: balance each layer, align layers, trade experts for affinity
    balanced = np.empty_like(greedy)
    for l in range(L):
        a, _, lb = balance_layer(problem.load[l], G, s, gap=gap * 0.5, solver=solver_name,
                                 deadline=t0 + 0.5 * time_limit_s)
        balanced[l] = a
        load_lb[l] = max(load_lb[l], lb)
    used, searched = "decompose", None
    if cm.w_dispatch:  # nodes first: group what tokens pick together on few nodes, then balance inside
        balanced, searched = place_nodes_first(problem, balanced, cm, deadline=t0 + 0.7 * time_limit_s)
        used = "nodes_first"
    # one forward sweep on large clusters: the Hungarian is O(ranks^3) and later sweeps gain little there
    assign = align_layers(problem, balanced, cm, sweeps=2 if G <= 16 else 1, deadline=t0 + 0.7 * time_limit_s)
    assign = affinity_swaps(problem, assign, cm, deadline=t0 + 0.9 * time_limit_s)
    if cm.w_dispatch and assign is not balanced and evaluate(problem, assign, cm).total > evaluate(problem, balanced, cm).total:
        assign = balanced  # the traffic stages do not see the dispatch term: keep their result only if it helps
    lower = objective_lower_bound(problem, cm, load_lb)
    status = "heuristic"
    if method == "joint":
        size = (L * problem.num_experts * G
                + G * sum(int(np.count_nonzero(r)) for r in problem.transition_counts()) * (2 if G > problem.gpus_per_node else 1))
        if size > _JOINT_LIMIT:
            raise InputError(f"method joint would build {size} variables (limit {_JOINT_LIMIT}); the monolithic ILP is "
                             "for small instances: use auto or decompose", field="method")
        before = assign
        assign, bound, status = solve_joint(problem, cm, assign, solver=solver_name, gap=gap,
                                            time_limit_s=max(0.05, deadline - time.perf_counter()))
        lower = max(lower, bound) if np.isfinite(bound) else lower  # also bounds the objective with dispatch
        used = "joint"
        if cm.w_dispatch:  # the joint model has no dispatch term: its optimum proves nothing about ours
            status = "time_limit" if status == "time_limit" else "heuristic"
            if evaluate(problem, before, cm).total < evaluate(problem, assign, cm).total:
                assign, used = before, "nodes_first"
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


@register("ilp", replicas="redundant_experts")
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
    return Placement.from_assignment(assign, problem.num_gpus, "ilp", info)
