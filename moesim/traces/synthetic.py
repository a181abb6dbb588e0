"""Synthetic routing traces with expert-popularity skew, per-GPU mix and cross-layer affinity.

The model, per MoE layer l:
- popularity: expert weights proportional to 1 / rank^zipf_alpha, ranks shuffled per layer;
- per-GPU mix: each home GPU sees the popularity tilted by a log-normal factor (sigma ``gpu_mix_sigma``),
  as when different requests land on different data-parallel ranks;
- cross-layer affinity: every expert e of layer l-1 has ``affinity_fanout`` preferred successors in
  layer l (drawn by popularity, without replacement). A token's picks at layer l come from the mixture
  ``(1 - affinity) * popularity(home) + affinity * successors(its top-1 expert at l-1)``.
The top_k picks are drawn without replacement (successive sampling, i.e. Plackett-Luce), so the first
pick is the token's top-1 expert. With group-limited routing (DeepSeek-V3: 256 experts in 8 groups, each
token picks from its top 4 groups), experts are split into ``groups`` equal contiguous groups; a token first
draws ``topk_groups`` distinct groups by successive sampling on the groups' popularity mass at its home,
then its top_k experts by successive sampling restricted to those groups. (DeepSeek ranks groups by their
best experts' scores; with independent scores both rules pick groups in proportion to the same masses
when popularity is flat.) Gate weights are the picks' popularity at the token's home, normalised
(a stand-in: the engine does not use weights).

Deliberately simple: no drift over batches, one state (the top-1 expert) carried
between layers. The trace-fitting issue extends this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import numpy.typing as npt

from moesim.budget import require_memory, require_time
from moesim.traces.format import Trace, TraceMeta

_MAX_REJECTION_ROUNDS = 200
_MAX_DRAWS_PER_ROUND = 64
# Draws and tokens handled per numpy call: enough to amortise numpy's per-call cost, few enough that
# the temporaries stay in cache.
_DRAW_BLOCK = 16384
_TOKEN_BLOCK = 4096


@dataclass(frozen=True)
class SyntheticParams:
    zipf_alpha: float = 0.3
    gpu_mix_sigma: float = 0.3
    affinity: float = 0.5
    affinity_fanout: int = 4
    groups: int = 1  # expert groups for group-limited routing (experts split evenly, contiguous ids)
    topk_groups: int | None = None  # groups a token may pick from; None = all (no limit)

    @property
    def group_limited(self) -> bool:
        return self.group_limit is not None

    @property
    def group_limit(self) -> int | None:
        """``topk_groups`` where it limits the routing (fewer than ``groups``, more than one group), else None."""
        if self.groups > 1 and self.topk_groups is not None and self.topk_groups < self.groups:
            return self.topk_groups
        return None


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


def _check_shape(num_layers: int, num_experts: int, top_k: int, params: SyntheticParams) -> None:
    """Raise ValueError when no trace of this shape can be drawn with ``params``."""
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if num_layers > 1 and params.affinity >= 1 and min(params.affinity_fanout, num_experts) < top_k:
        raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")
    if params.groups < 1 or num_experts % params.groups:
        raise ValueError(f"groups={params.groups} must divide num_experts={num_experts}")
    if params.topk_groups is not None and not 1 <= params.topk_groups <= params.groups:
        raise ValueError(f"topk_groups={params.topk_groups} must be between 1 and groups={params.groups}")
    if params.group_limit is not None and params.group_limit * (num_experts // params.groups) < top_k:
        raise ValueError(f"topk_groups={params.topk_groups} groups of {num_experts // params.groups} experts "
                         f"hold fewer than top_k={top_k} experts")


def _routing_structure(num_layers: int, num_experts: int, num_gpus: int, params: SyntheticParams,
                       srng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: popularity seen from each home GPU [L, G, E], and every expert's successors [L, E, fan]
    with their weights [L, E, fan]."""
    E, G = num_experts, num_gpus
    ranks = np.arange(1, E + 1, dtype=float)
    base = ranks ** -params.zipf_alpha
    fan = min(params.affinity_fanout, E)
    pops = np.empty((num_layers, G, E))
    succ_ids = np.empty((num_layers, E, fan), dtype=np.int64)
    succ_w = np.empty((num_layers, E, fan))
    for lay in range(num_layers):
        pop = base[srng.permutation(E)]
        tilt = np.exp(params.gpu_mix_sigma * srng.standard_normal((G, E)))
        pops[lay] = pop[None, :] * tilt
        pops[lay] /= pops[lay].sum(axis=1, keepdims=True)
        # Successors without replacement by popularity: the first ``fan`` of independent exponential
        # clocks with rates ``pop`` (the same law as successive sampling), one race per predecessor.
        clocks = srng.standard_exponential((E, E)) / pop
        succ_ids[lay] = np.argsort(clocks, axis=1)[:, :fan]
        succ_w[lay] = pop[succ_ids[lay]]
    return pops, succ_ids, succ_w


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


def synthetic_cost(*, num_layers: int, num_experts: int, top_k: int, num_gpus: int, tokens_per_gpu: int,
                   batches: int, params: SyntheticParams) -> tuple[float, float, str]:
    """(bytes, seconds, the sizes in words) :func:`generate_trace` needs: the trace's arrays and per-token
    temporaries, each layer's popularity rows and the successor race over every expert pair."""
    L, E, K, G = num_layers, num_experts, top_k, num_gpus
    T = batches * G * tokens_per_gpu
    fan = min(params.affinity_fanout, E)
    nbytes = T * L * K * 6 + T * (48 + 24 * K) + L * G * E * 8 + 2 * E * E * 8 + L * E * fan * 16
    seconds = T * L * K * 3e-7 + L * E * E * 1e-7
    return nbytes, seconds, f"{batches} batches x {G} GPUs x {tokens_per_gpu} tokens x {L} layers x top-{K}"


def generate_trace(
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_gpus: int,
    tokens_per_gpu: int,
    batches: int,
    params: SyntheticParams,
    rng: np.random.Generator,
    structure_rng: np.random.Generator | None = None,
    model: str = "",
) -> Trace:
    """Generate ``batches x num_gpus x tokens_per_gpu`` tokens.

    ``structure_rng`` draws the popularity ranks, GPU tilts and successor sets; pass generators with the
    same seed to get traces of one distribution with independent tokens (profiling vs evaluation).
    """
    _check_shape(num_layers, num_experts, top_k, params)
    nbytes, seconds, what = synthetic_cost(num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                                           num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, batches=batches,
                                           params=params)
    require_memory(nbytes, f"a synthetic trace of {what}")
    require_time(seconds, f"generating a synthetic trace of {what}")
    srng = structure_rng if structure_rng is not None else rng
    E, G, K = num_experts, num_gpus, top_k
    T = batches * G * tokens_per_gpu
    pops, succ_ids, succ_w = _routing_structure(num_layers, E, G, params, srng)

    home = ((np.arange(T) % (G * tokens_per_gpu)) // tokens_per_gpu).astype(np.int32)
    batch = (np.arange(T) // (G * tokens_per_gpu)).astype(np.int32)
    experts = np.empty((T, num_layers, K), dtype=np.int16 if E < 2**15 else np.int32)
    weights = np.empty((T, num_layers, K), dtype=np.float32)
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
        w = pops[lay].astype(np.float32).ravel()[pop_row * E + picks]
        w /= w.sum(axis=0)
        for a in range(0, T, _TOKEN_BLOCK):  # into the trace's [token, layer, pick] layout, cache-sized
            blk = slice(a, a + _TOKEN_BLOCK)
            experts[blk, lay] = picks[:, blk].T
            weights[blk, lay] = w[:, blk].T
        prev_top1 = picks[0].astype(np.int64)

    meta = TraceMeta(num_experts=E, num_layers=num_layers, top_k=K, model=model,
                     source="moesim.synthetic", extra={"synthetic": params.__dict__ | {"num_gpus": G}})
    return Trace(experts=experts, meta=meta, weights=weights, home=home, batch=batch)


def drift_cost(*, num_tokens: int, num_layers: int, num_experts: int, top_k: int, batches: int,
               swaps_per_batch: float) -> tuple[float, float]:
    """(bytes, seconds) :func:`drift_trace` needs: a permutation per batch and layer, the relabelled trace,
    and one Python step per swap."""
    L, E = num_layers, num_experts
    nbytes = batches * L * (E + 1) * 8 + num_tokens * L * top_k * 26
    seconds = swaps_per_batch * L * max(batches - 1, 0) * 5e-6 + batches * L * 2e-6
    return nbytes, seconds


def drift_trace(trace: Trace, *, swaps_per_batch: float, rng: np.random.Generator) -> Trace:
    """Popularity that evolves across batches: per layer, expert identities drift by a random walk on
    permutations - before each batch after the first, a Poisson(``swaps_per_batch``) number of random pairs
    of experts trade labels, and the changes accumulate. Within a batch nothing changes (skew, per-GPU mix
    and cross-layer affinity are those of the trace); across batches hot experts hand their load to others,
    as when the request mix shifts, so a plan made from an old window goes stale. Needs ``trace.batch``.
    """
    if swaps_per_batch < 0:
        raise ValueError(f"swaps_per_batch must be >= 0, got {swaps_per_batch}")
    if trace.batch is None:
        raise ValueError("drift needs a trace with a batch array")
    L, E = trace.meta.num_layers, trace.meta.num_experts
    B = int(trace.batch.max()) + 1 if trace.num_tokens else 0
    nbytes, seconds = drift_cost(num_tokens=trace.num_tokens, num_layers=L, num_experts=E, top_k=trace.meta.top_k,
                                 batches=B, swaps_per_batch=swaps_per_batch)
    what = f"drifting {B} batches x {L} layers of {E} experts by {swaps_per_batch:g} swaps per batch"
    require_memory(nbytes, what)
    require_time(seconds, what)
    perms = np.empty((B, L, E + 1), dtype=np.int64)  # column E maps "no expert" (-1) to itself
    perm = np.broadcast_to(np.arange(E), (L, E)).copy()
    for b in range(B):
        if b:
            for lay in range(L):
                for _ in range(int(rng.poisson(swaps_per_batch))):
                    i, j = rng.integers(0, E, 2)
                    perm[lay, [i, j]] = perm[lay, [j, i]]
        perms[b, :, :E] = perm
        perms[b, :, E] = -1
    ex = trace.experts.astype(np.int64)
    idx = np.where(ex >= 0, ex, E)
    layer = np.arange(L)[None, :, None]
    drifted = perms[trace.batch.astype(np.int64)[:, None, None], layer, idx].astype(trace.experts.dtype)
    meta = TraceMeta(num_experts=E, num_layers=L, top_k=trace.meta.top_k, model=trace.meta.model,
                     source=trace.meta.source, extra={**trace.meta.extra, "drift_swaps_per_batch": swaps_per_batch})
    return Trace(experts=drifted, meta=meta, weights=trace.weights, home=trace.home, batch=trace.batch)
