"""The synthetic generator's sampler as it was before issue 18 (moesim/traces/synthetic.py at a907453): float64
alias draws, groups by rejection. Kept only to check the fast sampler against it in distribution
(tests/test_synthetic_sampler.py); the popularity, tilts and successors come from moesim's own
``_routing_structure``, so both sample the same routing structure."""

from __future__ import annotations

from typing import Callable

import numpy as np
import numpy.typing as npt

from moesim.traces.synthetic import SyntheticParams, _routing_structure

_MAX_REJECTION_ROUNDS = 200
_MAX_DRAWS_PER_ROUND = 64
# Draws and tokens handled per numpy call: enough to amortise numpy's per-call cost, few enough that
# the temporaries stay in cache.
_DRAW_BLOCK = 16384
_TOKEN_BLOCK = 4096


def _alias_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias tables of every row of ``weights`` [rows, n], vectorised: (prob, alias), both [rows, n].

    Column c keeps a draw with probability ``prob[c]`` and hands it to ``alias[c]`` otherwise. Scaled to
    mean 1, the small columns' deficits (1 - p) and the large ones' surpluses (p - 1) are laid end to end
    in column order: each small is topped up by the large whose surplus interval holds the start of its
    deficit; a large whose surplus runs out inside a small's deficit lends that overshoot from its own
    column and is topped up in turn by the next large. (Vose's sweep with its order fixed, so that one
    cumulative sum and one sorted search per side do every row at once.)
    """
    rows, n = weights.shape
    p = weights / weights.sum(axis=1, keepdims=True) * n
    r = np.arange(rows)
    large = p >= 1.0
    large[r, p.argmax(axis=1)] = True  # every row has a donor, whatever the rounding
    deficit = np.where(large, 0.0, 1.0 - p)
    surplus = np.where(large, np.maximum(p - 1.0, 0.0), 0.0)
    off = r[:, None] * (n + 1.0)  # row offsets: one sorted search serves every row
    d_end = np.cumsum(deficit, axis=1) + off
    d_start = np.concatenate([off, d_end[:, :-1]], axis=1).ravel()
    d_end = d_end.ravel()
    s_end = (np.cumsum(surplus, axis=1) + off).ravel()
    larges = np.flatnonzero(large)
    row_last = larges[np.searchsorted(larges, (r + 1) * n) - 1]  # each row's last large
    donor = np.minimum(np.searchsorted(s_end, d_start, side="right"), np.repeat(row_last, n))
    q = np.minimum(np.searchsorted(d_end, s_end, side="right"), rows * n - 1)
    overshoot = np.where(d_start[q] < s_end, d_end[q] - s_end, 0.0)
    next_large = np.empty(rows * n, dtype=np.int64)
    next_large[larges[:-1]] = larges[1:]
    next_large[row_last] = row_last
    flat_large = large.ravel()
    prob = np.where(flat_large, 1.0 - overshoot, p.ravel())
    alias = np.where(flat_large, next_large, donor) - np.repeat(r * n, n)
    return prob.reshape(rows, n), alias.reshape(rows, n)


class _AliasTable:
    """Alias tables of many categorical rows, stacked: O(1) vectorised draws.

    ``blocks`` is a list of (weights [rows, n], labels [rows, n]); rows are numbered across the blocks in
    order, and a draw from row r returns one of its labels with probability proportional to its weight.
    """

    def __init__(self, blocks: list[tuple[np.ndarray, np.ndarray]], dtype: npt.DTypeLike) -> None:
        width, start, edge, pick = [], [], [], []
        offset = 0
        for weights, labels in blocks:
            rows, n = weights.shape
            prob, alias = _alias_rows(weights)
            width.append(np.full(rows, float(n)))
            start.append(offset + n * np.arange(rows))
            edge.append((np.arange(n) + prob).ravel())  # column + probability of keeping it
            pick.append(np.stack([np.take_along_axis(labels, alias, axis=1), labels], axis=-1).ravel())
            offset += rows * n
        self.width = np.concatenate(width)
        self.start = np.concatenate(start)
        self.edge = np.concatenate(edge)
        self.pick = np.concatenate(pick).astype(dtype)  # per entry: its alias's label, its own label

    def sample(self, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One label from row ``rows`` per uniform ``u`` in [0, 1) (broadcast together): the integer part of
        ``u x n`` picks the column (never n: a double below 1 times n rounds below n), the fractional part
        keeps it or takes its alias."""
        x = u * self.width[rows]
        flat = self.start[rows] + x.astype(np.int64)
        return self.pick[2 * flat + (x < self.edge[flat])]


Draw = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
Allowed = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _successive_sampling(draw: Draw, pop_row: np.ndarray, succ_row: np.ndarray, k: int,
                         allowed: Allowed | None = None) -> np.ndarray:
    """``k`` distinct picks per token, [k, tokens]: pick i is the token's first i.i.d. draw that differs
    from its picks 0..i-1 (rejection), which is exactly successive sampling without replacement.

    ``draw(pop_row, succ_row, m)`` returns ``m`` i.i.d. draws for each token with those rows of the
    popularity and successor tables: [m, tokens]. A token rejected in one round draws twice as many
    candidates in the next (up to ``_MAX_DRAWS_PER_ROUND``) and takes the first that is new. (Tokens are
    selected by index arrays, not boolean masks: numpy's masked selection is slow on random masks.)
    ``allowed(cand [m, n], tokens [n])`` restricts picks (rejecting the rest): sampling from the restricted,
    renormalised distribution.
    """
    picks = draw(pop_row, succ_row, k)  # every pick's first candidate
    everyone = np.arange(pop_row.size)
    for i in range(k):
        repeat = np.zeros(pop_row.size, dtype=bool) if allowed is None else ~allowed(picks[i][None], everyone)[0]
        for j in range(i):
            repeat |= picks[j] == picks[i]
        todo = repeat.nonzero()[0]
        m = 1
        for _ in range(_MAX_REJECTION_ROUNDS):
            if todo.size == 0:
                break
            cand = draw(pop_row[todo], succ_row[todo], m)  # [m, todo]
            new = np.ones(cand.shape, dtype=bool) if allowed is None else allowed(cand, todo)
            for j in range(i):
                new &= cand != picks[j][todo]
            if m == 1:
                ok, take = new[0], cand[0]
            else:  # each token's first new candidate
                first, col = new.argmax(axis=0), np.arange(todo.size)
                ok, take = new[first, col], cand[first, col]
            got = ok.nonzero()[0]
            picks[i][todo[got]] = take[got]
            todo = todo[(~ok).nonzero()[0]]
            m = min(2 * m, _MAX_DRAWS_PER_ROUND)
        else:
            raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")
    return picks


def _mixture_draw(table: _AliasTable, use_affinity: bool, affinity: float, dtype: npt.DTypeLike,
                  rng: np.random.Generator) -> Draw:
    def draw(pop: np.ndarray, succ: np.ndarray, m: int) -> np.ndarray:
        """``m`` i.i.d. draws from the mixture for each token: [m, tokens]."""
        out = np.empty((m, pop.size), dtype=dtype)
        step = max(_DRAW_BLOCK // m, 1)
        for a in range(0, pop.size, step):
            u = rng.random((2 if use_affinity else 1, m, min(a + step, pop.size) - a))
            rows = np.where(u[1] < affinity, succ[a : a + step], pop[a : a + step]) if use_affinity \
                else pop[a : a + step]
            out[:, a : a + step] = table.sample(rows, u[0])
        return out

    return draw


def _group_filter(pops: np.ndarray, groups: int, topk_groups: int, pop_row: np.ndarray,
                  rng: np.random.Generator) -> Allowed:
    """Group-limited routing: each token's ``topk_groups`` groups, drawn by their popularity mass at its home
    (``pops`` [G, E] of one layer); the filter keeps the candidates in the token's groups."""
    G, E = pops.shape
    T = pop_row.size
    size = E // groups
    group_table = _AliasTable([(pops.reshape(G, groups, size).sum(axis=2),
                                np.broadcast_to(np.arange(groups), (G, groups)))], np.int64)

    def draw_group(pop: np.ndarray, _succ: np.ndarray, m: int) -> np.ndarray:
        return group_table.sample(pop[None, :], rng.random((m, pop.size)))

    chosen = np.zeros((T, groups), dtype=bool)
    gpicks = _successive_sampling(draw_group, pop_row, pop_row, topk_groups)
    chosen[np.arange(T)[None, :], gpicks] = True

    def in_chosen_groups(cand: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return chosen[tokens[None, :], cand // size]

    return in_chosen_groups


def reference_experts(*, num_layers: int, num_experts: int, top_k: int, num_gpus: int, tokens_per_gpu: int,
                      batches: int, params: SyntheticParams, rng: np.random.Generator,
                      structure_rng: np.random.Generator | None = None) -> np.ndarray:
    """The old generator's expert ids [tokens, layers, top_k] (weights dropped)."""
    srng = structure_rng if structure_rng is not None else rng
    E, G, K = num_experts, num_gpus, top_k
    T = batches * G * tokens_per_gpu
    pops, succ_ids, succ_w = _routing_structure(num_layers, E, G, params, srng)

    home = ((np.arange(T) % (G * tokens_per_gpu)) // tokens_per_gpu).astype(np.int32)
    experts = np.empty((T, num_layers, K), dtype=np.int16 if E < 2**15 else np.int32)
    pop_row = home.astype(np.int64)  # table row of a token's popularity component: its home GPU
    prev_top1 = np.zeros(T, dtype=np.int64)
    all_experts = np.broadcast_to(np.arange(E), (G, E))
    for lay in range(num_layers):
        # Rows 0..G-1: popularity seen from each home GPU; rows G + e: the successors of expert e.
        use_affinity = lay > 0 and params.affinity > 0
        blocks = [(pops[lay], all_experts)] + ([(succ_w[lay], succ_ids[lay])] if use_affinity else [])
        table = _AliasTable(blocks, experts.dtype)
        draw = _mixture_draw(table, use_affinity, params.affinity, experts.dtype, rng)
        allowed = None
        if params.group_limit is not None:  # the token's groups first, by their popularity mass at its home
            allowed = _group_filter(pops[lay], params.groups, params.group_limit, pop_row, rng)
        picks = _successive_sampling(draw, pop_row, G + prev_top1, K, allowed)
        for a in range(0, T, _TOKEN_BLOCK):  # into the trace's [token, layer, pick] layout, cache-sized
            blk = slice(a, a + _TOKEN_BLOCK)
            experts[blk, lay] = picks[:, blk].T
        prev_top1 = picks[0].astype(np.int64)

    return experts
