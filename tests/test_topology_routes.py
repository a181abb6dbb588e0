"""build_topology's routes are networkx's shortest paths on the forwarding view (``_forwarding``), link for link,
and their latencies the sums of their links', on layouts with every kind of path: one node, rails, shared NICs,
leaves per node group with a spine, and a GPU count that is not a power of two."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from conftest import make_cluster

from moesim.hardware import build_topology
from moesim.hardware.topology import _forwarding

LAYOUTS = [
    dict(nodes=1),
    dict(nodes=3, gpus_per_node=4),
    dict(nodes=2, network={"nics_per_node": 2}),
    dict(nodes=4, gpus_per_node=2, network={"rail_optimized": False, "nodes_per_leaf": 1}),
    dict(nodes=6, gpus_per_node=8, network={"nodes_per_leaf": 2}),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_routes_are_networkx_shortest_paths_on_the_forwarding_view(layout):
    topo = build_topology(make_cluster(**layout))
    graph, G = topo.graph, topo.num_gpus
    index = {(u, v): i for i, (u, v) in enumerate(graph.edges())}
    role, node = dict(graph.nodes(data="role")), dict(graph.nodes(data="node"))
    for s in range(G):
        view = nx.subgraph_view(graph, filter_edge=_forwarding(f"gpu{s}", role, node))
        paths = nx.single_source_shortest_path(view, f"gpu{s}")
        for d in range(G):
            want = [] if d == s else [index[(u, v)] for u, v in zip(paths[f"gpu{d}"][:-1], paths[f"gpu{d}"][1:])]
            np.testing.assert_array_equal(topo.path(s, d), want)
            assert topo.path_latency[s, d] == topo.latency[want].sum()
