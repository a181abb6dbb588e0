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

With numba (the extra ``fast``), a chunk's picks are sampled compiled (:mod:`moesim.traces.sampling_jit`): the
same random words in the same order, the same trace byte for byte.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from moesim.budget import require_memory, require_time
from moesim.traces import sampling_jit
from moesim.traces.format import Trace, TraceMeta
from moesim.traces.sampling import Draw, PackedAlias, label_bits, successive_sampling, take_rows

# Tokens sampled at once (by one thread, from one random stream): enough to amortise numpy's per-call cost, few
# enough that the temporaries stay in cache and are reused from the heap (at 32k tokens, about 200k page faults
# a layer of 1M tokens: temporaries mapped fresh from the OS and returned to it each time).
_TOKEN_CHUNK = 1 << 14
# Layers a thread stages before writing them into a trace's rows: a token's 4 layers of top-8 uint8 ids (32 bytes)
# are written at once, not as 4 writes of 8 bytes to cache lines 464 bytes apart (58 layers); the stage holds
# 32 bytes per token (134 MB at 4M tokens).
_STAGE_LAYERS = 4


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


@dataclass(frozen=True)
class _LayerTables:
    """One layer's alias tables and masses.

    Without group limit, ``experts`` holds the popularity row of every home GPU (``E`` columns, from word
    ``h x E``) then, with affinity, every expert's successor row (``fan`` columns, from word ``G x E + e x
    fan``). With it, the rows are per group: popularity of home h within group g (from word ``(h x n + g) x
    size``), then the successors of expert e within group g (from ``G x E + (e x n + g) x size``), and
    ``group_mass`` [G, n] / ``succ_mass`` [E, n] are each group's share of the two components; ``groups``
    draws a home's groups by their popularity mass."""

    experts: PackedAlias
    groups: PackedAlias | None
    group_mass: np.ndarray | None
    succ_mass: np.ndarray | None
    num_experts: int
    num_gpus: int
    fan: int
    affinity: float  # 0: no successor component (first layer, or no affinity)
    num_groups: int
    topk_groups: int
    group_sets: np.ndarray | None = None  # [sets, topk_groups]: ``groups`` draws a set of groups (its row here)
    # per (home, set) and (expert, set): the popularity's and the successors' parts of the token's segment
    # ends (:func:`_segments`) and of its segments' first words, to add together
    set_pop_ends: np.ndarray | None = None
    set_succ_ends: np.ndarray | None = None
    set_pop_rows: np.ndarray | None = None
    set_succ_rows: np.ndarray | None = None


def _layer_tables(pops: np.ndarray, succ_ids: np.ndarray, succ_w: np.ndarray, affinity: float,
                  params: SyntheticParams) -> _LayerTables:
    """The tables of one layer from its popularity per home ``pops`` [G, E] and successors [E, fan]."""
    G, E = pops.shape
    bits = label_bits(E)
    if params.group_limit is None:
        blocks = [(pops, np.broadcast_to(np.arange(E), (G, E)))]
        if affinity > 0:
            blocks.append((succ_w, succ_ids))
        return _LayerTables(PackedAlias(blocks, bits), None, None, None, E, G, succ_ids.shape[1], affinity, 1, 1)
    n = params.groups
    size = E // n
    labels = np.broadcast_to(np.arange(E).reshape(1, n, size), (G, n, size)).reshape(G * n, size)
    succ = np.zeros((E, E))
    np.put_along_axis(succ, succ_ids, succ_w / succ_w.sum(axis=1, keepdims=True), axis=1)
    succ_mass = succ.reshape(E, n, size).sum(axis=2)
    rows = succ.reshape(E * n, size)
    rows[succ_mass.ravel() <= 0] = 1.0  # a group without successors: never drawn from, any valid row
    group_mass = pops.reshape(G, n, size).sum(axis=2)
    group_mass /= group_mass.sum(axis=1, keepdims=True)
    table = PackedAlias([(pops.reshape(G * n, size), labels),
                         (rows, np.broadcast_to(np.arange(E).reshape(1, n, size), (E, n, size)).reshape(E * n, size))],
                        bits)
    law = group_set_law(group_mass, params.group_limit)
    set_tables: tuple[np.ndarray | None, ...]
    if law is None:  # too many sets: successive sampling of the groups themselves
        groups = PackedAlias([(group_mass, np.broadcast_to(np.arange(n), (G, n)))], label_bits(n))
        members, set_tables = None, (None, None, None, None)
    else:
        groups = PackedAlias([(law[0], np.broadcast_to(np.arange(law[1].shape[0]), law[0].shape))],
                             label_bits(law[1].shape[0]))
        members = law[1]
        pop_ends, pop_rows = _segments((1 - affinity) * group_mass[:, members], members[None],
                                       (np.arange(G) * n)[:, None, None], size, 0, True)
        succ_ends, succ_rows = _segments(affinity * succ_mass[:, members], members[None],
                                         (np.arange(E) * n)[:, None, None], size, G * E, False)
        set_tables = (pop_ends, succ_ends, pop_rows, succ_rows)
    return _LayerTables(table, groups, group_mass, succ_mass, E, G,
                        succ_ids.shape[1], affinity, n, params.group_limit, members, *set_tables)


def _segments(mass: np.ndarray, members: np.ndarray, first_row: np.ndarray, size: int, offset: int,
              popularity: bool) -> tuple[np.ndarray, np.ndarray]:
    """One component's parts of a token's segments, per (row, set of groups ``members`` [.., sets, k]) with the
    component's ``mass`` [rows, sets, k] in each of the set's groups: segment
    2j is group j's popularity, 2j + 1 its successors; segment s ends at ``ends[s]`` (the last, 2k - 1, at the
    total) and draws from the row starting at word ``rows[s]``. The popularity (``popularity``) adds its
    cumulative mass up to group j to ends 2j and 2j + 1, the successors theirs up to group j - 1 to end 2j and
    up to group j to end 2j + 1; each fills its own segments' rows (``offset + (first_row + g) x size``)
    and zeros the other's. [rows x sets, 2k] each."""
    cum = np.cumsum(mass, axis=2)
    rows, sets, k = cum.shape
    ends = np.zeros((rows, sets, 2 * k))
    start = np.zeros((rows, sets, 2 * k), dtype=np.int64)
    own = slice(0, None, 2) if popularity else slice(1, None, 2)
    start[..., own] = offset + (first_row + members) * size
    ends[..., 1::2] = cum
    if popularity:
        ends[..., 0::2] = cum
    else:
        ends[..., 2::2] = cum[..., :-1]
    return ends.reshape(rows * sets, 2 * k), start.reshape(rows * sets, 2 * k)


_MAX_GROUP_SETS = 4096  # above this many sets of topk_groups groups, groups are drawn one by one


def group_set_law(mass: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The law of the set of ``k`` groups drawn by successive sampling on ``mass`` [rows, n]: (``p`` [rows,
    sets], ``members`` [sets, k]), summed over the orders that give each set (dynamic programming over the
    sets drawn so far: a set S grows by g with probability ``mass[g] / (1 - mass(S))``). None when there are
    more than ``_MAX_GROUP_SETS`` sets."""
    rows, n = mass.shape
    if math.comb(n, k) > _MAX_GROUP_SETS or n > 24:
        return None
    m = mass / mass.sum(axis=1, keepdims=True)
    masks = np.arange(1 << n)
    size = np.bitwise_count(masks)
    bit = (masks[:, None] >> np.arange(n)) & 1
    taken = bit @ m.T  # [sets, rows]: mass of every set
    p = np.zeros((1 << n, rows))
    p[0] = 1.0
    for j in range(k):
        level = masks[size == j]
        for g in range(n):
            grow = level[bit[level, g] == 0]
            p[grow | (1 << g)] += p[grow] * m[:, g] / np.maximum(1.0 - taken[grow], 1e-300)
    sets = masks[size == k]
    members = np.nonzero(bit[sets])[1].reshape(sets.size, k)
    return p[sets].T, members


def _grouped_draw(tab: _LayerTables, home: np.ndarray, prev_top1: np.ndarray, raw: Callable[..., np.ndarray]
                  ) -> Draw:
    """Group-limited routing: each token's ``topk_groups`` groups by successive sampling on their popularity
    mass at its home, then draws from the mixture restricted to those groups, exactly: a group j of the
    token's by its mass ``(1 - affinity) x popularity + affinity x successors``, then that group's
    popularity row or successor row by their shares of it. (The low 32 bits of a draw's word pick one of the
    token's 2 x topk_groups segments - group j's popularity, then its successors - against its cumulative
    thresholds; the high 32 bits draw within the segment's row.)"""
    assert tab.groups is not None and tab.group_mass is not None and tab.succ_mass is not None
    n, E, G, t = home.size, tab.num_experts, tab.num_gpus, tab.num_groups
    size = E // t
    a = tab.affinity
    if tab.group_sets is not None:  # the token's set of groups in one draw; its segments from the set's rows
        assert tab.set_pop_ends is not None and tab.set_succ_ends is not None
        assert tab.set_pop_rows is not None and tab.set_succ_rows is not None
        width = tab.group_sets.shape[0]
        sets = tab.groups.draw(home * width, width, raw(n))
        hs, ps = home * width + sets, prev_top1 * width + sets
        ends = take_rows(tab.set_pop_ends, hs) + take_rows(tab.set_succ_ends, ps)  # [n, 2 k_g]
        seg_rows = take_rows(tab.set_pop_rows, hs) + take_rows(tab.set_succ_rows, ps)
    else:
        start = home * t

        def draw_group(tokens: np.ndarray | None, m: int) -> np.ndarray:
            rows = start if tokens is None else start[tokens]
            return tab.groups.draw(rows, t, raw((m, rows.size)))  # type: ignore[union-attr]

        g = successive_sampling(draw_group, n, tab.topk_groups).T  # [n, k_g]
        pop_ends, pop_rows = _segments((1 - a) * tab.group_mass[home[:, None], g][:, None], g[:, None],
                                       home[:, None, None] * t, size, 0, True)
        succ_ends, succ_rows = _segments(a * tab.succ_mass[prev_top1[:, None], g][:, None], g[:, None],
                                         prev_top1[:, None, None] * t, size, G * E, False)
        ends, seg_rows = pop_ends + succ_ends, pop_rows + succ_rows
    total = ends[:, -1]
    if not (total > 0).all():  # only successors (affinity 1), none of them in the token's groups
        raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")
    # the low 32 bits of a draw's word pick segment s when they lie between cuts s - 1 and s (x 2^32 / total);
    # an empty segment (a group without successors) has equal cuts, and its row is any valid one
    k_g = ends.shape[1] // 2
    cut_rows = np.minimum(ends[:, :-1] * (2.0**32 / total)[:, None], 2.0**32 - 1).astype(np.uint32)
    cuts = np.ascontiguousarray(cut_rows.T)  # [2 k_g - 1, n]
    seg_rows = seg_rows.ravel()
    first = np.arange(n) * (2 * k_g)

    def draw(tokens: np.ndarray | None, m: int) -> np.ndarray:
        c, base = (cuts, first) if tokens is None else (np.ascontiguousarray(take_rows(cut_rows, tokens).T),
                                                         first[tokens])
        bits = raw((m, base.size))
        u, high = bits.astype(np.uint32), (bits >> np.uint64(32)).astype(np.uint32)  # contiguous halves
        seg = (u >= c[0]).view(np.uint8)
        for j in range(1, c.shape[0]):
            seg += (u >= c[j]).view(np.uint8)
        idx = seg.astype(np.int64)
        idx += base
        return tab.experts.draw_high(seg_rows.take(idx), size, high)

    return draw


def _layer_picks(tab: _LayerTables, home: np.ndarray, prev_top1: np.ndarray, k: int,
                 rng: np.random.Generator, compiled: bool | None = None) -> np.ndarray:
    """[k, n] of :func:`trace_dtype`: the picks of tokens with homes ``home`` and previous top-1 experts
    ``prev_top1`` (int64), by successive sampling from the mixture ``(1 - affinity) x popularity(home) +
    affinity x successors`` (restricted to the token's groups under group-limited routing).

    ``compiled``: sample with numba (:mod:`moesim.traces.sampling_jit`, the extra ``fast``; the same picks byte
    for byte, as a view of a token-major array), with numpy (False), or compiled where numba is installed (None,
    unless ``MOESIM_SAMPLER_JIT=0``).
    """
    if sampling_jit.enabled(compiled):
        got = _compiled_picks(tab, home, prev_top1, k, rng)
        if got is not None:
            return got
    E, G, fan = tab.num_experts, tab.num_gpus, tab.fan
    raw = rng.bit_generator.random_raw
    dtype = trace_dtype(E)
    if tab.groups is not None:
        return successive_sampling(_grouped_draw(tab, home, prev_top1, raw), home.size, k, dtype=dtype)
    pop_start = home * E
    if tab.affinity <= 0:
        def draw(tokens: np.ndarray | None, m: int) -> np.ndarray:
            rows = pop_start if tokens is None else pop_start[tokens]
            return tab.experts.draw(rows, E, raw((m, rows.size)))

        return successive_sampling(draw, home.size, k, dtype=dtype)
    succ_start = G * E + prev_top1 * fan
    cut = np.uint64(min(round(tab.affinity * 2.0**32), 2**32))  # the low 32 bits below it: a successor
    low = np.uint64(0xFFFFFFFF)

    def draw_mixture(tokens: np.ndarray | None, m: int) -> np.ndarray:
        ps = pop_start if tokens is None else pop_start[tokens]
        ss = succ_start if tokens is None else succ_start[tokens]
        bits = raw((m, ps.size))
        succ = (bits & low) < cut
        return tab.experts.draw(np.where(succ, ss, ps), np.where(succ, fan, E), bits)

    return successive_sampling(draw_mixture, home.size, k, dtype=dtype)


def _compiled_picks(tab: _LayerTables, home: np.ndarray, prev_top1: np.ndarray, k: int,
                    rng: np.random.Generator) -> np.ndarray | None:
    """:func:`_layer_picks` compiled, the random words drawn from ``rng``'s PCG64 in the numpy path's order; None
    where that path is not compiled (groups drawn one by one, another bit generator, tables past 2^32 words)."""
    st = sampling_jit.pcg64_state(rng.bit_generator)
    if st is None or (tab.groups is not None and tab.group_sets is None) or tab.experts.words.size > 2**32:
        return None
    E, G, n = tab.num_experts, tab.num_gpus, home.size
    if tab.groups is not None:  # segments: group j's popularity, then its successors, of the token's set
        assert tab.group_mass is not None and tab.succ_mass is not None
        picks = np.empty((n, k), dtype=trace_dtype(E))
        status = sampling_jit.grouped(st, tab.groups.words, (tab.groups.thr_bits, tab.groups.label_bits),
                                      tab.group_sets, home, prev_top1, tab.group_mass, tab.succ_mass,
                                      (1 - tab.affinity, tab.affinity), (G * E, tab.num_groups, E // tab.num_groups),
                                      tab.experts.words, tab.experts.thr_bits, tab.experts.label_bits, picks)
        if status:
            raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")
        sampling_jit.store_pcg64_state(rng.bit_generator, st)
        return picks.T
    if tab.affinity <= 0:  # one segment: the home's popularity
        segs = np.stack([np.zeros(n, np.int64), home * E], axis=1).astype(np.uint32)
        widths = np.array([E], dtype=np.uint64)
    else:  # the low 32 bits below the cut: the successors of the previous top-1, else the home's popularity
        cut, succ = round(tab.affinity * 2.0**32), G * E + prev_top1 * tab.fan
        pop, width = (home * E, E) if cut < 2**32 else (succ, tab.fan)  # affinity 1: successors only
        segs = np.stack([np.full(n, min(cut, 2**32 - 1)), np.zeros(n, np.int64), succ, pop], axis=1).astype(np.uint32)
        widths = np.array([tab.fan, width], dtype=np.uint64)
    got = sampling_jit.draw_picks(st, tab.experts, segs, widths, k, trace_dtype(E))
    if got is None:
        raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")
    sampling_jit.store_pcg64_state(rng.bit_generator, st)
    return got


def synthetic_cost(*, num_layers: int, num_experts: int, top_k: int, num_gpus: int, tokens_per_gpu: int,
                   batches: int, params: SyntheticParams, weights: bool = True,
                   keep: bool = True) -> tuple[float, float, str]:
    """(bytes, seconds, the sizes in words) :func:`generate_trace` needs: the trace's arrays (expert ids,
    gate ``weights`` when asked; none when the layers are not ``keep``-t, as for profile statistics), one
    layer's picks and per-token state, the per-chunk temporaries, each layer's popularity rows and the
    successor race over every expert pair."""
    L, E, K, G = num_layers, num_experts, top_k, num_gpus
    T = batches * G * tokens_per_gpu
    fan = min(params.affinity_fanout, E)
    per_pick = (trace_dtype(E).itemsize + (4 if weights else 0)) if keep else 0
    nbytes = (T * L * K * per_pick + T * (K * 4 + 24) + _TOKEN_CHUNK * K * 200 + L * G * E * 8 + 2 * E * E * 8
              + L * E * fan * 16)
    seconds = T * L * K * 4e-8 + L * E * E * 1e-7
    return nbytes, seconds, f"{batches} batches x {G} GPUs x {tokens_per_gpu} tokens x {L} layers x top-{K}"


def generate_layers(*, num_layers: int, num_experts: int, top_k: int, num_gpus: int, tokens_per_gpu: int,
                    batches: int, params: SyntheticParams, rng: np.random.Generator,
                    structure_rng: np.random.Generator | None = None, out: np.ndarray | None = None,
                    compiled: bool | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The picks of ``batches x num_gpus x tokens_per_gpu`` tokens, one MoE layer at a time: yields
    (``picks`` [tokens, top_k], ``pops`` [G, E] the layer's popularity per home GPU). ``picks`` is of
    :func:`trace_dtype` and is overwritten by the next layer: copy what you keep. Only one
    layer's picks and each token's top-1 expert are held (what :func:`generate_trace` and the profile
    statistics of a study consume layer by layer).

    ``structure_rng`` draws the popularity ranks, GPU tilts and successor sets; pass generators with the
    same seed to get traces of one distribution with independent tokens (profiling vs evaluation).

    ``out`` [tokens, num_layers, top_k] of that dtype receives every layer: each thread stages its tokens'
    picks of ``_STAGE_LAYERS`` layers and writes them into their rows at once (one strided write per token, not
    one per layer); the layers are then yielded in groups, as ``out[:, layer]``, once written.

    ``compiled``: as :func:`_layer_picks` (the same picks either way).
    """
    _check_shape(num_layers, num_experts, top_k, params)
    srng = structure_rng if structure_rng is not None else rng
    E, G, K = num_experts, num_gpus, top_k
    T = batches * G * tokens_per_gpu
    pops, succ_ids, succ_w = _routing_structure(num_layers, E, G, params, srng)
    home = ((np.arange(T) % (G * tokens_per_gpu)) // tokens_per_gpu).astype(np.int64)
    stage = 1 if out is None else min(_STAGE_LAYERS, num_layers)
    buf = np.empty((T, stage, K), dtype=trace_dtype(E))
    prev_top1 = np.zeros(T, dtype=np.int64)
    seeds = rng.integers(0, 2**63, size=num_layers)  # each (layer, chunk) draws from its own stream

    def tables(lay: int) -> _LayerTables:
        return _layer_tables(pops[lay], succ_ids[lay], succ_w[lay], params.affinity if lay > 0 else 0.0, params)

    with ThreadPoolExecutor(_workers()) as pool:
        ahead = pool.submit(tables, 0)
        for lay in range(num_layers):
            tab = ahead.result()
            if lay + 1 < num_layers:  # the next layer's tables read no picks: built while this layer samples
                ahead = pool.submit(tables, lay + 1)

            def chunk(c: int) -> None:
                blk = slice(c * _TOKEN_CHUNK, min((c + 1) * _TOKEN_CHUNK, T))
                got = _layer_picks(tab, home[blk], prev_top1[blk], K, np.random.default_rng([int(seeds[lay]), c]),
                                   compiled)
                buf[blk, lay % stage] = got.T
                prev_top1[blk] = got[0]
                if flush:
                    out[blk, first:lay + 1] = buf[blk, :lay + 1 - first]  # type: ignore[index]

            first = lay - lay % stage
            flush = out is not None and (lay % stage == stage - 1 or lay == num_layers - 1)
            list(pool.map(chunk, range(-(-T // _TOKEN_CHUNK))))
            if out is None:
                yield buf[:, 0], pops[lay]
            elif flush:
                yield from ((out[:, layer], pops[layer]) for layer in range(first, lay + 1))


THREADS_ENV = "MOESIM_THREADS"  # a cap on the sampler's threads (a sweep's worker processes set it to their share)


def _workers() -> int:
    """Threads that sample the chunks of a layer: this process's CPUs, at most 4 and at most ``MOESIM_THREADS`` when
    set (numpy and the compiled sampler release the GIL; every chunk has its own random stream, so the trace does not
    depend on the count)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    cap = os.environ.get(THREADS_ENV, "")
    if cap.isdigit() and int(cap) > 0:
        cpus = min(cpus, int(cap))
    return max(1, min(cpus, 4))


def trace_dtype(num_experts: int) -> np.dtype:
    """The expert-id dtype of a synthetic trace, the narrowest that holds every id (a generated trace has no -1):
    uint8 up to 256 experts (DeepSeek-V3's 58 layers x top-8 of 4M tokens: 1.9 GB, not 3.9), int16, int32."""
    return np.dtype(np.uint8 if num_experts <= 256 else np.int16 if num_experts < 2**15 else np.int32)


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
    weights: bool = True,
    compiled: bool | None = None,
) -> Trace:
    """Generate ``batches x num_gpus x tokens_per_gpu`` tokens (:func:`generate_layers`, every layer kept).

    ``weights`` adds gate weights: the picks' popularity at the token's home, normalised (the engine reads
    none; a study generates without them). ``compiled``: as :func:`_layer_picks` (the same trace either way).
    """
    _check_shape(num_layers, num_experts, top_k, params)
    nbytes, seconds, what = synthetic_cost(num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                                           num_gpus=num_gpus, tokens_per_gpu=tokens_per_gpu, batches=batches,
                                           params=params, weights=weights)
    require_memory(nbytes, f"a synthetic trace of {what}")
    require_time(seconds, f"generating a synthetic trace of {what}")
    E, G, K = num_experts, num_gpus, top_k
    T = batches * G * tokens_per_gpu
    home = ((np.arange(T) % (G * tokens_per_gpu)) // tokens_per_gpu).astype(np.int32)
    batch = (np.arange(T) // (G * tokens_per_gpu)).astype(np.int32)
    experts = np.empty((T, num_layers, K), dtype=trace_dtype(E))
    gate = np.empty((T, num_layers, K), dtype=np.float32) if weights else None
    layers = generate_layers(num_layers=num_layers, num_experts=E, top_k=K, num_gpus=G, tokens_per_gpu=tokens_per_gpu,
                             batches=batches, params=params, rng=rng, structure_rng=structure_rng, out=experts,
                             compiled=compiled)
    for lay, (picks, pops) in enumerate(layers):
        if gate is not None:
            for a in range(0, T, _TOKEN_CHUNK):  # cache-sized blocks
                blk = slice(a, a + _TOKEN_CHUNK)
                w = pops.astype(np.float32)[home[blk, None], picks[blk]]
                gate[blk, lay] = w / w.sum(axis=1, keepdims=True)
    meta = TraceMeta(num_experts=E, num_layers=num_layers, top_k=K, model=model,
                     source="moesim.synthetic", extra={"synthetic": params.__dict__ | {"num_gpus": G}})
    return Trace(experts=experts, meta=meta, weights=gate, home=home, batch=batch)

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
