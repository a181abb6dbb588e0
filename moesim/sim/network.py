"""Flow-level network model: max-min fair bandwidth sharing on the cluster's links, driven by SimPy.

A collective (an all-to-all, or a TP all-gather) is a set of flows, one per ordered GPU pair with bytes to
move, each following its fixed path of links (:mod:`moesim.hardware.topology`). While flows are active,
every link's capacity is shared among the flows crossing it max-min fairly (progressive filling): two
GPUs sending through one NIC get half each; a flow limited elsewhere leaves its unused share to the
others. Rates are recomputed whenever flows finish; a flow's bytes arrive ``path latency`` after its
last byte leaves, and every call pays the cluster's fixed ``a2a_launch_us``.

The solver freezes, in one vectorised step, every link whose fair share is the smallest among all links
its flows cross (a local bottleneck): those rates are final, so the number of steps is the depth of the
bottleneck structure, not the number of links. Links that can never saturate (their capacity is at least
the summed capacity of the bottleneck links feeding them) are pruned once per topology.

``rate_tolerance`` trades exactness for speed: after a recomputation, every flow that would finish within
``rate_tolerance x`` the elapsed collective time of the first one finishes in the same step, and the
bandwidth those flows free is handed out at the step's end. 0 is exact max-min; the error this adds to a
collective's duration is bounded by about the tolerance (tested).

Deliberately ignored: packets, congestion control and switch buffers, protocol overheads beyond the
``*_efficiency`` factors, and flows of one collective starting at different times (all start together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import numpy as np
import simpy

from moesim.hardware.topology import Topology

_REL_TOL = 1e-9


def max_min_rates(links: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of flows crossing ``links`` [width, flows] (pad with ``capacity.size``).

    Padding entries point one past the last link, an unconstrained dummy. Every flow must cross at least
    one real link. Returns rates in the units of ``capacity``. (Column-major on purpose: numpy reduces
    short rows slowly, so the loops below run over the few columns instead.)
    """
    width, num_flows = links.shape
    L = capacity.size
    rate = np.zeros(num_flows)
    rem = np.append(capacity.astype(float), np.inf)
    cnt = np.bincount(links.ravel(), minlength=L + 1).astype(float)
    cnt[L] = 0.0
    idx = np.arange(num_flows)
    cols = list(links)
    while idx.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(cnt > 0, np.maximum(rem, 0.0) / cnt, np.inf)
        flow_min = share[cols[0]]
        for c in cols[1:]:
            flow_min = np.minimum(flow_min, share[c])  # each flow's tightest link
        link_min = np.full(L + 1, np.inf)
        for c in cols:
            np.minimum.at(link_min, c, flow_min)
        local = share <= link_min * (1 + _REL_TOL)  # no flow on it can do better elsewhere
        local[L] = False
        frozen = local[cols[0]]
        for c in cols[1:]:
            frozen |= local[c]
        rate[idx[frozen]] = flow_min[frozen]
        got = flow_min[frozen]
        for c in cols:
            cf = c[frozen]
            rem -= np.bincount(cf, weights=got, minlength=L + 1)
            cnt -= np.bincount(cf, minlength=L + 1)
        cnt[L] = 0.0
        keep = ~frozen
        idx = idx[keep]
        cols = [c[keep] for c in cols]
    return rate


def binding_links(topo: Topology) -> np.ndarray:
    """Mask of links that can ever limit a flow; the others are left out of the rate computation.

    Every pair's path keeps its first and last smallest-capacity links. Another link is dropped when its
    capacity covers the summed capacity of the distinct kept links its flows enter by (or leave by).
    """
    G = topo.num_gpus
    cap = topo.capacity
    keep = np.zeros(topo.num_links, dtype=bool)
    first_core: dict[int, set[int]] = {}
    last_core: dict[int, set[int]] = {}
    for s in range(G):
        for d in range(G):
            if s == d:
                continue
            path = topo.path(s, d)
            c = cap[path]
            lo = c.min()
            first = int(path[np.flatnonzero(c <= lo * (1 + _REL_TOL))[0]])
            last = int(path[np.flatnonzero(c <= lo * (1 + _REL_TOL))[-1]])
            keep[first] = keep[last] = True
            for link in path.tolist():
                first_core.setdefault(link, set()).add(first)
                last_core.setdefault(link, set()).add(last)
    for link in range(topo.num_links):
        if keep[link] or link not in first_core:
            continue
        bound = min(cap[list(first_core[link])].sum(), cap[list(last_core[link])].sum())
        if cap[link] < bound * (1 - _REL_TOL):
            keep[link] = True
    return keep


@dataclass
class CollectiveResult:
    """What one collective did: per-flow and per-GPU times (absolute simulation seconds)."""

    name: str
    start: float  # when the last GPU joined
    src: np.ndarray  # per flow
    dst: np.ndarray
    nbytes: np.ndarray
    finish: np.ndarray  # last byte delivered (includes path latency)
    gpu_done: np.ndarray  # [G] when each GPU's sends and receives are all done
    local_bytes: np.ndarray  # [G] bytes a GPU keeps (copied locally, not on the network)
    recomputations: int


class Fabric:
    """The cluster's links under SimPy time: runs collectives as max-min fair fluid flows."""

    def __init__(self, env: simpy.Environment, topo: Topology, *, rate_tolerance: float = 0.0) -> None:
        if rate_tolerance < 0:
            raise ValueError("rate_tolerance must be >= 0")
        self.env = env
        self.topo = topo
        self.rate_tolerance = rate_tolerance
        self.launch_s = topo.cluster.a2a_launch_us * 1e-6
        self.link_bytes = np.zeros(topo.num_links)
        self.recomputations = 0
        keep = binding_links(topo)
        G = topo.num_gpus
        # Per ordered pair: its binding links, padded with the dummy link L; the path links for accounting.
        lengths = np.diff(topo.path_ptr)
        pair_of_link = np.repeat(np.arange(G * G), lengths)
        mask = keep[topo.path_idx]
        bind_pair, bind_link = pair_of_link[mask], topo.path_idx[mask]
        width = max(int(np.bincount(bind_pair, minlength=G * G).max()), 1)
        self._bind = np.full((width, G * G), topo.num_links, dtype=np.int64)
        pos = np.arange(bind_pair.size) - np.searchsorted(bind_pair, bind_pair)
        self._bind[pos, bind_pair] = bind_link
        self._path_pair = pair_of_link
        self.local_bytes_per_s = topo.cluster.gpu.hbm_bytes_per_s / 2  # a local copy reads and writes

    def collective(self, name: str, nbytes: np.ndarray, gpu_events: list[simpy.Event] | None = None,
                   ) -> Generator[simpy.Event, None, CollectiveResult]:
        """Move ``nbytes[s, d]`` from every GPU s to every GPU d; a SimPy process body.

        Starts now (the caller rendezvous all GPUs first). ``gpu_events[g]`` succeeds at the moment GPU g
        has sent and received all its bytes, so a GPU can move on before the slowest pair finishes.
        """
        env, topo = self.env, self.topo
        G = topo.num_gpus
        start = env.now
        nbytes = np.asarray(nbytes, dtype=float)
        local = np.diag(nbytes).copy()
        off = nbytes.copy()
        np.fill_diagonal(off, 0.0)
        src, dst = np.nonzero(off > 0)
        size = off[src, dst]
        pair = src * G + dst
        # bytes per link, for utilisation
        pair_bytes = np.zeros(G * G)
        pair_bytes[pair] = size
        self.link_bytes += np.bincount(self.topo.path_idx, weights=pair_bytes[self._path_pair],
                                       minlength=topo.num_links)

        finish = np.full(size.size, np.nan)
        t0 = start + self.launch_s
        gpu_done = t0 + local / self.local_bytes_per_s
        pending = np.bincount(src, minlength=G) + np.bincount(dst, minlength=G)

        def release(gpus: np.ndarray) -> None:
            if gpu_events is None:
                return
            for g in gpus.tolist():
                delay = gpu_done[g] - env.now
                env.timeout(delay).callbacks.append(lambda _, ev=gpu_events[g]: ev.succeed())

        yield env.timeout(self.launch_s)
        release(np.flatnonzero(pending == 0))
        active = np.arange(size.size)
        remaining = size.copy()
        recomputations = 0
        while active.size:
            rate = max_min_rates(self._bind[:, pair[active]], topo.capacity)
            recomputations += 1
            dt = remaining / rate
            first = dt.min()
            horizon = first + self.rate_tolerance * (env.now - t0 + first)
            done = dt <= horizon * (1 + _REL_TOL)
            step = dt[done].max()
            fin = active[done]
            finish[fin] = env.now + dt[done] + topo.path_latency[src[fin], dst[fin]]
            np.maximum.at(gpu_done, src[fin], finish[fin])
            np.maximum.at(gpu_done, dst[fin], finish[fin])
            before = pending.copy()
            pending -= np.bincount(src[fin], minlength=G) + np.bincount(dst[fin], minlength=G)
            release(np.flatnonzero((pending == 0) & (before > 0)))
            remaining = remaining[~done] - rate[~done] * step
            np.maximum(remaining, 0.0, out=remaining)
            active = active[~done]
            yield env.timeout(step)

        # Deliveries may end after the fluid phase (latency): wait for the last one.
        last = float(gpu_done.max())
        if last > env.now:
            yield env.timeout(last - env.now)
        self.recomputations += recomputations
        return CollectiveResult(name=name, start=start, src=src, dst=dst, nbytes=size, finish=finish,
                                gpu_done=gpu_done, local_bytes=local, recomputations=recomputations)
