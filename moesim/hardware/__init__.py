"""Hardware layer: GPU, NVLink and network specs, presets, and the cluster graph."""

from moesim.hardware.presets import PRESETS, deep_merge, preset, preset_names
from moesim.hardware.spec import ClusterSpec, GPUSpec, NetworkSpec, NVLinkSpec
from moesim.hardware.topology import Topology, build_graph, build_topology

__all__ = [
    "PRESETS", "ClusterSpec", "GPUSpec", "NVLinkSpec", "NetworkSpec", "Topology",
    "build_graph", "build_topology", "deep_merge", "preset", "preset_names",
]
