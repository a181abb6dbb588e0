"""The cluster as a networkx graph of directed links, and the fixed path every GPU pair's traffic takes.

Nodes: ``gpu{g}`` (global GPU index), ``nvsw{n}`` (the NVSwitch fabric of node n, non-blocking, one
logical switch), the NICs, ``leaf{i}`` and ``spine``. With one NIC per GPU (the default) the NIC of GPU g
is ``nic{g}``, one rail per local rank. With ``network.nics_per_node`` below ``gpus_per_node`` the NICs are
``nic{n}.{i}`` (NIC i of node n), each shared by a group of consecutive local ranks
(:meth:`~moesim.hardware.spec.ClusterSpec.nic_of_local`), as GPUs behind one PCIe switch: every GPU keeps
its own ``pcie`` link to its NIC, and the group shares the NIC's ``nic`` link to its leaf. Rail-optimised
leaves are one per NIC index (rail) across nodes; leaf downlinks and spine uplinks count NICs.

Every physical link is two directed edges, each with its own capacity (bytes/s, line rate x
efficiency) and latency (s). Traffic inside a node crosses NVLink (gpu -> nvsw -> gpu), never a NIC;
traffic between nodes leaves through the sender's NIC and enters through the receiver's (NCCL does not
aggregate NICs for one GPU's all-to-all), via the rail's leaf and, across leaves, the spine.

Paths are networkx shortest paths (fewest hops) on a view where no GPU relays traffic and no NIC takes
traffic back into the sender's own node, found once per source GPU. Deliberately ignored: PXN / NVLink
forwarding before the NIC (the hierarchical all-to-all mode of the fidelity issue), a GPU using another
group's NIC, the PCIe switch's own bandwidth and GPU-to-GPU PCIe peer traffic, ECMP over several spines
(one logical spine carries the leaf's uplinks), switch buffers and congestion control (bandwidth is
shared max-min fairly by the simulator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import networkx as nx
import numpy as np

from moesim.budget import require_memory, require_time
from moesim.hardware.spec import ClusterSpec


@dataclass(frozen=True)
class Topology:
    """Links as arrays plus the path of every ordered GPU pair, in CSR form."""

    cluster: ClusterSpec
    graph: nx.DiGraph
    link_names: tuple[str, ...]
    link_kind: tuple[str, ...]
    capacity: np.ndarray  # bytes/s, per link
    latency: np.ndarray  # seconds, per link
    path_ptr: np.ndarray  # [G*G + 1]; links of pair (s, d) are path_idx[path_ptr[s*G+d]:path_ptr[s*G+d+1]]
    path_idx: np.ndarray
    path_latency: np.ndarray  # [G, G] seconds

    @property
    def num_gpus(self) -> int:
        return self.cluster.num_gpus

    @property
    def num_links(self) -> int:
        return len(self.link_names)

    def path(self, src: int, dst: int) -> np.ndarray:
        k = src * self.num_gpus + dst
        return self.path_idx[self.path_ptr[k] : self.path_ptr[k + 1]]

    def same_node(self) -> np.ndarray:
        """[G, G] boolean: GPU pairs inside one NVLink domain."""
        node = np.arange(self.num_gpus) // self.cluster.gpus_per_node
        return node[:, None] == node[None, :]


def build_graph(cluster: ClusterSpec) -> nx.DiGraph:
    """The cluster's links as a directed graph with ``capacity`` (B/s), ``latency`` (s) and ``kind``."""
    g: nx.DiGraph[str] = nx.DiGraph(name=cluster.name)
    nv, net = cluster.nvlink, cluster.network
    per_node = cluster.gpus_per_node

    def link(u: str, v: str, capacity: float, latency_s: float, kind: str) -> None:
        g.add_edge(u, v, capacity=capacity, latency=latency_s, kind=kind)
        g.add_edge(v, u, capacity=capacity, latency=latency_s, kind=kind)

    for n in range(cluster.nodes):
        g.add_node(f"nvsw{n}", role="nvswitch", node=n)
        for local in range(per_node):
            gpu = n * per_node + local
            g.add_node(f"gpu{gpu}", role="gpu", node=n, local_rank=local)
            link(f"gpu{gpu}", f"nvsw{n}", nv.bytes_per_s, nv.latency_us * 1e-6 / 2, "nvlink")

    if cluster.nodes == 1:
        return g

    nics = cluster.nics_per_node_effective
    shared = cluster.gpus_per_nic > 1
    if net.rail_optimized:
        leaf_of = lambda n, nic: nic  # noqa: E731 - one leaf per rail (NIC index)
        num_leaves = nics
    else:
        leaf_of = lambda n, nic: n // net.nodes_per_leaf  # noqa: E731
        num_leaves = -(-cluster.nodes // net.nodes_per_leaf)
    downlinks = [0] * num_leaves  # NICs per leaf
    for n in range(cluster.nodes):
        for local in range(per_node):
            gpu = n * per_node + local
            i = cluster.nic_of_local(local)
            nic, leaf = (f"nic{n}.{i}" if shared else f"nic{gpu}"), f"leaf{leaf_of(n, i)}"
            first = nic not in g  # the first GPU of the NIC's group adds the NIC and its leaf link
            if first:
                g.add_node(nic, role="nic", node=n)
                g.add_node(leaf, role="leaf")
            link(f"gpu{gpu}", nic, net.pcie_GBps * 1e9, 0.0, "pcie")
            if first:
                link(nic, leaf, net.nic_bytes_per_s, net.latency_us * 1e-6 / 2, "nic")
                downlinks[leaf_of(n, i)] += 1
    if num_leaves > 1:
        g.add_node("spine", role="spine")
        for leaf_index, count in enumerate(downlinks):
            uplink = count * net.nic_bytes_per_s / net.oversubscription
            link(f"leaf{leaf_index}", "spine", uplink, net.hop_latency_us * 1e-6, "fabric")
    return g


def _forwarding(src: str, role: dict[str, str], node: dict[str, int]) -> Callable[[str, str], bool]:
    """(The rule :func:`_search` applies; tests route with it through networkx to check that search.) The links a
    flow from ``src`` may take: out of ``src``, or out of a switch or NIC - but not from a NIC
    back into a GPU of the source's node."""
    here = node[src]

    def keep(u: str, v: str) -> bool:
        return u == src or (role[u] != "gpu" and not (role[u] == "nic" and role[v] == "gpu" and node[v] == here))

    return keep


def topology_cost(cluster: ClusterSpec) -> tuple[float, float]:
    """(bytes, seconds) of routing every ordered GPU pair (:func:`build_topology`): the paths as Python lists
    and then arrays, [G, G] latencies, and the simulator's per-pair link table (:class:`moesim.sim.network.Routing`)."""
    G = cluster.num_gpus
    pairs = G * G
    return pairs * 400.0, pairs * 5e-6


def _route(graph: nx.DiGraph, index: dict[tuple[str, str], int], latency: np.ndarray,
           G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The path of every ordered GPU pair in CSR form (``ptr`` [G*G + 1], ``idx``) and [G, G] path latencies.

    Per source, a breadth-first search on the links :func:`_forwarding` keeps, visiting each node's successors in
    the graph's order: exactly networkx's ``single_source_shortest_path`` on that view (the same paths), on
    integer ids and parent links rather than filtered views and path lists (which cost O(G^2) Python calls);
    the paths are then read back from the parents for every destination at once."""
    names = list(graph.nodes)
    id_of = {v: i for i, v in enumerate(names)}
    role = dict(graph.nodes(data="role"))
    node = dict(graph.nodes(data="node"))
    succ = [[id_of[w] for w in graph.succ[v]] for v in names]
    edge = [[index[(v, w)] for w in graph.succ[v]] for v in names]
    is_gpu = [role[v] == "gpu" for v in names]
    is_nic = [role[v] == "nic" for v in names]
    node_of = [node.get(v) for v in names]
    gpus = np.array([id_of[f"gpu{i}"] for i in range(G)], dtype=np.int64)
    ptr, chunks = [np.zeros(1, dtype=np.int64)], []
    path_latency = np.zeros((G, G))
    for s in range(G):
        src = int(gpus[s])
        parent, via = _search(src, succ, edge, is_gpu, is_nic, node_of)
        lost = (parent[gpus] < 0) & (gpus != src)
        if lost.any():
            d = int(np.flatnonzero(lost)[0])
            raise ValueError(f"no route from gpu{s} to gpu{d}")
        back, cur = [], gpus.copy()  # each destination's links, last first
        while (cur != src).any():
            back.append(np.where(cur != src, via[cur], -1))
            cur = np.where(cur != src, parent[cur], src)
        hops = np.array(back) if back else np.full((1, G), -1)
        length = (hops >= 0).sum(axis=0)
        cols = np.arange(G)
        fwd = np.stack([np.where(length > k, hops[np.maximum(length - 1 - k, 0), cols], -1)
                        for k in range(hops.shape[0])])  # first link first, -1 after the last
        path_latency[s] = np.where(fwd >= 0, latency[fwd], 0.0).sum(axis=0)
        chunks.append(fwd.T[fwd.T >= 0])
        ptr.append(length)
    offsets = np.cumsum(np.concatenate(ptr))
    return offsets, np.concatenate(chunks).astype(np.int64), path_latency


def _search(src: int, succ: list[list[int]], edge: list[list[int]], is_gpu: list[bool], is_nic: list[bool],
            node_of: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """Breadth-first search from ``src`` over the links :func:`_forwarding` keeps: (parent, link from it) of
    every node, -1 where unreached."""
    V = len(succ)
    parent, via = [-1] * V, [-1] * V
    seen = [False] * V
    seen[src] = True
    here = node_of[src]
    level = [src]
    while level:
        nxt = []
        for v in level:
            if v != src and is_gpu[v]:
                continue  # no GPU but the source forwards traffic
            back_home = v != src and is_nic[v]
            for w, e in zip(succ[v], edge[v]):
                if seen[w] or (back_home and is_gpu[w] and node_of[w] == here):
                    continue
                seen[w] = True
                parent[w], via[w] = v, e
                nxt.append(w)
        level = nxt
    return np.array(parent, dtype=np.int64), np.array(via, dtype=np.int64)


def build_topology(cluster: ClusterSpec) -> Topology:
    """Build the graph and route every ordered GPU pair over it (refused up front, as an InputError on
    ``nodes``, when that cannot fit in memory or time: :func:`topology_cost`)."""
    nbytes, seconds = topology_cost(cluster)
    what = f"routing every pair of {cluster.num_gpus} GPUs ({cluster.nodes} nodes x {cluster.gpus_per_node})"
    require_memory(nbytes, what, field="nodes")
    require_time(seconds, what, field="nodes")
    graph = build_graph(cluster)
    edges = list(graph.edges(data=True))
    index = {(u, v): i for i, (u, v, _) in enumerate(edges)}
    capacity = np.array([d["capacity"] for _, _, d in edges], dtype=float)
    latency = np.array([d["latency"] for _, _, d in edges], dtype=float)
    try:
        ptr, idx, path_latency = _route(graph, index, latency, cluster.num_gpus)
    except ValueError as exc:
        raise ValueError(f"cluster {cluster.name}: {exc}") from None
    return Topology(
        cluster=cluster,
        graph=graph,
        link_names=tuple(f"{u}->{v}" for u, v, _ in edges),
        link_kind=tuple(d["kind"] for _, _, d in edges),
        capacity=capacity,
        latency=latency,
        path_ptr=ptr,
        path_idx=idx,
        path_latency=path_latency,
    )
