"""Shared fixtures: tiny clusters, topologies and models, and a one-collective network runner.

Topologies are session-scoped (building one routes every GPU pair) so Hypothesis tests can use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import simpy
import yaml

from moesim.hardware import ClusterSpec, Topology, build_topology, deep_merge, preset
from moesim.sim.network import CollectiveResult, Fabric
from moesim.traces.model import ModelSpec


def make_cluster(name: str = "hgx-h200", **overrides: Any) -> ClusterSpec:
    """A preset with nested overrides merged in, validated."""
    return ClusterSpec(**deep_merge(preset(name), overrides))


def run_collective(topo: Topology, nbytes: np.ndarray, *, rate_tolerance: float = 0.0) -> CollectiveResult:
    """Run one collective on a fresh SimPy clock starting at t=0 and return its result."""
    env = simpy.Environment()
    fabric = Fabric(env, topo, rate_tolerance=rate_tolerance)
    proc = env.process(fabric.collective("test", np.asarray(nbytes, dtype=float)))
    env.run()
    assert proc.ok
    return proc.value


@pytest.fixture(scope="session")
def collective() -> Callable[..., CollectiveResult]:
    return run_collective


@pytest.fixture(scope="session")
def cluster() -> Callable[..., ClusterSpec]:
    return make_cluster


@pytest.fixture(scope="session")
def node8() -> Topology:
    """One HGX H200 node: 8 GPUs on NVLink 4."""
    return build_topology(make_cluster(nodes=1))


@pytest.fixture(scope="session")
def nodes2x8() -> Topology:
    """Two HGX H200 nodes, one 400 Gb/s NIC per GPU, rail-optimised leaves."""
    return build_topology(make_cluster(nodes=2))


@pytest.fixture(scope="session")
def nodes2x4() -> Topology:
    """Two nodes of 4 H200s: the smallest cluster with every kind of link."""
    return build_topology(make_cluster(nodes=2, gpus_per_node=4))


@pytest.fixture
def tiny_model() -> ModelSpec:
    return ModelSpec(name="tiny", num_layers=2, num_experts=8, top_k=2, d_model=256, d_ff=512)


TINY_SCENARIO: dict[str, Any] = {
    "name": "tiny",
    "clusters": [{"name": "1x8-h200", "preset": "hgx-h200", "nodes": 1, "gpus_per_node": 8}],
    "model": {"name": "tiny-moe", "num_layers": 4, "num_experts": 16, "top_k": 2, "d_model": 512, "d_ff": 1024},
    "workload": {"synthetic": {"tokens_per_gpu": 64, "batches": 2, "zipf_alpha": 0.8, "seed": 3}},
    "placements": ["contiguous", "round_robin", {"policy": "random", "seed": 1}, "greedy"],
    "baseline": "contiguous",
    "engine": {"progress": False},
}


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_scenario_template() -> dict[str, Any]:
    """The tiny scenario as plain data (do not mutate; use ``tiny_scenario_data`` for a private copy)."""
    return deep_merge({}, TINY_SCENARIO)


@pytest.fixture
def tiny_scenario_data() -> dict[str, Any]:
    """The tiny scenario as plain data (a fresh deep copy per test, safe to mutate)."""
    return deep_merge({}, TINY_SCENARIO)


@pytest.fixture
def tiny_scenario_file(tmp_path: Path, tiny_scenario_data: dict[str, Any]) -> Path:
    """The tiny scenario (1 node x 8 H200, 4 layers, 16 experts, top-2, 64 tokens/GPU, 2 batches) as YAML."""
    return write_yaml(tmp_path / "tiny.yaml", tiny_scenario_data)


@pytest.fixture(scope="session")
def yaml_writer() -> Callable[[Path, Any], Path]:
    return write_yaml
