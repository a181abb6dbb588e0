"""Analytic cross-checks of the fluid max-min network (moesim.sim.network).

Closed forms are derived by hand from the cluster's spec (line rate x efficiency, per-hop latency), not
read back from the topology, so they check the graph as well as the solver.
"""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.hardware import build_topology
from moesim.sim import fluid_jit
from moesim.sim.network import Fabric, fluid_ends, max_min_rates

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def nvlink_rate(spec) -> float:
    return spec.nvlink.GBps * 1e9 * spec.nvlink.efficiency


def nic_rate(spec) -> float:
    return spec.network.nic_Gbps / 8 * 1e9 * spec.network.nic_efficiency


def inter_latency(spec, src: int, dst: int) -> float:
    """NIC -> leaf -> NIC, plus leaf -> spine -> leaf when the rails differ (rail-optimised leaves)."""
    net = spec.network
    same_rail = src % spec.gpus_per_node == dst % spec.gpus_per_node
    return net.latency_us * 1e-6 + (0.0 if same_rail else 2 * net.hop_latency_us * 1e-6)


def uniform(G: int, nbytes: float) -> np.ndarray:
    m = np.full((G, G), float(nbytes))
    np.fill_diagonal(m, 0.0)
    return m


def flow_finish(result, src: int, dst: int) -> float:
    k = np.flatnonzero((result.src == src) & (result.dst == dst))
    assert k.size == 1, f"no single flow {src}->{dst}"
    return float(result.finish[k[0]])


# ---------------------------------------------------------------- (a) uniform all-to-all in one node

@pytest.mark.parametrize("nbytes", [1e3, 1e6, 3.7e7])
def test_uniform_all_to_all_one_node_closed_form(node8, collective, nbytes):
    spec = node8.cluster
    G = spec.num_gpus
    result = collective(node8, uniform(G, nbytes))
    launch = spec.a2a_launch_us * 1e-6
    latency = spec.nvlink.latency_us * 1e-6  # gpu -> nvswitch (half) -> gpu (half)
    expected = launch + (G - 1) * nbytes / nvlink_rate(spec) + latency
    assert result.start == 0.0
    assert result.gpu_done == pytest.approx(np.full(G, expected), rel=1e-12)
    assert result.finish == pytest.approx(np.full(G * (G - 1), expected), rel=1e-12)
    assert result.nbytes.sum() == pytest.approx(G * (G - 1) * nbytes)
    assert node8.path_latency[0, 1] == pytest.approx(latency)


def test_nvlink_rate_is_line_rate_times_efficiency(node8):
    """450 GB/s per direction x the efficiency fitted on 2x H200 (0.70: 315 GB/s, between the 324 GB/s
    per direction of a 1 GiB bidirectional all-to-all and the 366 GB/s of one-way p2p)."""
    eff = node8.cluster.nvlink.efficiency
    assert 300e9 < 450e9 * eff < 370e9
    assert nvlink_rate(node8.cluster) == pytest.approx(450e9 * eff)
    assert node8.capacity == pytest.approx(np.full(node8.num_links, 450e9 * eff))


def test_local_bytes_are_a_memory_copy_not_network_traffic(node8, collective):
    spec = node8.cluster
    m = np.diag(np.arange(1, 9) * 1e6)
    result = collective(node8, m)
    assert result.src.size == 0
    copy_rate = spec.gpu.local_copy_GBps * 1e9  # fitted on 2x H200: a collective's copy to its own rank
    expected = spec.a2a_launch_us * 1e-6 + np.arange(1, 9) * 1e6 / copy_rate
    assert result.gpu_done == pytest.approx(expected, rel=1e-12)
    assert result.local_bytes == pytest.approx(np.diag(m))


def test_empty_collective_costs_the_launch_only(node8, collective):
    result = collective(node8, np.zeros((8, 8)))
    assert result.gpu_done == pytest.approx(np.full(8, node8.cluster.a2a_launch_us * 1e-6))
    assert result.recomputations == 0


def test_gpu_events_fire_when_each_gpu_is_done(nodes2x4):
    """A GPU is released at its own last byte, not at the slowest pair's."""
    env = simpy.Environment()
    fabric = Fabric(env, nodes2x4, rate_tolerance=0.0)
    m = np.zeros((8, 8))
    m[0, 1] = 1e6  # intra-node, NVLink
    m[2, 5] = 1e7  # inter-node, NIC
    events = [env.event() for _ in range(8)]
    fired = np.full(8, np.nan)
    for g, ev in enumerate(events):
        ev.callbacks.append(lambda _, g=g: fired.__setitem__(g, env.now))
    proc = env.process(fabric.collective("x", m, events))
    env.run()
    result = proc.value
    assert fired == pytest.approx(result.gpu_done, rel=1e-12)
    assert fired[0] < fired[2]
    assert env.now == pytest.approx(result.gpu_done.max())


def test_link_bytes_accumulate_over_collectives(nodes2x8):
    env = simpy.Environment()
    fabric = Fabric(env, nodes2x8, rate_tolerance=0.0)
    m = uniform(16, 1e6)

    def two():
        yield from fabric.collective("a", m)
        yield from fabric.collective("b", m)

    env.process(two())
    env.run()
    names = nodes2x8.link_names
    # GPU 0 sends 7 MB over NVLink and 8 MB through its NIC per collective.
    assert fabric.link_bytes[names.index("gpu0->nvsw0")] == pytest.approx(2 * 7e6)
    assert fabric.link_bytes[names.index("nic0->leaf0")] == pytest.approx(2 * 8e6)
    assert fabric.link_bytes[names.index("gpu0->nic0")] == pytest.approx(2 * 8e6)


def test_negative_rate_tolerance_is_rejected(node8):
    with pytest.raises(ValueError, match="rate_tolerance"):
        Fabric(simpy.Environment(), node8, rate_tolerance=-0.1)


# ---------------------------------------------------------------- (b) uniform all-to-all on 2 nodes

def test_uniform_all_to_all_two_nodes_nic_bound(nodes2x8, collective):
    spec = nodes2x8.cluster
    G, per, B = spec.num_gpus, spec.gpus_per_node, 1e6
    result = collective(nodes2x8, uniform(G, B))
    launch = spec.a2a_launch_us * 1e-6
    nv, nic = nvlink_rate(spec), nic_rate(spec)
    assert nic == pytest.approx(47e9)  # 400 Gb/s x 0.94
    remote = spec.num_gpus - per  # each GPU's 8 remote flows share its NIC
    for s, d, fin in zip(result.src.tolist(), result.dst.tolist(), result.finish.tolist()):
        if s // per == d // per:
            expected = launch + (per - 1) * B / nv + spec.nvlink.latency_us * 1e-6
        else:
            expected = launch + remote * B / nic + inter_latency(spec, s, d)
        assert fin == pytest.approx(expected, rel=1e-12), (s, d)
    # every GPU has cross-rail partners, so its last byte pays two spine hops
    done = launch + remote * B / nic + inter_latency(spec, 0, 9)
    assert result.gpu_done == pytest.approx(np.full(G, done), rel=1e-12)
    intra = result.src // per == result.dst // per
    assert result.finish[intra].max() < result.finish[~intra].min()


def test_inter_node_path_latency(nodes2x8):
    spec = nodes2x8.cluster
    assert nodes2x8.path_latency[0, 8] == pytest.approx(inter_latency(spec, 0, 8))  # same rail: 3 us
    assert nodes2x8.path_latency[0, 9] == pytest.approx(inter_latency(spec, 0, 9))  # via the spine: 4 us
    assert nodes2x8.path_latency[0, 8] == pytest.approx(3e-6)
    assert nodes2x8.path_latency[0, 9] == pytest.approx(4e-6)


# ---------------------------------------------------------------- NICs shared by several GPUs

@pytest.fixture(scope="module")
def shared_nics(cluster):
    """Two HGX H200 nodes with 2x 400 Gb/s NICs each, 4 GPUs per NIC (GPUs behind one PCIe switch)."""
    return build_topology(cluster(nodes=2, network={"nics_per_node": 2}))


@pytest.mark.parametrize("tol", [0.0, 0.01])
def test_gpus_behind_one_nic_share_it(nodes2x8, shared_nics, collective, tol):
    """All 8 GPUs of node 0 send B to their same-local-rank peer on node 1 at once: 4 flows share each NIC
    (and the peer NIC they enter by), so 4 B / nic, where one NIC per GPU takes B / nic."""
    spec = shared_nics.cluster
    nic, launch, B = nic_rate(spec), spec.a2a_launch_us * 1e-6, 4e6
    lat = spec.network.latency_us * 1e-6  # same rail: NIC -> leaf -> NIC, no spine
    m = np.zeros((16, 16))
    for g in range(8):
        m[g, g + 8] = B
    for topo, per_nic in ((nodes2x8, 1), (shared_nics, 4)):
        result = collective(topo, m, rate_tolerance=tol)
        span = per_nic * B / nic + lat
        # rate_tolerance may end a flow up to 2 x tol x (the collective's span) off the exact time
        assert result.finish == pytest.approx(np.full(8, launch + span), rel=1e-12, abs=2 * tol * span)
        assert topo.path_latency[0, 8] == pytest.approx(lat)
    # one GPU per NIC group: each has a NIC to itself again
    one = np.zeros((16, 16))
    one[0, 8] = one[4, 12] = B
    assert collective(shared_nics, one).finish == pytest.approx([launch + B / nic + lat] * 2, rel=1e-12)


def test_uniform_all_to_all_with_shared_nics(shared_nics, collective):
    """Every NIC carries 4 GPUs x 8 remote peers flows of B each way; the spine (2 NICs of uplink per leaf)
    never binds, so every remote flow runs at nic / 32."""
    spec = shared_nics.cluster
    G, B = spec.num_gpus, 1e6
    nic, nv, launch = nic_rate(spec), nvlink_rate(spec), spec.a2a_launch_us * 1e-6
    net = spec.network
    result = collective(shared_nics, uniform(G, B))
    for s, d, fin in zip(result.src.tolist(), result.dst.tolist(), result.finish.tolist()):
        if s // 8 == d // 8:
            expected = launch + 7 * B / nv + spec.nvlink.latency_us * 1e-6
        else:
            same_rail = s % 8 // 4 == d % 8 // 4
            lat = net.latency_us * 1e-6 + (0.0 if same_rail else 2 * net.hop_latency_us * 1e-6)
            expected = launch + 4 * 8 * B / nic + lat
        assert fin == pytest.approx(expected, rel=1e-12), (s, d)


# ---------------------------------------------------------------- (c) contention on one shared link

def test_two_senders_into_one_nic_share_it(nodes2x8, collective):
    spec = nodes2x8.cluster
    nic, launch, B = nic_rate(spec), spec.a2a_launch_us * 1e-6, 4e6
    m = np.zeros((16, 16))
    m[0, 8] = m[1, 8] = B  # both enter GPU 8 through its NIC
    m[2, 10] = B  # same rail, own NICs: not slowed
    m[3, 12] = B  # across rails through the spine: not slowed
    result = collective(nodes2x8, m)
    for s, d in ((0, 8), (1, 8)):
        assert flow_finish(result, s, d) == pytest.approx(launch + B / (nic / 2) + inter_latency(spec, s, d),
                                                          rel=1e-12)
    for s, d in ((2, 10), (3, 12)):
        assert flow_finish(result, s, d) == pytest.approx(launch + B / nic + inter_latency(spec, s, d), rel=1e-12)
    only = np.zeros((16, 16))
    only[0, 8] = B  # without the competitor, the whole NIC
    alone = collective(nodes2x8, only)
    assert flow_finish(alone, 0, 8) == pytest.approx(launch + B / nic + inter_latency(spec, 0, 8), rel=1e-12)


@pytest.fixture(scope="module")
def oversubscribed(cluster):
    """2 nodes, one leaf per node, leaf uplink = one NIC's worth (8:1 oversubscribed)."""
    return build_topology(cluster(nodes=2, network={"rail_optimized": False, "nodes_per_leaf": 1,
                                                      "oversubscription": 8.0}))


def test_oversubscribed_uplink_is_shared(oversubscribed, collective):
    spec = oversubscribed.cluster
    nic, nv, launch, B = nic_rate(spec), nvlink_rate(spec), spec.a2a_launch_us * 1e-6, 4e6
    uplink = oversubscribed.capacity[oversubscribed.link_names.index("leaf0->spine")]
    assert uplink == pytest.approx(nic)
    m = np.zeros((16, 16))
    m[0, 8] = m[1, 9] = B  # both cross leaf0 -> spine -> leaf1
    m[10, 2] = B  # the other direction: its own uplink, not slowed
    m[3, 4] = B  # NVLink inside node 0, not slowed
    result = collective(oversubscribed, m)
    lat = spec.network.latency_us * 1e-6 + 2 * spec.network.hop_latency_us * 1e-6
    assert oversubscribed.path_latency[0, 8] == pytest.approx(lat)
    for s, d in ((0, 8), (1, 9)):
        assert flow_finish(result, s, d) == pytest.approx(launch + B / (uplink / 2) + lat, rel=1e-12)
    assert flow_finish(result, 10, 2) == pytest.approx(launch + B / nic + lat, rel=1e-12)
    assert flow_finish(result, 3, 4) == pytest.approx(launch + B / nv + spec.nvlink.latency_us * 1e-6, rel=1e-12)


def test_non_oversubscribed_uplink_does_not_slow_flows(cluster, collective):
    topo = build_topology(cluster(nodes=2, network={"rail_optimized": False, "nodes_per_leaf": 1}))
    spec = topo.cluster
    m = np.zeros((16, 16))
    m[0, 8] = m[1, 9] = 4e6
    result = collective(topo, m)
    lat = spec.network.latency_us * 1e-6 + 2 * spec.network.hop_latency_us * 1e-6
    expected = spec.a2a_launch_us * 1e-6 + 4e6 / nic_rate(spec) + lat
    assert result.finish == pytest.approx([expected, expected], rel=1e-12)


def test_rates_recover_when_a_competitor_finishes(nodes2x8, collective):
    """Two flows share GPU 8's NIC; the short one finishes, the long one then gets the whole NIC."""
    spec = nodes2x8.cluster
    nic, launch = nic_rate(spec), spec.a2a_launch_us * 1e-6
    m = np.zeros((16, 16))
    m[0, 8], m[1, 8] = 1e6, 3e6
    result = collective(nodes2x8, m)
    t_short = 1e6 / (nic / 2)
    assert flow_finish(result, 0, 8) == pytest.approx(launch + t_short + inter_latency(spec, 0, 8), rel=1e-12)
    t_long = t_short + (3e6 - 1e6) / nic
    assert flow_finish(result, 1, 8) == pytest.approx(launch + t_long + inter_latency(spec, 1, 8), rel=1e-12)


def test_per_gpu_times_are_not_monotone_in_bytes_under_max_min(node8, collective):
    """Why test (f) asserts the makespan and the grown flow, not every GPU.

    GPU 0 sends a to GPUs 1 and 3 and c to GPU 2; GPU 4 sends c to GPU 2. GPU 0's NVLink is the bottleneck
    (nv/3 each), so GPU 4 gets the rest of GPU 2's ingress, 2nv/3, until GPU 0's short flows end at 3a/nv;
    then it shares GPU 2's ingress at nv/2 and ends at (2c - a)/nv. More bytes a => GPU 4 ends *earlier*.
    """
    spec = node8.cluster
    nv, launch, lat, c = nvlink_rate(spec), spec.a2a_launch_us * 1e-6, spec.nvlink.latency_us * 1e-6, 1e6
    done4 = []
    for a in (1e5, 2e5):
        m = np.zeros((8, 8))
        m[0, 1] = m[0, 3] = a
        m[0, 2] = m[4, 2] = c
        result = collective(node8, m)
        assert result.gpu_done[4] == pytest.approx(launch + (2 * c - a) / nv + lat, rel=1e-12)
        assert result.gpu_done.max() == pytest.approx(launch + 2 * c / nv + lat, rel=1e-12)
        done4.append(result.gpu_done[4])
    assert done4[1] < done4[0]


# ---------------------------------------------------------------- (d) solver vs textbook progressive filling

def progressive_filling(paths: list[list[int]], capacity: list[float]) -> list[float]:
    """Textbook max-min: raise every unfrozen flow's rate together; the first link to fill freezes its flows."""
    n = len(paths)
    rate = [0.0] * n
    frozen = [False] * n
    used = [0.0] * len(capacity)
    while not all(frozen):
        best = None
        for link, cap in enumerate(capacity):
            active = [f for f in range(n) if not frozen[f] and link in paths[f]]
            if active:
                level = (cap - used[link]) / len(active)
                if best is None or level < best[0]:
                    best = (level, active)
        assert best is not None
        level, active = best
        for f in active:
            rate[f], frozen[f] = level, True
            for link in paths[f]:
                used[link] += level
    return rate


def as_link_matrix(paths: list[list[int]], num_links: int) -> np.ndarray:
    width = max(len(p) for p in paths)
    links = np.full((width, len(paths)), num_links, dtype=np.int64)  # pad with the dummy link
    for f, p in enumerate(paths):
        links[: len(p), f] = p
    return links


@st.composite
def max_min_instances(draw):
    num_links = draw(st.integers(1, 6))
    caps = st.one_of(st.sampled_from([1.0, 2.0, 3.0, 6.0]), st.floats(0.5, 100.0))  # ties matter
    capacity = draw(st.lists(caps, min_size=num_links, max_size=num_links))
    num_flows = draw(st.integers(1, 10))
    path = st.lists(st.integers(0, num_links - 1), min_size=1, max_size=min(4, num_links), unique=True)
    paths = draw(st.lists(path, min_size=num_flows, max_size=num_flows))
    return capacity, paths


@SETTINGS
@given(max_min_instances())
def test_max_min_rates_equal_progressive_filling(instance):
    capacity, paths = instance
    got = max_min_rates(as_link_matrix(paths, len(capacity)), np.array(capacity))
    want = progressive_filling(paths, capacity)
    assert got.tolist() == pytest.approx(want, rel=1e-9)


def recount_filling(links: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """The solver's filling as first written: every step recounts each link's rising flows and subtracts the
    frozen rates with zeros for the others (the solver now updates both with the frozen flows only)."""
    cols = [np.ascontiguousarray(c) for c in links]
    num_links = capacity.size + 1
    rem, rate, idx = np.append(capacity, np.inf), np.empty(cols[0].size), np.arange(cols[0].size)
    with np.errstate(divide="ignore", invalid="ignore"):
        while True:
            cnt = sum(np.bincount(c, minlength=num_links) for c in cols)
            share = rem / cnt
            at = [share[c] for c in cols]
            fmin = np.minimum.reduce(at)
            escapes = sum(np.bincount(c, weights=s > fmin * (1 + 1e-9), minlength=num_links) for c, s in zip(cols, at))
            frozen = np.logical_or.reduce([(escapes == 0)[c] for c in cols])
            rate[idx[frozen]] = fmin[frozen]
            if frozen.all():
                return rate
            for c in cols:
                rem -= np.bincount(c, weights=np.where(frozen, fmin, 0.0), minlength=num_links)
            idx, cols = idx[~frozen], [c[~frozen] for c in cols]


@SETTINGS
@given(max_min_instances())
def test_max_min_rates_bit_identical_to_recounting(instance):
    """Updating counts and capacities with the frozen flows only adds the same numbers in the same order."""
    capacity, paths = instance
    links = as_link_matrix(paths, len(capacity))
    assert np.array_equal(max_min_rates(links, np.array(capacity)), recount_filling(links, np.array(capacity)))


@SETTINGS
@given(max_min_instances())
def test_max_min_rates_are_feasible_and_bottlenecked(instance):
    """Max-min characterisation: no link over capacity; each flow crosses a full link where it is largest."""
    capacity, paths = instance
    cap = np.array(capacity)
    rate = max_min_rates(as_link_matrix(paths, cap.size), cap)
    assert (rate > 0).all()
    load = np.zeros(cap.size)
    for f, p in enumerate(paths):
        load[p] += rate[f]
    assert (load <= cap * (1 + 1e-9)).all()
    for f, p in enumerate(paths):
        on = [link for link in p
              if load[link] >= cap[link] * (1 - 1e-9)
              and all(rate[f] >= rate[g] * (1 - 1e-9) for g, q in enumerate(paths) if link in q)]
        assert on, f"flow {f} has no bottleneck link"


def test_max_min_rates_textbook_example():
    """Three flows on link 0 (cap 3), one of them also alone on link 1 (cap 0.5): 0.5, then 1.25 each."""
    links = np.array([[0, 0, 0], [1, 2, 2]])  # flow 0 crosses links 0 and 1; link 2 is the padding dummy
    rate = max_min_rates(links, np.array([3.0, 0.5]))
    assert rate.tolist() == pytest.approx([0.5, 1.25, 1.25])


def reference_collective(topo, m: np.ndarray) -> np.ndarray:
    """A plain fluid simulation over every link of every path (no pruning): [G] per-GPU done times."""
    G = topo.num_gpus
    launch = topo.cluster.a2a_launch_us * 1e-6
    local = np.diag(m) / topo.cluster.gpu.local_copy_bytes_per_s
    done = launch + local
    flows = [(s, d) for s in range(G) for d in range(G) if s != d and m[s, d] > 0]
    paths = [topo.path(s, d).tolist() for s, d in flows]
    remaining = [float(m[s, d]) for s, d in flows]
    active, now = list(range(len(flows))), 0.0
    while active:
        rates = progressive_filling([paths[i] for i in active], topo.capacity.tolist())
        step = min(remaining[i] / r for i, r in zip(active, rates))
        for i, r in zip(active, rates):
            remaining[i] -= r * step
        now += step
        finished = [i for i in active if remaining[i] <= 1e-9 * m[flows[i]]]
        for i in finished:
            s, d = flows[i]
            t = launch + now + topo.path_latency[s, d]
            done[s], done[d] = max(done[s], t), max(done[d], t)
        active = [i for i in active if i not in finished]
    return done


@pytest.fixture(scope="module")
def fabrics(cluster):
    """Small clusters where NICs, the spine or PCIe can each be the bottleneck."""
    return [
        build_topology(cluster(nodes=2, gpus_per_node=4)),
        build_topology(cluster(nodes=2, gpus_per_node=4, network={"rail_optimized": False, "nodes_per_leaf": 1,
                                                                   "oversubscription": 4.0})),
        build_topology(cluster(nodes=4, gpus_per_node=2, network={"rail_optimized": False, "nodes_per_leaf": 2,
                                                                   "oversubscription": 1.5, "pcie_GBps": 30.0})),
    ]


@SETTINGS
@given(st.integers(0, 2), st.lists(st.sampled_from([0, 0, 1, 2, 5, 13]), min_size=64, max_size=64))
def test_fabric_matches_a_plain_fluid_simulation(fabrics, collective, which, values):
    """End to end: link pruning, the vectorised solver and the event loop against the obvious simulation."""
    topo = fabrics[which]
    m = np.array(values, dtype=float).reshape(8, 8) * 1e6
    got = collective(topo, m)
    np.testing.assert_allclose(got.gpu_done, reference_collective(topo, m), rtol=1e-9)


# ---------------------------------------------------------------- (e) rate_tolerance vs exact

traffic_2x4 = st.lists(st.integers(0, 20), min_size=64, max_size=64).map(
    lambda v: np.array(v, dtype=float).reshape(8, 8) * 1e5)


@SETTINGS
@given(traffic_2x4, st.sampled_from([0.005, 0.01, 0.05, 0.2]))
def test_rate_tolerance_error_is_bounded(nodes2x4, collective, m, tol):
    exact = collective(nodes2x4, m)
    approx = collective(nodes2x4, m, rate_tolerance=tol)
    launch = nodes2x4.cluster.a2a_launch_us * 1e-6
    span = exact.gpu_done.max() - launch  # the fluid part; the launch is not approximated
    slack = 1e-12 + 1e-9 * span
    # the slowest GPU: never more than 2 x tol late, and (max-min rates are not monotone, so flows kept at
    # their old rates for the rest of a step can end a little early) never more than tol early
    assert approx.gpu_done.max() <= exact.gpu_done.max() + 2 * tol * span + slack
    assert approx.gpu_done.max() >= exact.gpu_done.max() - tol * span - slack
    assert np.abs(approx.gpu_done - exact.gpu_done).max() <= 2 * tol * span + slack
    assert approx.nbytes.sum() == pytest.approx(exact.nbytes.sum())


@pytest.mark.parametrize("tol", [0.01, 0.05])
def test_rate_tolerance_on_dense_traffic_is_not_below_exact(nodes2x8, collective, tol):
    rng = np.random.default_rng(5)
    m = rng.integers(1, 10, size=(16, 16)) * 1e5
    exact = collective(nodes2x8, m)
    approx = collective(nodes2x8, m, rate_tolerance=tol)
    assert exact.gpu_done.max() <= approx.gpu_done.max() <= exact.gpu_done.max() * (1 + 2 * tol)
    assert approx.recomputations <= exact.recomputations


# ---------------------------------------------------------------- (f) time never falls when bytes rise

@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(traffic_2x4, st.integers(0, 63), st.floats(1.0, 8.0))
def test_more_bytes_on_one_pair_never_ends_the_collective_earlier(nodes2x4, collective, m, k, factor):
    s, d = divmod(k, 8)
    grown = m.copy()
    grown[s, d] = m[s, d] * factor + 1e5
    before = collective(nodes2x4, m)
    after = collective(nodes2x4, grown)
    assert after.gpu_done.max() >= before.gpu_done.max() * (1 - 1e-12)
    if s != d:
        assert flow_finish(after, s, d) >= (flow_finish(before, s, d) if m[s, d] > 0 else 0.0)
        assert after.gpu_done[[s, d]].max() >= flow_finish(after, s, d) * (1 - 1e-12)


@SETTINGS
@given(traffic_2x4, st.floats(1.0, 10.0))
def test_uniform_scaling_stretches_every_flow_linearly(nodes2x4, collective, m, factor):
    base = collective(nodes2x4, m)
    scaled = collective(nodes2x4, m * factor)
    launch = nodes2x4.cluster.a2a_launch_us * 1e-6
    assert (scaled.gpu_done >= base.gpu_done * (1 - 1e-12)).all()
    latency = nodes2x4.path_latency[base.src, base.dst]
    np.testing.assert_array_equal(scaled.src, base.src)
    np.testing.assert_allclose(scaled.finish - launch - latency, factor * (base.finish - launch - latency),
                               rtol=1e-9)


# ---------------------------------------------------------------- (g) the incremental solver vs plain max-min

def plain_fluid_ends(size: list[float], paths: list[list[int]], capacity: list[float]) -> list[float]:
    """The obvious departure-driven fluid process: after every departure, every remaining flow's rate is
    recomputed from scratch by textbook progressive filling."""
    remaining, end = list(size), [0.0] * len(size)
    active, now = list(range(len(size))), 0.0
    while active:
        rates = progressive_filling([paths[i] for i in active], capacity)
        step = min(remaining[i] / r for i, r in zip(active, rates))
        now += step
        for i, r in zip(active, rates):
            remaining[i] -= r * step
        finished = [i for i in active if remaining[i] <= 1e-9 * size[i]]
        for i in finished:
            end[i] = now
        active = [i for i in active if i not in finished]
    return end


@st.composite
def flow_sets(draw):
    capacity, paths = draw(max_min_instances())
    sizes = st.one_of(st.sampled_from([1.0, 2.0, 3.0]), st.floats(0.1, 50.0))  # ties end together
    return capacity, paths, draw(st.lists(sizes, min_size=len(paths), max_size=len(paths)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flow_sets())
def test_fluid_ends_equal_a_plain_max_min_fluid_process(instance):
    """Recomputing only the flows at least as fast as a departed one (on the capacity the others leave) gives the
    same end times as recomputing every rate after every departure."""
    capacity, paths, sizes = instance
    links = as_link_matrix(paths, len(capacity))
    got, _ = fluid_ends(np.array(sizes), [np.ascontiguousarray(c) for c in links], np.array(capacity))
    assert got.tolist() == pytest.approx(plain_fluid_ends(sizes, paths, capacity), rel=1e-9)


def test_fluid_ends_keeps_slower_flows_and_moves_faster_ones():
    """Links 0 (capacity 1), 1 (10) and 2 (0.2). Flow 0 crosses link 0; flow 1 links 0 and 1; flow 2 link 1;
    flow 3 links 1 and 2. Rates: flow 3 0.2 (link 2), flows 0 and 1 0.5 (link 0), flow 2 the rest of link 1, 9.3.
    Flow 0 (0.5 bytes) ends at 1: flow 1 rises to 1 and flow 2 falls to 8.8 (faster than 0.5: recomputed);
    flow 3 (slower) keeps 0.2. Flow 1 (2 bytes) ends at 2.5; flow 2 gets 9.8; flow 3 (1 byte) ends at 5;
    flow 2 then gets all 10 and ends at 5 + (95 - 9.3 - 8.8 * 1.5 - 9.8 * 2.5) / 10 = 9.8."""
    links = [np.array([0, 0, 1, 1]), np.array([3, 1, 3, 2])]  # 3 is the dummy link
    end, recomputations = fluid_ends(np.array([0.5, 2.0, 95.0, 1.0]), links, np.array([1.0, 10.0, 0.2]))
    assert end.tolist() == pytest.approx([1.0, 2.5, 9.8, 5.0], rel=1e-12)
    assert recomputations == 4  # the first solve, then after each departure but the last


@pytest.mark.parametrize("nodes", [2, 4])
@pytest.mark.parametrize("a2a", ["direct", "hierarchical"])
def test_flows_grow_with_gpus_as_the_all_to_all_implies(cluster, nodes, a2a):
    """With every pair of GPUs exchanging tokens, a direct all-to-all has G (G - 1) flows; a hierarchical one
    G (gpus_per_node - 1) inside the nodes plus G (nodes - 1) to the rail peers on the other nodes."""
    from moesim.placement.format import Placement
    from moesim.sim.engine import EngineOptions, Simulation
    from moesim.traces.model import ModelSpec
    from moesim.traces.synthetic import SyntheticParams, generate_trace

    spec = cluster(nodes=nodes, gpus_per_node=4)
    G, gpn = spec.num_gpus, 4
    E, T = 4 * G, 256
    trace = generate_trace(num_layers=1, num_experts=E, top_k=8, num_gpus=G, tokens_per_gpu=T, batches=1,
                           params=SyntheticParams(zipf_alpha=0.0, gpu_mix_sigma=0.0, affinity=0.0),
                           rng=np.random.default_rng(0))
    placement = Placement.from_assignment((np.arange(E) * G // E)[None, :], G, "contiguous")
    model = ModelSpec(num_layers=1, num_experts=E, top_k=8, d_model=64, d_ff=32)
    rec = Simulation(build_topology(spec), model, options=EngineOptions(a2a=a2a)).run(trace, trace.layout(G, T),
                                                                                       placement)
    per_collective = G * (G - 1) if a2a == "direct" else G * (gpn - 1) + G * (nodes - 1)
    assert rec.flows == 2 * per_collective  # dispatch and combine


@st.composite
def repeated_flow_sets(draw):
    """Flows drawn from a few distinct (path, size) kinds, each repeated: symmetric traffic, where many flows tie
    in rate and end together, and enough flows that the fluid loop drops ended ones before the last step."""
    capacity, paths, sizes = draw(flow_sets())
    repeats = draw(st.lists(st.integers(1, 5), min_size=len(paths), max_size=len(paths)))
    order = draw(st.permutations(list(np.repeat(np.arange(len(paths)), repeats))))
    return capacity, [paths[i] for i in order], [sizes[i] for i in order]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(repeated_flow_sets())
def test_fluid_ends_with_repeated_flows_equal_a_plain_fluid_process(instance):
    """Identical flows (same links, same bytes) in any order: exact at rate_tolerance 0 (1e-9 relative), and
    identical flows end at the same moment, bit for bit."""
    capacity, paths, sizes = instance
    links = as_link_matrix(paths, len(capacity))
    got, _ = fluid_ends(np.array(sizes), [np.ascontiguousarray(c) for c in links], np.array(capacity))
    assert got.tolist() == pytest.approx(plain_fluid_ends(sizes, paths, capacity), rel=1e-9)
    kinds: dict[tuple, set] = {}
    for p, s, e in zip(paths, sizes, got.tolist()):
        kinds.setdefault((tuple(p), s), set()).add(e)
    assert all(len(ends) == 1 for ends in kinds.values())


@SETTINGS
@given(repeated_flow_sets())
def test_max_min_rates_of_repeated_flows_equal_progressive_filling(instance):
    capacity, paths, _ = instance
    got = max_min_rates(as_link_matrix(paths, len(capacity)), np.array(capacity))
    assert got.tolist() == pytest.approx(progressive_filling(paths, capacity), rel=1e-9)


def test_fluid_ends_of_many_flows_equal_a_plain_fluid_process():
    """80 flows on 10 links, sizes from a handful of values: many steps, ended flows dropped several times."""
    rng = np.random.default_rng(7)
    capacity = rng.choice([1.0, 2.0, 5.0], 10).tolist()
    paths = [sorted(rng.choice(10, rng.integers(1, 4), replace=False).tolist()) for _ in range(80)]
    sizes = rng.choice([0.5, 1.0, 1.5, 4.0, 9.0], 80).tolist()
    links = as_link_matrix(paths, len(capacity))
    got, recomputations = fluid_ends(np.array(sizes), [np.ascontiguousarray(c) for c in links], np.array(capacity))
    assert got.tolist() == pytest.approx(plain_fluid_ends(sizes, paths, capacity), rel=1e-9)
    assert recomputations > 5


# ---------------------------------------------------------------- (h) the compiled fluid loop (extra 'fast')

needs_numba = pytest.mark.skipif(not fluid_jit.AVAILABLE, reason="numba (the extra 'fast') is not installed")


@needs_numba
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(repeated_flow_sets(), st.sampled_from([0.0, 0.01, 0.2]))
def test_compiled_fluid_loop_is_bit_identical_to_numpy(instance, tolerance):
    """The compiled loop makes the same floating-point operations in the same order: the same end times bit for
    bit and the same recomputation count, at every tolerance; and at 0 it is exact."""
    capacity, paths, sizes = instance
    cols = [np.ascontiguousarray(c) for c in as_link_matrix(paths, len(capacity))]
    want = fluid_ends(np.array(sizes), cols, np.array(capacity), tolerance, compiled=False)
    got = fluid_ends(np.array(sizes), cols, np.array(capacity), tolerance, compiled=True)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]
    if tolerance == 0.0:
        assert got[0].tolist() == pytest.approx(plain_fluid_ends(sizes, paths, capacity), rel=1e-9)


@needs_numba
@pytest.mark.parametrize("tolerance", [0.0, 0.01])
def test_compiled_fluid_loop_on_a_decode_all_to_all(cluster, tolerance):
    """Two nodes of 4 GPUs, uneven all-to-all bytes with many ties (sizes from a few values): the compiled loop
    equals the numpy one bit for bit on the fabric's own routing."""
    from moesim.sim.network import Routing

    topo = build_topology(cluster(nodes=2, gpus_per_node=4))
    G = topo.num_gpus
    m = np.random.default_rng(3).choice([1e5, 2e5, 3e5, 5e5], (G, G))
    np.fill_diagonal(m, 0.0)
    src, dst = np.nonzero(m)
    cols = [row[src * G + dst] for row in Routing.of(topo).bind]
    want = fluid_ends(m[src, dst], cols, topo.capacity, tolerance, compiled=False)
    got = fluid_ends(m[src, dst], cols, topo.capacity, tolerance, compiled=True)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]


def test_compiled_without_numba_is_refused(monkeypatch):
    monkeypatch.setattr(fluid_jit, "AVAILABLE", False)
    with pytest.raises(ValueError, match="numba"):
        fluid_ends(np.array([1.0]), [np.array([0])], np.array([1.0]), compiled=True)
