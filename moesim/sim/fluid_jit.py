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
(their rates change for ~40% of them), so no exact pruning removes steps. Compiled, a filling step costs its
arithmetic only.

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
def _used_links(links: np.ndarray, flows: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """The distinct links of ``flows``; ``cnt`` (zero on entry) gets each link's number of flows."""
    used = np.empty(flows.size * links.shape[0], dtype=np.int64)
    seen = 0
    for k in range(links.shape[0]):
        for f in flows:
            lk = links[k, f]
            if cnt[lk] == 0:
                used[seen] = lk
                seen += 1
            cnt[lk] += 1
    return used[:seen]


@_compiled
def _local_bottlenecks(links: np.ndarray, idx: np.ndarray, used: np.ndarray, rem: np.ndarray, cnt: np.ndarray,
                       rel_tol: float, share: np.ndarray, bound: np.ndarray, fmin: np.ndarray) -> None:
    """One filling step's tests: ``fmin[i]``, the tightest share of rising flow ``idx[i]``; ``bound[link]`` 1.0
    where the link is a local bottleneck (its share at most the tightest share, with tolerance, of each of its
    flows), 0.0 elsewhere."""
    width = links.shape[0]
    for lk in used:
        share[lk] = rem[lk] / cnt[lk]
        bound[lk] = np.inf
    for i in range(idx.size):
        f = idx[i]
        v = share[links[0, f]]
        for k in range(1, width):
            v = min(v, share[links[k, f]])
        fmin[i] = v
        tight = v * (1 + rel_tol)
        for k in range(width):
            lk = links[k, f]
            bound[lk] = min(bound[lk], tight)
    for lk in used:
        bound[lk] = 1.0 if share[lk] <= bound[lk] else 0.0


@_compiled
def _freeze(links: np.ndarray, idx: np.ndarray, bound: np.ndarray, fmin: np.ndarray, rate: np.ndarray,
            cnt: np.ndarray, sums: np.ndarray) -> int:
    """Freezes the flows of ``idx`` crossing a local bottleneck at their tightest share (their rates summed per
    path position into ``sums``); moves the others to the front of ``idx`` and returns how many they are."""
    width = links.shape[0]
    left = 0
    for i in range(idx.size):
        f = idx[i]
        hit = False
        for k in range(width):
            hit = hit or bound[links[k, f]] == 1.0
        if hit:
            rate[f] = fmin[i]
            for k in range(width):
                lk = links[k, f]
                sums[k, lk] += fmin[i]
                cnt[lk] -= 1
        else:
            idx[left] = f
            left += 1
    return left


@_compiled
def _max_min(links: np.ndarray, flows: np.ndarray, rem: np.ndarray, rate: np.ndarray, rel_tol: float,
             share: np.ndarray, bound: np.ndarray, cnt: np.ndarray, sums: np.ndarray) -> None:
    """Max-min fair rates of ``flows`` (ascending positions in ``links`` [width, held]) on capacities ``rem``
    (the dummy's infinite one last; used up in place), written to ``rate[flows]``: network._max_min step for
    step, visiting only the links of ``flows``. ``cnt`` [links] and ``sums`` [width, links] are zero on entry and
    left zero; ``share`` and ``bound`` are scratch."""
    used = _used_links(links, flows, cnt)
    idx = flows.copy()
    fmin = np.empty(flows.size)
    while True:
        _local_bottlenecks(links, idx, used, rem, cnt, rel_tol, share, bound, fmin)
        left = _freeze(links, idx, bound, fmin, rate, cnt, sums)
        for k in range(links.shape[0]):  # position by position, as network._max_min subtracts its bincounts
            for lk in used:
                rem[lk] -= sums[k, lk]
                sums[k, lk] = 0.0
        if left == 0:
            for lk in used:
                cnt[lk] = 0
            return
        idx = idx[:left]


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
               free: np.ndarray, now: float, rel_tol: float, work: np.ndarray, scratch: np.ndarray, cnt: np.ndarray,
               sums: np.ndarray, first: float) -> float:
    """New rates of ``redo`` on the capacity the other flows leave (``free``, kept up to date), and their ends;
    returns the earliest of those ends and ``first``."""
    tmp, acc, share, bound = scratch[0], scratch[1], scratch[2], scratch[3]
    _add_load(free, links, redo, rate, 1.0, tmp, acc)
    capacity = np.empty(free.size)
    for lk in range(free.size - 1):
        v = free[lk]
        capacity[lk] = v if v >= 0.0 else 0.0
    capacity[free.size - 1] = np.inf
    _max_min(links, redo, capacity, work, rel_tol, share, bound, cnt, sums)
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
    scratch = np.zeros((4, num_links))
    cnt = np.zeros(num_links, dtype=np.int64)
    sums = np.zeros((links.shape[0], num_links))
    held = np.arange(n)
    rate, work, end = np.empty(n), np.empty(n), np.empty(n)
    _max_min(links, held, free.copy(), rate, rel_tol, scratch[2], scratch[3], cnt, sums)
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
            first = _recompute(links, buf_redo[:count], rate, t_end, pending, free, now, rel_tol, work, scratch, cnt,
                               sums, first)
            recomputations += 1
        ended += done.size
        if 2 * ended >= held.size:  # drop the ended flows: later steps scan only the ones left
            keep = pending < np.inf
            held, rate, t_end, pending, comp = held[keep], rate[keep], t_end[keep], pending[keep], comp[keep]
            links = np.ascontiguousarray(links[:, keep])
            work = np.empty(held.size)
            ended = 0
