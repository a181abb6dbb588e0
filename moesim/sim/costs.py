"""Hardware costs the placement optimisers plan with, taken from the models the engine simulates with.

The optimisers (``greedy``, ``ilp``, ``ilp_moetuner``, ``eplb``'s replica count) need a few numbers, not a
simulation: seconds of expert compute per token-expert pair on an EP rank, seconds per byte between EP
ranks, the bytes one token copy moves, and how the engine's all-to-all copies a token (per destination
node, rank or expert). :func:`hardware_costs` derives each from the engine's own compute model
(:mod:`moesim.sim.compute`) and from the cluster's :class:`~moesim.hardware.topology.Topology`, so a better
model of the hardware improves the plans as well as the predictions; ``tests/test_costs.py`` fails if the
optimiser's numbers and the engine's diverge.

Deliberately ignored here (the simulation has them): contention between concurrent flows beyond the
static sharing of a link, and the time-varying overlap of compute with communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.hardware.topology import Topology
from moesim.sim.engine import EngineOptions
from moesim.traces.model import ModelSpec


@dataclass(frozen=True)
class HardwareCosts:
    """The numbers a placement policy plans with (seconds and bytes)."""

    compute_s_per_pair: float  # expert compute per token-expert pair on an EP rank
    rank_s_per_byte: np.ndarray  # [EP, EP] seconds per byte between EP ranks, 0 on the diagonal
    dispatch_bytes: float  # bytes one token copy carries to an expert's GPU
    combine_bytes: float  # bytes one expert output carries back
    a2a_copies: str  # what one dispatch copy goes to: "node", "gpu" or "expert"
    coherent: bool  # context-coherent dataflow: tokens travel from layer l's experts to layer l+1's


def a2a_copies(options: EngineOptions) -> str:
    """How the engine's dispatch copies a token: per destination node (hierarchical), per destination rank
    (direct, deduplicated) or per expert pick."""
    if options.a2a == "hierarchical":
        return "node"
    return "gpu" if options.a2a == "direct" and options.dedup else "expert"


def compute_s_per_pair(topo: Topology, model: ModelSpec, tp: int) -> float:
    """Seconds of expert GEMM work per token-expert pair on an EP rank (its ``tp`` GPUs share it)."""
    return 6.0 * model.d_model * model.d_ff / tp / topo.cluster.gpu.flops_per_s


def rank_seconds_per_byte(topo: Topology, tp: int) -> np.ndarray:
    """[EP, EP] seconds per byte between EP ranks: NVLink inside a node, the NICs across nodes.

    A rank's ``tp`` GPUs each carry 1/tp of its traffic on their own links; GPUs that share a NIC get an
    equal share of it (all send at once in an all-to-all).
    """
    spec = topo.cluster
    ep = spec.num_gpus // tp
    node = np.arange(ep) * tp // spec.gpus_per_node
    same = node[:, None] == node[None, :]
    inter = spec.gpus_per_nic / (tp * spec.network.nic_bytes_per_s) if spec.nodes > 1 else 0.0
    out = np.where(same, 1.0 / (tp * spec.nvlink.bytes_per_s), inter)
    np.fill_diagonal(out, 0.0)
    return out


def hardware_costs(topo: Topology, model: ModelSpec, *, tp: int, options: EngineOptions) -> HardwareCosts:
    """The placement cost terms of ``model`` on ``topo`` under the engine ``options``."""
    return HardwareCosts(compute_s_per_pair=compute_s_per_pair(topo, model, tp),
                         rank_s_per_byte=rank_seconds_per_byte(topo, tp),
                         dispatch_bytes=float(model.dispatch_bytes), combine_bytes=float(model.combine_bytes),
                         a2a_copies=a2a_copies(options), coherent=options.dataflow == "coherent")
