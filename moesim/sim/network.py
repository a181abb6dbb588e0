"""Flow-level network model: max-min fair bandwidth sharing on the cluster's links, driven by SimPy.

A collective (an all-to-all, or a TP all-gather) is a set of flows, one per ordered GPU pair with bytes to
move, each following its fixed path of links (:mod:`moesim.hardware.topology`). While flows are active,
every link's capacity is shared among the flows crossing it max-min fairly (progressive filling): two
GPUs sending through one NIC get half each; a flow limited elsewhere leaves its unused share to the
others. Rates are recomputed whenever flows finish; a flow's bytes arrive ``path latency`` after its
last byte leaves. Every call first pays the fixed costs of its all-to-all kernel family (:func:`kernel_cost`,
``cluster.a2a_kernels``: NCCL, DeepEP normal, DeepEP low-latency, NVLink one-sided): a launch, an exchange of
counts before a dispatch, a cost per peer; a family may reach its own share of the NVLink and NIC line rates. On a
single GPU (NCCL with one rank) a collective is a device-to-device copy: ``a2a_self_launch_us`` and half the HBM
rate (read and write).

The solver freezes, in one vectorised step, every link whose fair share is the smallest among all links its
flows cross (a local bottleneck): those rates are final, so the number of steps is the depth of the bottleneck
structure, not the number of links; each link's count of rising flows and remaining capacity are updated with
the flows frozen in a step only. Links that can never saturate (their capacity is at least the summed capacity
of the bottleneck links feeding them) are pruned once per topology (:class:`Routing`, built once and shared by
every fabric on the topology; the distinct (link, bottleneck link) pairs behind that test are marked in a
boolean table, not sorted, so 1,024 GPUs' six million path entries take about a second). Flows that share no
link (NVLink inside each node, NICs between nodes) never affect each other's rates, so a departure only
recomputes rates in its own connected component, and there only the flows at least as fast as the departed one:
the slower ones keep their rates exactly. Ended flows are dropped from the loop's arrays once they are half of
those held, so a step scans only the flows still sending (give or take a factor two). The fluid phase is a pure
function of the flows (:func:`fluid_ends`); the fabric schedules its outcome in SimPy time, and reuses it for a
collective whose bytes are a multiple of a recent one's or of their transpose (the combine that mirrors a
dispatch).

With numba installed (the extra ``fast``), the fluid loop runs compiled (:mod:`moesim.sim.fluid_jit`): the same
steps and the same floating-point operations in the same order, so the same end times bit for bit; the numpy loop
pays about a microsecond per numpy call, and a filling step makes some thirty of them.

``rate_tolerance`` trades exactness for speed: after a recomputation, every flow that would finish within
``rate_tolerance x`` the elapsed collective time of the first one finishes in the same step, and the
bandwidth those flows free is handed out at the step's end. 0 is exact max-min; the error this adds to a
collective's duration is bounded by about the tolerance (tested).

Deliberately ignored: packets, congestion control and switch buffers, protocol overheads beyond the
``*_efficiency`` factors, and flows of one collective starting at different times (all start together).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Generator

import numpy as np
import simpy

from moesim.hardware.spec import A2A_ALIASES, A2A_FAMILIES
from moesim.hardware.topology import Topology
from moesim.sim import fluid_jit

_REL_TOL = 1e-9
_RISE_TOL = 1e-6  # flows within this of the departed rate are recomputed too (rounding)
_MARK_LIMIT = 1 << 27  # binding_links marks (link, link) pairs in a boolean table up to this many entries


def _max_min(cols: list[np.ndarray], capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of flows whose links are ``cols`` (one array per path position, padded with
    the unconstrained dummy link ``capacity.size``). Index arrays throughout: numpy's gathers, bincounts and
    (numpy 2) ``minimum.at`` are fast, its masked selections are not. Each link's count of rising flows
    and remaining capacity are updated with the flows frozen in a step only (the same sums as over all
    flows with zeros for the others, bit for bit)."""
    num_links = capacity.size + 1
    rem = np.append(capacity, np.inf)  # the dummy's share is infinite: it never binds
    cnt = np.bincount(cols[0], minlength=num_links)
    for c in cols[1:]:
        cnt += np.bincount(c, minlength=num_links)
    rate = np.empty(cols[0].size)
    idx = np.arange(cols[0].size)  # flows still rising, as positions in the input
    with np.errstate(divide="ignore", invalid="ignore"):  # links left without flows: never looked at
        while True:
            share = rem / cnt  # a link keeps rem > 0 while flows cross it: frozen ones took <= its share
            at = [share[c] for c in cols]  # each flow's share on each of its links
            fmin = at[0]
            for s in at[1:]:
                fmin = np.minimum(fmin, s)  # its tightest link
            # A link is a local bottleneck when none of its flows has a tighter link elsewhere: its share is at
            # most the tightest share (with tolerance) of every flow crossing it.
            tight = fmin * (1 + _REL_TOL)
            bound = np.full(num_links, np.inf)
            for c in cols:
                np.minimum.at(bound, c, tight)
            local = share <= bound
            frozen = local[cols[0]]
            for c in cols[1:]:
                frozen |= local[c]
            done = frozen.nonzero()[0]
            got = fmin[done]
            rate[idx[done]] = got
            if done.size == idx.size:
                return rate
            for c in cols:
                gone = c[done]
                rem -= np.bincount(gone, weights=got, minlength=num_links)
                cnt -= np.bincount(gone, minlength=num_links)
            keep = (~frozen).nonzero()[0]
            idx = idx[keep]
            cols = [c[keep] for c in cols]


def max_min_rates(links: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Max-min fair rates of flows crossing ``links`` [width, flows] (pad with ``capacity.size``).

    Padding entries point one past the last link, an unconstrained dummy. Every flow must cross at least
    one real link. Returns rates in the units of ``capacity``. (Column-major on purpose: numpy reduces
    short rows slowly, so the loops below run over the few columns instead.)
    """
    if links.shape[1] == 0:
        return np.zeros(0)
    return _max_min([np.ascontiguousarray(c) for c in links], capacity)


def _components(cols: list[np.ndarray], num_links: int) -> np.ndarray:
    """Connected component of each flow (flows sharing a link are connected), labelled 0, 1, ...

    Max-min sharing never couples two components, so a component's rates change only when one of its
    own flows finishes. (Label propagation: every flow takes the smallest label of its links, every link
    the smallest label of its flows, until nothing changes; the dummy link joins nothing.)
    """
    label = np.arange(num_links + 1)
    while True:
        flow = label[cols[0]]
        for c in cols[1:]:
            flow = np.minimum(flow, label[c])
        new = label.copy()
        for c in cols:
            np.minimum.at(new, c, flow)
        new[num_links] = num_links
        if (new == label).all():
            return np.unique(flow, return_inverse=True)[1]
        label = new


def _load(cols: list[np.ndarray], rate: np.ndarray, num_links: int) -> np.ndarray:
    """Per link (the dummy last): the summed rate of the flows on links ``cols`` crossing it."""
    load = np.bincount(cols[0], weights=rate, minlength=num_links)
    for c in cols[1:]:
        load += np.bincount(c, weights=rate, minlength=num_links)
    return load


def fluid_ends(size: np.ndarray, cols: list[np.ndarray], capacity: np.ndarray, rate_tolerance: float = 0.0, *,
               compiled: bool | None = None) -> tuple[np.ndarray, int]:
    """When each flow's last byte leaves, for flows of ``size`` bytes all starting at time 0 on links ``cols``
    (as for :func:`max_min_rates`, one array per path position), sharing ``capacity`` max-min fairly; and how many times
    rates were recomputed.

    A departure-only fluid process. When flows end, only the flows whose rate can change are recomputed,
    on the capacity the others leave free: in each connected component that lost flows, those whose rate
    is at least the smallest departed rate. (Exact: progressive filling freezes every flow slower than a
    departed flow f at a link f does not cross, at a level f's absence does not change; and no other flow
    falls below f's rate, since every link f crossed had room for it up to that level.) With
    ``rate_tolerance`` > 0, flows ending within ``rate_tolerance x`` the time of the first end of a step
    end in that step, and their bandwidth is handed out at its end.

    ``compiled``: run the loop compiled by numba (:mod:`moesim.sim.fluid_jit`, the extra ``fast``; the same end
    times bit for bit), the numpy one (False), or the compiled one where numba is installed (None).
    """
    n = size.size
    end = np.empty(n)
    if n == 0:
        return end, 0
    if compiled and not fluid_jit.AVAILABLE:
        raise ValueError("compiled=True needs numba: pip install moesim[fast]")
    num_links = capacity.size + 1
    comp = _components(cols, capacity.size)
    num_comps = int(comp.max()) + 1
    if fluid_jit.AVAILABLE and compiled is not False:
        links = np.ascontiguousarray(np.array(cols, dtype=np.int64).reshape(len(cols), n))
        out, count = fluid_jit.fluid_loop(np.asarray(size, dtype=float), links, np.asarray(capacity, dtype=float),
                                          comp.astype(np.int64), num_comps, rate_tolerance, _REL_TOL, _RISE_TOL)
        return out, int(count)
    single = num_comps == 1
    rate = _max_min(cols, capacity)
    t_end = size / rate
    pending = t_end.copy()  # end times of flows still sending; inf once they ended
    free = np.append(capacity, np.inf) - _load(cols, rate, num_links)  # kept up to date as rates change
    ids = np.arange(n)  # the flows held, as positions in the input (ended ones are dropped once half of them)
    now, recomputations, ended = 0.0, 1, 0
    while True:
        first = pending.min(initial=np.inf)
        if first == np.inf:
            return end, recomputations
        done = (pending <= now + (first - now + rate_tolerance * first) * (1 + _REL_TOL)).nonzero()[0]
        t_done = t_end[done]
        end[ids[done]] = t_done
        now = float(t_done.max())
        pending[done] = np.inf
        gone = rate[done]
        free += _load([c[done] for c in cols], gone, num_links)
        rate[done] = 0.0  # never rises again
        if single:  # the smallest departed rate: flows at least that fast may change
            rising = rate >= gone.min() * (1 - _RISE_TOL)
        else:
            floor = np.full(num_comps, np.inf)
            np.minimum.at(floor, comp[done], gone * (1 - _RISE_TOL))
            rising = rate >= floor[comp]
        redo = rising.nonzero()[0]
        if redo.size:
            sub = [c[redo] for c in cols]
            old = rate[redo]
            free += _load(sub, old, num_links)
            remaining = (t_end[redo] - now) * old
            new = _max_min(sub, np.maximum(free[:-1], 0.0))
            free -= _load(sub, new, num_links)
            rate[redo] = new
            t_end[redo] = pending[redo] = now + remaining / new
            recomputations += 1
        ended += done.size
        if 2 * ended >= ids.size:  # drop the ended flows: later steps scan only the ones left
            keep = (pending < np.inf).nonzero()[0]
            ids, rate, t_end, pending, comp = ids[keep], rate[keep], t_end[keep], pending[keep], comp[keep]
            cols = [c[keep] for c in cols]
            ended = 0


def binding_links(topo: Topology) -> np.ndarray:
    """Mask of links that can ever limit a flow; the others are left out of the rate computation.

    Every pair's path keeps its first and last smallest-capacity links. Another link is dropped when its
    capacity covers the summed capacity of the distinct kept links its flows enter by (or leave by).
    """
    cap, L = topo.capacity, topo.num_links
    lengths = np.diff(topo.path_ptr)
    starts = topo.path_ptr[:-1][lengths > 0]
    if starts.size == 0:
        return np.zeros(L, dtype=bool)
    pair = np.repeat(np.arange(starts.size), lengths[lengths > 0])  # routed pair of each path entry
    link = topo.path_idx
    c = cap[link]
    smallest = np.flatnonzero(c <= np.minimum.reduceat(c, starts)[pair] * (1 + _REL_TOL))
    bounds = np.flatnonzero(np.diff(pair[smallest], prepend=-1, append=-1))
    first = link[smallest[bounds[:-1]]]  # per pair: its first and its last smallest-capacity link
    last = link[smallest[bounds[1:] - 1]]
    keep = np.zeros(L, dtype=bool)
    keep[first] = keep[last] = True
    crossed = np.bincount(link, minlength=L) > 0

    def feeding_capacity(core: np.ndarray) -> np.ndarray:
        """Per link: summed capacity of the distinct ``core`` links of the pairs crossing it."""
        key = link * L + core[pair]
        if L * L <= _MARK_LIMIT:  # mark the (link, core) pairs seen: sorted and distinct, without sorting millions
            seen = np.zeros(L * L, dtype=bool)
            seen[key] = True
            combos = np.flatnonzero(seen)
        else:
            combos = np.unique(key)
        return np.bincount(combos // L, weights=cap[combos % L], minlength=L)

    bound = np.minimum(feeding_capacity(first), feeding_capacity(last))
    return keep | (crossed & (cap < bound * (1 - _REL_TOL)))


@dataclass(frozen=True)
class Routing:
    """What the fabric needs of a topology, computed once: each ordered pair's binding links and, for
    the byte accounting, which pair each entry of ``topo.path_idx`` belongs to. ``mirrored``: the pair
    (d, s) binds on the reverses of (s, d)'s binding links, of equal capacities, for every pair, so a
    collective and its transpose share max-min rates flow for flow."""

    bind: np.ndarray  # [width, G*G] binding links of pair s*G+d, padded with the dummy link L
    path_pair: np.ndarray  # [len(topo.path_idx)]
    mirrored: bool

    @classmethod
    def of(cls, topo: Topology) -> Routing:
        keep = binding_links(topo)
        G, L = topo.num_gpus, topo.num_links
        pair_of_link = np.repeat(np.arange(G * G), np.diff(topo.path_ptr))
        mask = keep[topo.path_idx]
        bind_pair, bind_link = pair_of_link[mask], topo.path_idx[mask]
        width = max(int(np.bincount(bind_pair, minlength=G * G).max()), 1)
        bind = np.full((width, G * G), L, dtype=np.int64)
        pos = np.arange(bind_pair.size) - np.searchsorted(bind_pair, bind_pair)
        bind[pos, bind_pair] = bind_link
        # the reverse of every link (L, the dummy, for the dummy and for links without one); links are
        # numbered in the graph's edge order
        edges = list(topo.graph.edges())
        index = {edge: i for i, edge in enumerate(edges)}
        reverse = np.array([index.get((v, u), L) for u, v in edges] + [L])
        cap = np.append(topo.capacity, np.inf)
        transposed = bind.reshape(width, G, G).transpose(0, 2, 1).reshape(width, G * G)
        mirrored = bool((np.sort(reverse[bind], axis=0) == np.sort(transposed, axis=0)).all()
                        and (cap[reverse[bind]] == cap[bind]).all())
        return cls(bind=bind, path_pair=pair_of_link, mirrored=mirrored)


@dataclass(frozen=True)
class KernelCost:
    """What one all-to-all kernel family costs on a topology: fixed seconds per call, per exchange of counts and
    per peer of the busiest rank, and the link capacities (with their routing) at the family's bandwidth shares."""

    family: str
    launch_s: float
    notify_s: float
    per_peer_s: float
    capacity: np.ndarray
    routing: Routing


def kernel_cost(topo: Topology, family: str, routing: Routing | None = None, *, hooks: bool = False) -> KernelCost:
    """Kernel family ``family``'s costs on ``topo`` from ``cluster.a2a_kernels`` (``routing``: the topology's own,
    reused when the family keeps the links' default shares). NCCL among one GPU is a device copy: it pays
    ``a2a_self_launch_us``. With receive ``hooks`` (two-batch overlap) the receive phase, ``hook_sm_us``, leaves
    the call's fixed cost: the caller runs it on the compute stream once the data landed."""
    cluster = topo.cluster
    spec = cluster.a2a_kernels.family(family)
    launch = spec.launch_us if spec.launch_us is not None else cluster.a2a_launch_us
    if hooks:
        launch = max(launch - spec.hook_sm_us, 0.0)
    if family == "nccl" and topo.num_gpus == 1 and cluster.a2a_self_launch_us is not None:
        launch = cluster.a2a_self_launch_us
    capacity = topo.capacity
    kind = np.array(topo.link_kind)
    for link_kind, share, default in (("nvlink", spec.nvlink_efficiency, cluster.nvlink.efficiency),
                                      ("nic", spec.rdma_efficiency, cluster.network.nic_efficiency)):
        if share is not None and share != default:
            capacity = np.where(kind == link_kind, capacity * (share / default), capacity)
    if capacity is not topo.capacity or routing is None:  # other shares can bind other links
        routing = Routing.of(replace(topo, capacity=capacity))
    return KernelCost(family, launch * 1e-6, spec.notify_us * 1e-6, spec.per_peer_us * 1e-6, capacity, routing)


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


@dataclass(frozen=True)
class _Fluid:
    """A simulated collective's fluid phase: bytes per pair and each flow's last byte out, measured from
    the moment its flows started."""

    nbytes: np.ndarray  # [G, G], zero diagonal
    flow_at: np.ndarray  # [G, G]: index of pair (s, d) in ``end``
    end: np.ndarray  # per flow
    mirrored: bool  # its routing's (Routing.mirrored): the transpose shares its rates
    total: float  # nbytes.sum(): a scaled copy's total is scaled alike (checked before the element-wise test)


def _succeed(event: simpy.Event) -> Callable[[simpy.Event], None]:
    """A callback that succeeds ``event`` (when a GPU's share of a collective is done)."""
    def fire(_: simpy.Event) -> None:
        event.succeed()

    return fire


class Fabric:
    """The cluster's links under SimPy time: runs collectives as max-min fair fluid flows.

    ``routing`` is the topology's :class:`Routing`; pass it when building many fabrics on one topology.
    ``hooks``: the kernels run with receive hooks (:func:`kernel_cost`), as under two-batch overlap.
    A collective whose bytes are those of the previous few scaled by one factor, or of their transpose
    (the combine after its dispatch), reuses their fluid phase scaled in time: same rates, same order,
    nothing to recompute.
    """

    _REMEMBER = 4

    def __init__(self, env: simpy.Environment, topo: Topology, *, rate_tolerance: float = 0.0,
                 routing: Routing | None = None, hooks: bool = False) -> None:
        if rate_tolerance < 0:
            raise ValueError("rate_tolerance must be >= 0")
        self.env = env
        self.topo = topo
        self.rate_tolerance = rate_tolerance
        self.routing = routing if routing is not None else Routing.of(topo)
        self.link_bytes = np.zeros(topo.num_links)
        self.recomputations = 0
        self.local_bytes_per_s = topo.cluster.gpu.local_copy_bytes_per_s
        if topo.num_gpus == 1:  # NCCL with one rank: a device-to-device copy, no kernel of its own
            self.local_bytes_per_s = topo.cluster.gpu.hbm_bytes_per_s / 2
        self.kernels = {name: kernel_cost(topo, name, self.routing, hooks=hooks) for name in A2A_FAMILIES}
        self._recent: dict[str, list[_Fluid]] = {name: [] for name in A2A_FAMILIES}

    def collective(self, name: str, nbytes: np.ndarray, gpu_events: list[simpy.Event] | None = None, *,
                   kernel: str = "nccl", notify: bool = False) -> Generator[simpy.Event, None, CollectiveResult]:
        """Move ``nbytes[s, d]`` from every GPU s to every GPU d with all-to-all kernel family ``kernel``
        (:data:`moesim.hardware.spec.A2A_FAMILIES`); a SimPy process body.

        Starts now (the caller rendezvous all GPUs first) with the kernel's fixed costs: its launch, its
        exchange of counts when ``notify`` (a dispatch's layout step), and its per-peer cost times the peers
        of the busiest rank. ``gpu_events[g]`` succeeds at the moment GPU g has sent and received all its
        bytes, so a GPU can move on before the slowest pair finishes.
        """
        cost = self.kernels[A2A_ALIASES.get(kernel, kernel)]
        env, topo = self.env, self.topo
        G = topo.num_gpus
        start = env.now
        nbytes = np.asarray(nbytes, dtype=float)
        local = np.diag(nbytes).copy()
        off = nbytes.copy()
        np.fill_diagonal(off, 0.0)
        src, dst = np.nonzero(off > 0)
        size = off[src, dst]
        # bytes per link, for utilisation
        self.link_bytes += np.bincount(topo.path_idx, weights=off.ravel()[self.routing.path_pair],
                                       minlength=topo.num_links)

        latency = topo.path_latency[src, dst]
        peers = max(int(np.bincount(src, minlength=G).max(initial=0)),
                    int(np.bincount(dst, minlength=G).max(initial=0)))  # the busiest rank's
        yield env.timeout(cost.launch_s + (cost.notify_s if notify else 0.0) + cost.per_peer_s * peers)
        t0 = env.now
        recomputations = 0
        recent = self._recent[cost.family]
        end = self._recall(recent, off, src, dst)
        if end is None:
            cols = [row[src * G + dst] for row in cost.routing.bind]
            end, recomputations = fluid_ends(size, cols, cost.capacity, self.rate_tolerance)
            if size.size:
                self._remember(recent, off, src, dst, end, cost.routing.mirrored)
        finish = t0 + end + latency
        gpu_done = t0 + local / self.local_bytes_per_s
        for ends in (src, dst):
            np.maximum.at(gpu_done, ends, finish)
        if gpu_events is not None:
            for g, at in enumerate(gpu_done.tolist()):
                env.timeout(at - env.now).callbacks.append(_succeed(gpu_events[g]))
        # Deliveries may end after the fluid phase (latency): wait for the last one.
        yield env.timeout(float(gpu_done.max()) - env.now)
        self.recomputations += recomputations
        return CollectiveResult(name=name, start=start, src=src, dst=dst, nbytes=size, finish=finish,
                                gpu_done=gpu_done, local_bytes=local, recomputations=recomputations)

    def _remember(self, recent: list[_Fluid], off: np.ndarray, src: np.ndarray, dst: np.ndarray,
                  end: np.ndarray, mirrored: bool) -> None:
        G = self.topo.num_gpus
        flow_at = np.zeros((G, G), dtype=np.int64)
        flow_at[src, dst] = np.arange(src.size)
        recent.insert(0, _Fluid(off, flow_at, end, mirrored, float(off.sum())))
        del recent[self._REMEMBER :]

    @staticmethod
    def _recall(recent: list[_Fluid], off: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
        """Fluid end times of the flows (src, dst) of ``off`` if it is a remembered collective scaled by one
        factor, or its transpose on a mirrored routing; None otherwise. Scaling every flow's bytes by c
        scales every end time (and every grouping window) by c."""
        if src.size == 0:
            return None
        total = float(off.sum())  # bytes are >= 0: a match's totals agree to ~1e-12, so 1e-9 never misses one
        for fluid in recent:
            for mirror in (False, True) if fluid.mirrored else (False,):
                ref = fluid.nbytes.T if mirror else fluid.nbytes
                scale = off[src[0], dst[0]] / ref[src[0], dst[0]] if ref[src[0], dst[0]] > 0 else 0.0
                if scale > 0 and abs(total - scale * fluid.total) <= 1e-9 * total \
                        and np.count_nonzero(ref) == src.size and np.allclose(off, ref * scale, rtol=1e-12, atol=0.0):
                    at = fluid.flow_at[dst, src] if mirror else fluid.flow_at[src, dst]
                    return fluid.end[at] * scale
        return None
