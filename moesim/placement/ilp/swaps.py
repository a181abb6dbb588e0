"""Affinity swaps (docs/ilp.md, "How it scales", affinity swaps): experts of one layer trade ranks.

A swap is kept when the exact terms of its layer (compute tail, sends into and out of it) fall; the
candidates are screened by a first-order estimate. Ignores the dispatch term (the policy keeps the
result only where the whole objective falls).
"""

from __future__ import annotations

import time

import numpy as np

from moesim.placement.ilp.costs import CostModel
from moesim.placement.ilp.search import improving_pairs
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
