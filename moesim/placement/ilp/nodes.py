"""Nodes first (docs/ilp.md, "How it scales", nodes first): the standard dataflow's dispatch on many nodes.

Per layer, experts go to nodes by swaps that lower the compute-tail bound plus the token node spans
(counted exactly and incrementally on a sample of the profile's tokens), then each node's experts are
balanced over its ranks. Ignores the cross-layer traffic terms (the stages after it see those) and nodes
of unequal size (the balanced placement is kept).
"""

from __future__ import annotations

import time

import numpy as np

from moesim.placement.ilp.balance import improve_layer, load_lower_bound
from moesim.placement.ilp.costs import CostModel, dispatch_scale, layer_max_load, layer_picks, spans
from moesim.placement.ilp.search import screened_swaps
from moesim.placement.policies import lpt
from moesim.placement.registry import PlacementProblem

_SEARCH_TOKENS = 32_768  # profile tokens the node search counts (every k-th); the final choice counts all


def _layer_value(problem: PlacementProblem, layer: int, a: np.ndarray, cm: CostModel) -> float:
    """Compute tail + dispatch term of layer l under placement row ``a`` (exact, on every profile token)."""
    G, gpn = problem.num_ranks, problem.gpus_per_node
    val = cm.w_compute * cm.t_pair * layer_max_load(problem.load[layer], a, G)
    if cm.w_dispatch:
        owner = a // gpn if cm.copies == "node" else a
        val += dispatch_scale(problem, cm) * float(spans(layer_picks(problem, layer), owner).sum())
    return val


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
    search = _NodeSwaps(picks, load_row, node_of, N, gpn=gpn, slots=slots, w_load=w_load, w_span=w_span)
    screened_swaps(search, candidates or max(16, 2 * search.E), max_rounds)
    return search.node_of


class _NodeSwaps:
    """:func:`node_swaps`'s state: each expert's node, per token its picks on each node (``c``), and per
    node its load (``nl``) and the bound on its heaviest rank (``q``)."""

    def __init__(self, picks: np.ndarray, load_row: np.ndarray, node_of: np.ndarray, N: int, *, gpn: int,
                 slots: int, w_load: float, w_span: float) -> None:
        T, K = picks.shape
        E = load_row.size
        self.picks, self.E, self.N, self.gpn, self.slots = picks, E, N, gpn, slots
        self.w_load, self.w_span = w_load, w_span
        self.p = np.asarray(load_row, dtype=float)
        self.node_of = np.asarray(node_of, dtype=np.int64).copy()
        flat_e = picks.ravel()
        flat_t = np.repeat(np.arange(T, dtype=np.int64), K)
        ok = flat_e >= 0
        order = np.argsort(flat_e[ok], kind="stable")
        self.exp_sorted = flat_e[ok][order]
        self.tok_sorted = flat_t[ok][order]
        bounds = np.searchsorted(self.exp_sorted, np.arange(E + 1))
        self.members = [self.tok_sorted[bounds[e]: bounds[e + 1]] for e in range(E)]  # tokens picking e
        self.c = np.bincount(self.tok_sorted * N + self.node_of[self.exp_sorted],
                             minlength=T * N).reshape(T, N).astype(np.int16)
        self.nl = np.bincount(self.node_of, weights=self.p, minlength=N)
        self.q = np.array([self.node_bound(n) for n in range(N)])
        self.tol = 1e-12 * max(w_load * self.q.max() + w_span * T, 1e-300)
        self.upper = np.tri(E, dtype=bool)

    def node_bound(self, n: int) -> float:
        """The heaviest rank node n's experts force."""
        members_of = np.flatnonzero(self.node_of == n)
        return load_lower_bound(self.p[members_of], self.gpn, self.slots) if members_of.size else 0.0

    def screen(self) -> np.ndarray:
        """[e, f]: the two single moves' exact span changes plus the estimated change of the heaviest bound."""
        node_of = self.node_of
        move = _node_move_gains(self.c, self.tok_sorted, self.exp_sorted, node_of, self.E, self.N)
        span_d = move[:, node_of] + move[:, node_of].T  # [e, f]: e -> node(f), f -> node(e)
        na, nb = node_of[:, None], node_of[None, :]
        top = self.q.max()
        delta = self.w_span * span_d + self.w_load * (self.heaviest_after_swap() - top)
        delta[(na == nb) | self.upper] = np.inf
        return delta

    def heaviest_after_swap(self) -> np.ndarray:
        """[e, f] screening estimate of the heaviest node bound after e and f swap nodes.

        Each of the two nodes' bounds: its load spread over its ranks, or its heaviest expert (e gone, f
        arrived) plus what the rest of that expert's rank held before; the other nodes keep theirs.
        """
        p, q, N, gpn, nl = self.p, self.q, self.N, self.gpn, self.nl
        top1, top2, arg1 = _heaviest_two(p, self.node_of, N)
        filler = np.maximum(q - top1, 0.0)  # the rest of the heaviest expert's rank, as bounded now
        pe = p[:, None] - p[None, :]
        na, nb = self.node_of[:, None], self.node_of[None, :]
        ids = np.arange(self.E)
        hot_a = np.maximum(np.where(ids[:, None] == arg1[na], top2[na], top1[na]), p[None, :])
        hot_b = np.maximum(np.where(ids[None, :] == arg1[nb], top2[nb], top1[nb]), p[:, None])
        new_a = np.maximum((nl[na] - pe) / gpn, hot_a + filler[na])
        new_b = np.maximum((nl[nb] + pe) / gpn, hot_b + filler[nb])
        order_n = np.argsort(q, kind="stable")[::-1]
        m1, m2, m3 = (q[order_n[i]] if i < N else 0.0 for i in range(3))
        rest = np.where((na != order_n[0]) & (nb != order_n[0]), m1,  # the heaviest node other than A and B
                        np.where((na != order_n[1]) & (nb != order_n[1]), m2, m3))
        return np.maximum(np.maximum(new_a, new_b), rest)

    def try_swap(self, i: int, j: int) -> bool:
        """Swap experts i and j between their nodes if the exact objective falls; whether it did."""
        node_of, c, p = self.node_of, self.c, self.p
        A, B = node_of[i], node_of[j]
        ti, tj = self.members[i], self.members[j]
        ti = ti[~(self.picks[ti] == j).any(axis=1)]  # tokens picking i but not j
        tj = tj[~(self.picks[tj] == i).any(axis=1)]
        ds = (int(np.count_nonzero(c[ti, B] == 0)) - int(np.count_nonzero(c[ti, A] == 1))
              + int(np.count_nonzero(c[tj, A] == 0)) - int(np.count_nonzero(c[tj, B] == 1)))
        node_of[i], node_of[j] = B, A
        q2 = self.q.copy()
        q2[A] = self.node_bound(A)
        q2[B] = self.node_bound(B)
        d = self.w_span * ds + self.w_load * (q2.max() - self.q.max())
        if not d < -self.tol:
            node_of[i], node_of[j] = A, B
            return False
        c[ti, A] -= 1
        c[ti, B] += 1
        c[tj, B] -= 1
        c[tj, A] += 1
        self.nl[A] += p[j] - p[i]
        self.nl[B] += p[i] - p[j]
        self.q = q2
        return True


def _heaviest_two(p: np.ndarray, node_of: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per node: its heaviest expert's load, the second heaviest's (0 if none) and the heaviest's id (-1)."""
    top1, top2, arg1 = np.zeros(N), np.zeros(N), np.full(N, -1)
    for n in range(N):
        mine = np.flatnonzero(node_of == n)
        if mine.size:
            srt = mine[np.argsort(-p[mine], kind="stable")]
            arg1[n], top1[n] = srt[0], p[srt[0]]
            top2[n] = p[srt[1]] if srt.size > 1 else 0.0
    return top1, top2, arg1


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
    L, E, G, gpn, s = (problem.num_layers, problem.num_experts, problem.num_ranks, problem.gpus_per_node,
                       problem.slots_per_gpu)
    N = problem.num_nodes
    if G % gpn:  # nodes of unequal size: keep the balanced placement (the term is still counted)
        return balanced, 0
    out = balanced.copy()
    w_load = cm.w_compute * cm.t_pair  # on the heaviest rank a node's experts force
    w_span = dispatch_scale(problem, cm)
    contiguous = np.arange(E) * N // E
    searched = 0
    for layer in range(L):
        if time.perf_counter() > deadline:
            break
        searched += 1
        picks = layer_picks(problem, layer)
        stride = -(-picks.shape[0] // _SEARCH_TOKENS)  # every stride-th token stands for stride of them
        best, best_val = balanced[layer], _layer_value(problem, layer, balanced[layer], cm)
        for start in (contiguous, balanced[layer] // gpn):
            node_of = node_swaps(picks[::stride], problem.load[layer], start, N, gpn=gpn, slots=s, w_load=w_load,
                                 w_span=w_span * stride)
            a = split_nodes(problem.load[layer], node_of, gpn, s)
            val = _layer_value(problem, layer, a, cm)
            if val < best_val:
                best, best_val = a, val
        out[layer] = best
    return out, searched
