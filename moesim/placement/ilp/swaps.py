"""Affinity swaps (docs/ilp.md, "How it scales", affinity swaps): experts of one layer trade ranks.

A swap is kept when the exact terms of its layer (compute tail, sends into and out of it) fall; the
candidates are screened by a first-order estimate. Ignores the dispatch term (the policy keeps the
result only where the whole objective falls).
"""

from __future__ import annotations

import time

import numpy as np

from moesim.placement.ilp.costs import CostModel
from moesim.placement.ilp.search import screened_swaps
from moesim.placement.registry import PlacementProblem


def affinity_swaps(problem: PlacementProblem, assign: np.ndarray, cm: CostModel, *, deadline: float,
                   sweeps: int = 2, rounds: int = 4, candidates: int | None = None) -> np.ndarray:
    """Swap experts of one layer between ranks while the exact joint objective falls.

    Per layer and round, candidates are screened by a first-order estimate - the change of the mean
    send time (linear in the swap, the neighbouring layers being fixed) plus the change of the heaviest
    rank's load - and the best ``candidates`` pairs are tried in order, each kept only if the exact
    objective terms of the layer fall (updated in O(experts) per try). Iteration counts, not the clock,
    bound the work (``deadline`` is a safety net), so the result does not depend on the machine.
    """
    L, G, E = problem.num_layers, problem.num_ranks, problem.num_experts
    if L < 2 or cm.w_affinity + cm.w_comm == 0 or not problem.transition_counts().any():
        return assign
    out = assign.copy()
    candidates = candidates or max(8, min(E, 2 * G))
    for _ in range(sweeps):
        changed = False
        for layer in range(L):
            if time.perf_counter() > deadline:
                return out
            search = _LayerSwaps(problem, out, layer, cm)
            changed = screened_swaps(search, candidates, rounds) or changed
            out[layer] = search.a
        if not changed:
            break
    return out


class _LayerSwaps:
    """The exact objective terms of layer l's placement ``a``, the neighbouring layers fixed: rank loads
    (``bl``), sends out of layer l (``s_out``) and into it (``s_in``, from layer l-1), and their value."""

    def __init__(self, problem: PlacementProblem, out: np.ndarray, layer: int, cm: CostModel) -> None:
        L, G, E = problem.num_layers, problem.num_ranks, problem.num_experts
        R = problem.transition_counts()
        self.cm, self.G, self.E, self.has_next = cm, G, E, layer < L - 1
        self.wl = cm.w_compute * cm.t_pair
        self.p = p = problem.load[layer]
        self.a = a = out[layer].copy()
        self.h_out = R[layer] @ cm.s[:, out[layer + 1]].T * cm.bytes if layer < L - 1 else np.zeros((E, G))  # [e, g]
        self.bl = np.bincount(a, weights=p, minlength=G)
        self.s_out = np.bincount(a, weights=self.h_out[np.arange(E), a], minlength=G)
        # from layer l-1 (none into layer 0): its placement and transitions, and the sends into layer l
        self.into: tuple[np.ndarray, np.ndarray] | None = None
        self.s_in: np.ndarray | None = None
        h_in = np.zeros((E, G))  # [e, g]: into e on g
        if layer > 0:
            prev, r_in = out[layer - 1], R[layer - 1]
            self.into = prev, r_in
            h_in = r_in.T @ cm.s[prev] * cm.bytes
            per_prev = (r_in * cm.s[prev][:, a]).sum(axis=1) * cm.bytes  # [e'] send of layer l-1 experts
            self.s_in = np.bincount(prev, weights=per_prev, minlength=G)
        self.cur = self.terms(self.bl, self.s_in, self.s_out)
        self.h = (self.h_out + h_in) * (cm.w_affinity + cm.w_comm) / G  # screening: linear in the swap

    def terms(self, bl: np.ndarray, s_in: np.ndarray | None, s_out: np.ndarray) -> float:
        """Compute tail, then the sends into the layer (if any), then out of it (if a next layer)."""
        cm = self.cm
        val = self.wl * bl.max()
        if s_in is not None:
            val += cm.w_comm * s_in.max() + cm.w_affinity * s_in.mean()
        if self.has_next:
            val += cm.w_comm * s_out.max() + cm.w_affinity * s_out.mean()
        return val

    def screen(self) -> np.ndarray:
        """[e, e'] first-order change: the mean-send change (linear) plus the heaviest rank's change."""
        a, bl, p, G, E = self.a, self.bl, self.p, self.G, self.E
        X = self.h[:, a]  # X[e, e'] = h[e, rank of e']
        d = np.diag(X)
        delta = X + X.T - d[:, None] - d[None, :]
        top = np.argsort(bl)[::-1]
        m1, m2 = bl[top[0]], bl[top[1]] if G > 1 else 0.0
        dp = p[:, None] - p[None, :]
        new_i = bl[a][:, None] - dp  # rank of e after e leaves and e' arrives
        new_j = bl[a][None, :] + dp
        rest = np.where((a[:, None] == top[0]) | (a[None, :] == top[0]), m2, m1)
        delta += self.wl * (np.maximum(np.maximum(new_i, new_j), rest) - m1)
        delta[(a[:, None] == a[None, :]) | np.tri(E, dtype=bool)] = np.inf
        return delta

    def try_swap(self, i: int, j: int) -> bool:
        """Swap experts i and j if the layer's exact terms fall (updated in O(experts)); whether they did."""
        a, p, h_out, cm = self.a, self.p, self.h_out, self.cm
        gi, gj = a[i], a[j]
        bl2 = self.bl.copy()
        bl2[gi] += p[j] - p[i]
        bl2[gj] += p[i] - p[j]
        so2 = self.s_out.copy()
        so2[gi] += h_out[j, gi] - h_out[i, gi]
        so2[gj] += h_out[i, gj] - h_out[j, gj]
        si2 = None
        if self.into is not None and self.s_in is not None:
            prev, r_in = self.into
            change = (r_in[:, i] - r_in[:, j]) * (cm.s[prev, gj] - cm.s[prev, gi]) * cm.bytes
            si2 = self.s_in + np.bincount(prev, weights=change, minlength=self.G)
        val = self.terms(bl2, si2, so2)
        if not val < self.cur - 1e-12 * max(self.cur, 1e-300):
            return False
        a[i], a[j] = gj, gi
        self.bl, self.s_out, self.s_in, self.cur = bl2, so2, si2, val
        return True
