"""The fluid loop of :func:`moesim.sim.network.fluid_ends` compiled with numba (the optional extra ``fast``).

Same algorithm, same floating-point operations in the same order, so the same end times bit for bit (tested
against the numpy path): progressive filling that freezes every local bottleneck per step, each link's remaining
capacity updated position by position with the flows frozen in a step (as ``np.bincount`` sums them: in flow
order, into zeros, then subtracted), and after each departure step a recomputation of the flows at least as fast
as the slowest departed one of their connected component, on the capacity the others leave free.

Why compiled: the numpy path spends its time in numpy's fixed cost per call (about a microsecond), not in
arithmetic. A 144-GPU decode dispatch has ~19k flows, ~370 departure steps and ~8 filling steps per
recomputation of ~1,300 flows on average, ~30 numpy calls per filling step: ~100k calls per collective. The
work that must be done is not smaller: the flows a departure can affect are nearly all of those recomputed
(their rates change for ~40% of them), so no exact pruning removes steps (docs/a2a.md). Compiled, a filling step
costs its arithmetic only: it reads its flows' links as rows in order, the links renumbered per recomputation so
that a link's share and test sit side by side. The first call in a fresh install compiles (seconds; cached on
disk for later processes).

Without numba, :data:`AVAILABLE` is False and nothing here is compiled or called.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _numba_njit() -> Any:
    """numba's ``njit``, or None when the optional extra is not installed (the numpy path runs)."""
    try:
        from numba import njit
    except ImportError:
        return None
    return njit


_njit = _numba_njit()
AVAILABLE = _njit is not None


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled (cached on disk, IEEE arithmetic without reordering, numpy's division by zero)."""
    if _njit is None:
        return fn
    compiled: Callable[..., Any] = _njit(cache=True, error_model="numpy")(fn)
    return compiled


@_compiled
def _add_load(target: np.ndarray, links: np.ndarray, flows: np.ndarray, rate: np.ndarray, sign: float,
              tmp: np.ndarray, acc: np.ndarray) -> None:
    """``target += load`` (``sign`` 1) or ``target -= load`` (-1): per link the summed ``rate`` of ``flows``
    (positions in ``links`` [width, held]), as network._load sums it: one bincount per path position (in flow
    order, from zero), the positions added in turn. Only the links of ``flows`` are visited (the others would add
    zero); ``tmp`` and ``acc`` are zero on entry and are left zero."""
    width = links.shape[0]
    for k in range(width):
        for f in flows:
            tmp[links[k, f]] += rate[f]
        for f in flows:  # a link met again adds the zero left behind
            lk = links[k, f]
            acc[lk] += tmp[lk]
            tmp[lk] = 0.0
    for k in range(width):
        for f in flows:
            lk = links[k, f]
            if sign > 0:
                target[lk] += acc[lk]
            else:
                target[lk] -= acc[lk]
            acc[lk] = 0.0


@_compiled
def _gather(links: np.ndarray, flows: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The links of ``flows`` renumbered 0, 1, ... in order of first use, a row per flow (a filling step then
    reads memory in order, and a link's figures sit together); the links in that order, and each one's number
    of flows. ``local`` (-1 on entry, and left so) maps a link to its new number meanwhile."""
    width = links.shape[0]
    rows = np.empty((flows.size, width), dtype=np.int32)  # half the memory a step reads
    used = np.empty(flows.size * width, dtype=np.int64)
    seen = 0
    for k in range(width):
        for i in range(flows.size):
            lk = links[k, flows[i]]
            if local[lk] < 0:
                local[lk] = seen
                used[seen] = lk
                seen += 1
            rows[i, k] = local[lk]
    cnt = np.zeros(seen, dtype=np.int64)
    for i in range(flows.size):
        for k in range(width):
            cnt[rows[i, k]] += 1
    for u in range(seen):
        local[used[u]] = -1
    return rows, used[:seen], cnt


@_compiled
def _local_bottlenecks(rows: np.ndarray, m: int, rem: np.ndarray, cnt: np.ndarray, rel_tol: float,
                       state: np.ndarray, fmin: np.ndarray) -> None:
    """One filling step's tests: ``fmin[i]``, the tightest share of the rising flow of row i < m; per link,
    ``state[u, 0]`` its share and ``state[u, 1]`` 1.0 where it is a local bottleneck (its share at most the
    tightest share, with tolerance, of each of its flows), 0.0 elsewhere."""
    width = rows.shape[1]
    for u in range(rem.size):
        state[u, 0] = rem[u] / cnt[u]
        state[u, 1] = np.inf
    for i in range(m):
        v = state[rows[i, 0], 0]
        for k in range(1, width):
            v = min(v, state[rows[i, k], 0])
        fmin[i] = v
        tight = v * (1 + rel_tol)
        for k in range(width):
            u = rows[i, k]
            state[u, 1] = min(state[u, 1], tight)
    for u in range(rem.size):
        state[u, 1] = 1.0 if state[u, 0] <= state[u, 1] else 0.0


@_compiled
def _freeze(rows: np.ndarray, pos: np.ndarray, m: int, state: np.ndarray, fmin: np.ndarray, rate: np.ndarray,
            cnt: np.ndarray, sums: np.ndarray) -> int:
    """Freezes the rising flows (rows < m, at positions ``pos``) that cross a local bottleneck at their tightest
    share, summing their rates per path position into ``sums``; moves the others' rows to the front, in order,
    and returns how many they are."""
    width = rows.shape[1]
    left = 0
    for i in range(m):
        hit = False
        for k in range(width):
            hit = hit or state[rows[i, k], 1] == 1.0
        if hit:
            rate[pos[i]] = fmin[i]
            for k in range(width):
                u = rows[i, k]
                sums[k, u] += fmin[i]
                cnt[u] -= 1
        else:
            for k in range(width):
                rows[left, k] = rows[i, k]
            pos[left] = pos[i]
            left += 1
    return left


@_compiled
def _max_min(links: np.ndarray, flows: np.ndarray, capacity: np.ndarray, rate: np.ndarray, rel_tol: float,
             local: np.ndarray) -> None:
    """Max-min fair rates of ``flows`` (ascending positions in ``links`` [width, held]) on ``capacity`` (the
    dummy's infinite one last), written to ``rate[flows]``: network._max_min step for step, on the links of
    ``flows`` only. ``local``: -1 per link, scratch."""
    rows, used, cnt = _gather(links, flows, local)
    rem = capacity[used]
    state = np.empty((used.size, 2))
    sums = np.zeros((links.shape[0], used.size))
    pos = flows.copy()
    fmin = np.empty(flows.size)
    m = flows.size
    while True:
        _local_bottlenecks(rows, m, rem, cnt, rel_tol, state, fmin)
        m = _freeze(rows, pos, m, state, fmin, rate, cnt, sums)
        if m == 0:
            return
        for k in range(links.shape[0]):  # position by position, as network._max_min subtracts its bincounts
            for u in range(used.size):
                rem[u] -= sums[k, u]
                sums[k, u] = 0.0


@_compiled
def _departures(pending: np.ndarray, first: float, now: float, rate_tolerance: float, rel_tol: float,
                out: np.ndarray) -> int:
    """How many held flows end in the step whose first end is ``first`` (fluid_ends' grouping), their positions
    put in ``out``."""
    limit = now + (first - now + rate_tolerance * first) * (1 + rel_tol)
    count = 0
    for f in range(pending.size):
        if pending[f] <= limit:
            out[count] = f
            count += 1
    return count


@_compiled
def _rising(done: np.ndarray, rate: np.ndarray, pending: np.ndarray, comp: np.ndarray, num_comps: int,
            rise_tol: float, out: np.ndarray) -> tuple[int, float]:
    """Zeroes the rates of ``done``; puts in ``out`` the held flows whose rate may change, at least the smallest
    departed rate (less ``rise_tol``) of their component. Returns how many, and the earliest end of the others."""
    floor = np.full(num_comps, np.inf)
    if num_comps == 1:
        low = np.inf
        for f in done:
            if rate[f] < low:
                low = rate[f]
        floor[0] = low * (1 - rise_tol)
    else:
        for f in done:
            v = rate[f] * (1 - rise_tol)
            if v < floor[comp[f]]:
                floor[comp[f]] = v
    for f in done:
        rate[f] = 0.0  # never rises again
    count = 0
    first = np.inf
    for f in range(rate.size):
        if rate[f] >= floor[comp[f]]:
            out[count] = f
            count += 1
        elif pending[f] < first:
            first = pending[f]
    return count, first


@_compiled
def _recompute(links: np.ndarray, redo: np.ndarray, rate: np.ndarray, t_end: np.ndarray, pending: np.ndarray,
               free: np.ndarray, now: float, rel_tol: float, work: np.ndarray, scratch: np.ndarray, local: np.ndarray,
               first: float) -> float:
    """New rates of ``redo`` on the capacity the other flows leave (``free``, kept up to date), and their ends;
    returns the earliest of those ends and ``first``."""
    tmp, acc = scratch[0], scratch[1]
    _add_load(free, links, redo, rate, 1.0, tmp, acc)
    capacity = np.empty(free.size)
    for lk in range(free.size - 1):
        v = free[lk]
        capacity[lk] = v if v >= 0.0 else 0.0
    capacity[free.size - 1] = np.inf
    _max_min(links, redo, capacity, work, rel_tol, local)
    _add_load(free, links, redo, work, -1.0, tmp, acc)
    for f in redo:
        remaining = (t_end[f] - now) * rate[f]
        rate[f] = work[f]
        t_end[f] = now + remaining / work[f]
        pending[f] = t_end[f]
        if pending[f] < first:
            first = pending[f]
    return first


@_compiled
def fluid_loop(size: np.ndarray, links: np.ndarray, capacity: np.ndarray, comp: np.ndarray, num_comps: int,
               rate_tolerance: float, rel_tol: float, rise_tol: float) -> tuple[np.ndarray, int]:
    """network.fluid_ends on ``links`` [width, flows] (at least one flow), connected components ``comp``."""
    n, num_links = size.size, capacity.size + 1
    free = np.empty(num_links)
    free[:-1] = capacity
    free[-1] = np.inf
    scratch = np.zeros((2, num_links))
    local = np.full(num_links, -1, dtype=np.int64)
    held = np.arange(n)
    rate, work, end = np.empty(n), np.empty(n), np.empty(n)
    _max_min(links, held, free, rate, rel_tol, local)
    t_end = size / rate
    pending = t_end.copy()
    _add_load(free, links, held, rate, -1.0, scratch[0], scratch[1])
    buf_done, buf_redo = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    now, recomputations, ended = 0.0, 1, 0
    first = np.inf
    for t in pending:
        first = min(first, t)
    while True:
        if first == np.inf:
            return end, recomputations
        count = _departures(pending, first, now, rate_tolerance, rel_tol, buf_done)
        done = buf_done[:count]
        now = -np.inf
        for f in done:
            end[held[f]] = t_end[f]
            now = max(now, t_end[f])
            pending[f] = np.inf
        _add_load(free, links, done, rate, 1.0, scratch[0], scratch[1])
        count, first = _rising(done, rate, pending, comp, num_comps, rise_tol, buf_redo)
        if count:
            first = _recompute(links, buf_redo[:count], rate, t_end, pending, free, now, rel_tol, work, scratch,
                               local, first)
            recomputations += 1
        ended += done.size
        if 2 * ended >= held.size:  # drop the ended flows: later steps scan only the ones left
            keep = pending < np.inf
            held, rate, t_end, pending, comp = held[keep], rate[keep], t_end[keep], pending[keep], comp[keep]
            links = np.ascontiguousarray(links[:, keep])
            work = np.empty(held.size)
            ended = 0
