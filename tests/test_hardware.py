"""Hardware layer: presets against DOMAIN.md section 5, the cluster graph, paths, binding links, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from moesim.errors import InputError
from moesim.hardware import PRESETS, ClusterSpec, build_topology, deep_merge, preset, preset_names
from moesim.sim.network import binding_links
from moesim.study import load_scenario


def names_on_path(topo, src: int, dst: int) -> list[str]:
    return [topo.link_names[i] for i in topo.path(src, dst)]


def kinds_on_path(topo, src: int, dst: int) -> list[str]:
    return [topo.link_kind[i] for i in topo.path(src, dst)]


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("nodes", [1, 2])
def test_every_preset_validates_and_builds(name, nodes, cluster):
    spec = cluster(name, nodes=nodes)
    topo = build_topology(spec)
    G = spec.num_gpus
    assert topo.num_gpus == G == nodes * spec.gpus_per_node
    assert (topo.capacity > 0).all() and (topo.latency >= 0).all()
    assert topo.path_ptr.size == G * G + 1
    for s, d in [(0, G - 1), (G - 1, 0), (0, 1)]:
        path = topo.path(s, d)
        assert path.size >= 2
        assert topo.path_latency[s, d] == pytest.approx(topo.latency[path].sum())
        assert topo.link_names[path[0]].startswith(f"gpu{s}->")
        assert topo.link_names[path[-1]].endswith(f"->gpu{d}")
    assert topo.path(0, 0).size == 0


def test_preset_names_and_unknown_preset():
    assert preset_names() == sorted(PRESETS) and len(preset_names()) >= 1
    with pytest.raises(KeyError, match=".*".join(preset_names())):
        preset("dgx-h999")


def test_preset_returns_a_copy():
    p = preset("hgx-h200")
    p["gpu"]["memory_GB"] = 1.0
    p["nodes"] = 99
    assert PRESETS["hgx-h200"]["gpu"]["memory_GB"] == 141.0
    assert preset("hgx-h200")["nodes"] == 1


def test_deep_merge_recurses_and_leaves_inputs_alone():
    base = {"a": 1, "n": {"x": 1, "y": {"z": 2}}, "keep": [1, 2]}
    over = {"n": {"y": {"z": 3}, "w": 4}, "a": {"now": "dict"}}
    out = deep_merge(base, over)
    assert out == {"a": {"now": "dict"}, "n": {"x": 1, "y": {"z": 3}, "w": 4}, "keep": [1, 2]}
    assert base == {"a": 1, "n": {"x": 1, "y": {"z": 2}}, "keep": [1, 2]}
    assert over == {"n": {"y": {"z": 3}, "w": 4}, "a": {"now": "dict"}}
    out["keep"].append(3)
    assert base["keep"] == [1, 2]


# ---------------------------------------------------------------- figures from DOMAIN.md section 5

def spec_of(name: str) -> ClusterSpec:
    return ClusterSpec(**preset(name))


def test_h100_figures():
    s = spec_of("dgx-h100")
    assert (s.gpu.bf16_tflops, s.gpu.memory_GB, s.gpu.hbm_GBps) == (989.0, 80.0, 3350.0)
    assert s.gpus_per_node == 8
    assert s.nvlink.GBps == 450.0  # NVLink 4: 18 links x 25 GB/s per direction
    assert s.network.nic_Gbps == 400.0  # ConnectX-7 NDR, one per GPU


def test_h200_figures():
    s = spec_of("hgx-h200")
    assert (s.gpu.bf16_tflops, s.gpu.memory_GB, s.gpu.hbm_GBps) == (989.0, 141.0, 4800.0)
    assert s.nvlink.GBps == 450.0
    assert s.network.nic_Gbps == 400.0
    # measured: 366 GB/s NVLink p2p, 46-49 GB/s per NIC, 773 TFLOP/s on an 8k matmul
    # NVLink as fitted by moesim calibrate: between 324 GB/s (1 GiB all-to-all, per direction) and 366 (p2p)
    assert 300 < s.nvlink.bytes_per_s / 1e9 < 370
    assert 46e9 <= s.network.nic_bytes_per_s <= 49e9
    assert 550e12 < s.gpu.flops_per_s < 773e12  # fitted to expert FFNs: about 0.62 x 989, below the 8k matmul


def test_a100_figures():
    s = spec_of("dgx-a100")
    assert s.gpu.bf16_tflops == 312.0 and s.gpu.memory_GB == 80.0
    assert s.gpu.hbm_GBps == pytest.approx(2000, rel=0.05)
    assert s.nvlink.GBps * 2 == 600.0  # NVLink 3: 600 GB/s bidirectional
    assert s.network.nic_Gbps == 200.0  # HDR 200 Gb/s per GPU


def test_h800_and_nvl72_figures():
    h800 = spec_of("h800")
    assert h800.nvlink.bytes_per_s / 1e9 == pytest.approx(160)  # about 160 GB/s achievable (DeepEP)
    nvl = spec_of("gb200-nvl72")
    assert nvl.gpus_per_node == 72 and nvl.num_gpus == 72
    assert nvl.nvlink.GBps * 2 == 1800.0  # 1.8 TB/s bidirectional per GPU
    assert nvl.gpu.memory_GB == 186.0 and nvl.gpu.hbm_GBps == 8000.0
    assert 2250 <= nvl.gpu.bf16_tflops <= 2500


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_has_pcie_gen5_and_a_launch_cost(name):
    s = spec_of(name)
    assert s.network.pcie_GBps == 64.0
    assert 0 < s.a2a_launch_us <= 50  # NCCL alltoall floor: about 40 us per call on 2x H200
    assert 0 < s.nvlink.efficiency <= 1 and 0 < s.network.nic_efficiency <= 1


# ---------------------------------------------------------------- graph and paths

def test_single_node_graph(cluster):
    topo = build_topology(cluster(nodes=1))
    assert topo.num_links == 16  # 8 GPUs x NVLink up and down
    assert set(topo.link_kind) == {"nvlink"}
    assert names_on_path(topo, 0, 5) == ["gpu0->nvsw0", "nvsw0->gpu5"]
    assert topo.same_node().all()


def test_intra_node_path_in_a_multi_node_cluster(nodes2x8):
    assert names_on_path(nodes2x8, 9, 14) == ["gpu9->nvsw1", "nvsw1->gpu14"]


def test_inter_node_path_goes_through_both_nics(nodes2x8):
    # same rail: one leaf, no spine
    assert names_on_path(nodes2x8, 0, 8) == ["gpu0->nic0", "nic0->leaf0", "leaf0->nic8", "nic8->gpu8"]
    # different rails: leaf -> spine -> leaf
    assert names_on_path(nodes2x8, 1, 10) == ["gpu1->nic1", "nic1->leaf1", "leaf1->spine", "spine->leaf2",
                                              "leaf2->nic10", "nic10->gpu10"]
    assert kinds_on_path(nodes2x8, 1, 10) == ["pcie", "nic", "fabric", "fabric", "nic", "pcie"]
    same = nodes2x8.same_node()
    assert same[0, 7] and not same[0, 8] and same[8, 15]


def test_non_rail_optimised_leaves(cluster):
    topo = build_topology(cluster(nodes=4, gpus_per_node=2, network={"rail_optimized": False, "nodes_per_leaf": 2}))
    # nodes 0 and 1 share leaf0: no spine; node 2 is on leaf1
    assert names_on_path(topo, 0, 3) == ["gpu0->nic0", "nic0->leaf0", "leaf0->nic3", "nic3->gpu3"]
    assert "leaf0->spine" in names_on_path(topo, 0, 4)


def test_link_capacities(cluster):
    spec = cluster(nodes=2, network={"oversubscription": 2.0})
    topo = build_topology(spec)
    cap = dict(zip(topo.link_names, topo.capacity))
    nic = 400 / 8 * 1e9 * 0.94
    assert cap["gpu0->nvsw0"] == pytest.approx(450e9 * spec.nvlink.efficiency)
    assert cap["gpu0->nic0"] == pytest.approx(64e9)
    assert cap["nic0->leaf0"] == cap["leaf0->nic0"] == pytest.approx(nic)
    assert cap["leaf0->spine"] == pytest.approx(2 * nic / 2.0)  # two downlinks per rail leaf, 2:1


def test_cluster_helpers(cluster):
    spec = cluster(nodes=3, gpus_per_node=4)
    assert spec.num_gpus == 12
    assert [spec.node_of(g) for g in (0, 3, 4, 11)] == [0, 0, 1, 2]


# ---------------------------------------------------------------- NICs shared by several GPUs

def topology_arrays(topo) -> tuple:
    return (topo.link_names, topo.link_kind, topo.capacity.tolist(), topo.latency.tolist(), topo.path_ptr.tolist(),
            topo.path_idx.tolist(), topo.path_latency.tolist())


def test_default_is_one_nic_per_gpu(cluster, nodes2x8):
    spec = nodes2x8.cluster
    assert spec.network.nics_per_node is None
    assert (spec.nics_per_node_effective, spec.gpus_per_nic) == (8, 1)
    assert [spec.nic_of_local(local) for local in range(8)] == list(range(8))
    kinds = list(nodes2x8.link_kind)
    # 16 GPUs x (NVLink, PCIe, NIC) both ways, 8 rail leaves x spine both ways
    assert [kinds.count(k) for k in ("nvlink", "pcie", "nic", "fabric")] == [32, 32, 32, 16]
    assert {n.split("->")[0] for n in nodes2x8.link_names if n.startswith("nic")} == {f"nic{g}" for g in range(16)}
    # one NIC per GPU said explicitly: the very same graph, names, capacities and paths
    explicit = build_topology(cluster(nodes=2, network={"nics_per_node": 8}))
    assert topology_arrays(explicit) == topology_arrays(nodes2x8)
    assert list(explicit.graph.nodes(data=True)) == list(nodes2x8.graph.nodes(data=True))


@pytest.fixture(scope="module")
def shared2x8(cluster):
    """Two HGX H200 nodes with 2x 400 Gb/s NICs each: local ranks 0-3 share NIC 0, 4-7 NIC 1."""
    return build_topology(cluster(nodes=2, network={"nics_per_node": 2}))


def test_shared_nic_helpers(shared2x8):
    spec = shared2x8.cluster
    assert (spec.network.nics_per_node, spec.nics_per_node_effective, spec.gpus_per_nic) == (2, 2, 4)
    assert [spec.nic_of_local(local) for local in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_shared_nic_graph(shared2x8):
    topo = shared2x8
    kinds = list(topo.link_kind)
    # every GPU keeps its PCIe link; 4 NICs x leaf link both ways; 2 rail leaves x spine both ways
    assert [kinds.count(k) for k in ("nvlink", "pcie", "nic", "fabric")] == [32, 32, 8, 4]
    nics = {n for n, role in topo.graph.nodes(data="role") if role == "nic"}
    assert nics == {"nic0.0", "nic0.1", "nic1.0", "nic1.1"}
    for g in range(8):  # each GPU of node 0 reaches its peer on node 1 through its group's NIC and rail leaf
        i = g // 4
        assert names_on_path(topo, g, g + 8) == [f"gpu{g}->nic0.{i}", f"nic0.{i}->leaf{i}", f"leaf{i}->nic1.{i}",
                                                 f"nic1.{i}->gpu{g + 8}"]
        assert names_on_path(topo, g + 8, g) == [f"gpu{g + 8}->nic1.{i}", f"nic1.{i}->leaf{i}",
                                                 f"leaf{i}->nic0.{i}", f"nic0.{i}->gpu{g}"]
    # across NIC groups: the other rail's leaf, via the spine
    assert names_on_path(topo, 1, 14) == ["gpu1->nic0.0", "nic0.0->leaf0", "leaf0->spine", "spine->leaf1",
                                          "leaf1->nic1.1", "nic1.1->gpu14"]
    # GPUs sharing a NIC talk over NVLink, never back out through the NIC
    for s in range(8):
        for d in range(8):
            if s != d:
                assert kinds_on_path(topo, s, d) == ["nvlink", "nvlink"]


def test_shared_nic_capacities(cluster):
    spec = cluster(nodes=2, network={"nics_per_node": 2, "oversubscription": 2.0})
    topo = build_topology(spec)
    cap = dict(zip(topo.link_names, topo.capacity))
    nic = 400 / 8 * 1e9 * 0.94
    assert all(cap[f"gpu{g}->nic{g // 8}.{g % 8 // 4}"] == pytest.approx(64e9) for g in range(16))  # own PCIe
    assert cap["nic0.0->leaf0"] == cap["leaf0->nic1.0"] == cap["nic1.1->leaf1"] == pytest.approx(nic)
    # a rail leaf has one downlink per node (2 NICs, not 8 GPUs), 2:1 oversubscribed
    assert cap["leaf0->spine"] == cap["spine->leaf1"] == pytest.approx(2 * nic / 2.0)


def test_shared_nic_non_rail_optimised_leaves(cluster):
    net = {"nics_per_node": 2, "rail_optimized": False, "nodes_per_leaf": 2, "oversubscription": 2.0}
    topo = build_topology(cluster(nodes=4, network=net))
    nic = 400 / 8 * 1e9 * 0.94
    cap = dict(zip(topo.link_names, topo.capacity))
    assert cap["leaf0->spine"] == cap["leaf1->spine"] == pytest.approx(4 * nic / 2.0)  # 2 nodes x 2 NICs per leaf
    assert names_on_path(topo, 0, 12) == ["gpu0->nic0.0", "nic0.0->leaf0", "leaf0->nic1.1", "nic1.1->gpu12"]
    assert names_on_path(topo, 5, 16) == ["gpu5->nic0.1", "nic0.1->leaf0", "leaf0->spine", "spine->leaf1",
                                          "leaf1->nic2.0", "nic2.0->gpu16"]


def test_shared_nics_on_one_node_add_no_network(cluster, node8):
    topo = build_topology(cluster(nodes=1, network={"nics_per_node": 2}))
    assert topology_arrays(topo) == topology_arrays(node8)


# ---------------------------------------------------------------- binding links

def kept_kinds(topo) -> set[str]:
    keep = binding_links(topo)
    return {k for k, on in zip(topo.link_kind, keep) if on}


def test_binding_links_single_node_keeps_nvlink(node8):
    assert binding_links(node8).all()


def test_binding_links_drop_pcie_and_non_oversubscribed_spine(nodes2x8):
    keep = binding_links(nodes2x8)
    kinds = np.array(nodes2x8.link_kind)
    assert keep[kinds == "nvlink"].all() and keep[kinds == "nic"].all()
    assert not keep[kinds == "pcie"].any()
    assert not keep[kinds == "fabric"].any()


@pytest.mark.parametrize("rail", [True, False])
def test_binding_links_keep_an_oversubscribed_spine(cluster, rail):
    net = {"oversubscription": 2.0, "rail_optimized": rail, "nodes_per_leaf": 1}
    topo = build_topology(cluster(nodes=2, network=net))
    keep = binding_links(topo)
    kinds = np.array(topo.link_kind)
    assert keep[kinds == "fabric"].all()
    assert not keep[kinds == "pcie"].any()


def test_binding_links_keep_pcie_slower_than_the_nic(cluster):
    topo = build_topology(cluster(nodes=2, network={"pcie_GBps": 16.0}))  # 16 GB/s < 47 GB/s NIC
    assert "pcie" in kept_kinds(topo)


@pytest.mark.parametrize("net", [{}, {"oversubscription": 2.0, "nodes_per_leaf": 1}, {"nics_per_node": 2},
                                 {"pcie_GBps": 16.0}])
def test_binding_links_same_with_marked_pairs_and_with_unique(cluster, monkeypatch, net):
    """binding_links finds distinct (link, bottleneck link) pairs by marking a boolean table when it is small
    enough, else with np.unique: the same mask either way."""
    import moesim.sim.network as network

    topo = build_topology(cluster(nodes=3, network=net))
    marked = binding_links(topo)
    monkeypatch.setattr(network, "_MARK_LIMIT", 0)
    assert np.array_equal(marked, binding_links(topo))


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides, field", [
    ({"network": {"nic_Gbps": -400.0}}, "nic_Gbps"),
    ({"nvlink": {"GBps": 0.0}}, "GBps"),
    ({"nodes": 0}, "nodes"),
    ({"gpus_per_node": 0}, "gpus_per_node"),
    ({"gpu": {"compute_efficiency": 1.5}}, "compute_efficiency"),
    ({"gpu": {"memory_GB": -1}}, "memory_GB"),
    ({"network": {"oversubscription": 0.5}}, "oversubscription"),
    ({"a2a_launch_us": -1.0}, "a2a_launch_us"),
    ({"bogus_key": 1}, "bogus_key"),
    ({"gpu": {"tflops": 1000.0}}, "tflops"),
    ({"network": {"nodes_per_leaf": 0}}, "nodes_per_leaf"),
    ({"network": {"nics_per_node": 0}}, "nics_per_node"),
    ({"network": {"nics_per_node": 3}}, "nics_per_node"),  # does not divide 8 GPUs per node
    ({"network": {"nics_per_node": 16}}, "nics_per_node"),  # more NICs than GPUs
])
def test_invalid_values_raise_validation_error(overrides, field):
    with pytest.raises(ValidationError, match=field):
        ClusterSpec(**deep_merge(preset("hgx-h200"), overrides))


def test_nics_per_node_must_divide_gpus_per_node():
    with pytest.raises(ValidationError, match=r"network\.nics_per_node=3 must divide gpus_per_node=8"):
        ClusterSpec(**deep_merge(preset("hgx-h200"), {"network": {"nics_per_node": 3}}))
    ok = ClusterSpec(**deep_merge(preset("hgx-h200"), {"gpus_per_node": 6, "network": {"nics_per_node": 3}}))
    assert [ok.nic_of_local(local) for local in range(6)] == [0, 0, 1, 1, 2, 2]


def test_bad_nics_per_node_in_a_scenario_names_file_and_field(tmp_path, tiny_scenario_data, yaml_writer):
    tiny_scenario_data["clusters"][0].update(nodes=2, network={"nics_per_node": 3})
    path = yaml_writer(tmp_path / "bad.yaml", tiny_scenario_data)
    with pytest.raises(InputError) as exc:
        load_scenario(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: clusters[0].network: "), text
    assert "nics_per_node=3 must divide gpus_per_node=8" in text and "\n" not in text


def test_shared_nics_in_a_scenario(tmp_path, tiny_scenario_data, yaml_writer):
    tiny_scenario_data["clusters"][0].update(nodes=2, network={"nics_per_node": 2})
    spec = load_scenario(yaml_writer(tmp_path / "ok.yaml", tiny_scenario_data)).clusters[0].spec
    assert (spec.network.nics_per_node, spec.gpus_per_nic) == (2, 4)


def test_missing_field_raises():
    raw = preset("hgx-h200")
    del raw["gpu"]
    with pytest.raises(ValidationError, match="gpu"):
        ClusterSpec(**raw)


def test_specs_are_frozen():
    spec = spec_of("hgx-h200")
    with pytest.raises(ValidationError):
        spec.nodes = 4  # type: ignore[misc]


def test_hand_written_cluster_example_loads():
    """scenarios/clusters/*.yaml (written by hand, on top of a preset) validate and build a topology."""
    from moesim.cli.cluster import _cluster_spec

    files = sorted((Path(__file__).resolve().parents[1] / "scenarios" / "clusters").glob("*.yaml"))
    assert files
    for path in files:
        spec = _cluster_spec(str(path), [])
        assert build_topology(spec).num_links > 0
