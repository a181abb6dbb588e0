"""Simulation layer: compute roofline, token bookkeeping, max-min fluid network, the SimPy engine."""

from moesim.sim.compute import dense_time, expert_time
from moesim.sim.engine import EngineOptions, Simulation, SimRecords
from moesim.sim.network import Fabric, binding_links, max_min_rates
from moesim.sim.traffic import LayerTraffic, layer_traffic

__all__ = [
    "EngineOptions", "Fabric", "LayerTraffic", "SimRecords", "Simulation", "binding_links", "dense_time",
    "expert_time", "layer_traffic", "max_min_rates",
]
