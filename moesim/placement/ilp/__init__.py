"""The ``ilp`` placement: MoETuner's joint objective (load, communication, cross-layer routing, and the
standard dataflow's inter-node dispatch), solved with proven optimality gaps, by decomposition where the
monolithic integer program does not scale. The mathematics, the method and what it ignores: docs/ilp.md.

Modules, lower ones first (each imports only those above it in this list):

- :mod:`~moesim.placement.ilp.checks`: instance feasibility and option checks;
- :mod:`~moesim.placement.ilp.costs`: the objective's coefficients, its value term by term, its bound;
- :mod:`~moesim.placement.ilp.search`: local search shared with ``ilp_moetuner``;
- :mod:`~moesim.placement.ilp.balance`: one layer's min-max load, its bound, the neighbourhood ILP;
- :mod:`~moesim.placement.ilp.nodes`: nodes first, for the dispatch term on several nodes;
- :mod:`~moesim.placement.ilp.align`: relabelling each layer's ranks to line up with its neighbours;
- :mod:`~moesim.placement.ilp.swaps`: affinity swaps within a layer;
- :mod:`~moesim.placement.ilp.chain_dp`: the exact chain DP for small instances;
- :mod:`~moesim.placement.ilp.joint`: the monolithic joint ILP (``method: joint``);
- :mod:`~moesim.placement.ilp.replicas`: replica counts and packing together (``redundant_experts``);
- :mod:`~moesim.placement.ilp.policy`: the method choice and the registered ``ilp`` policy.

Every name the former single module ``moesim/placement/ilp.py`` defined is importable from here (and ``lpt``).
"""

from moesim.placement.ilp.align import align_layers, linear_assignment
from moesim.placement.ilp.balance import balance_layer, improve_layer, load_lower_bound
from moesim.placement.ilp.chain_dp import chain_dp, chain_dp_size
from moesim.placement.ilp.checks import METHODS, check_feasible, check_options
from moesim.placement.ilp.costs import (
    Breakdown, CostModel, cost_model, dispatch_lower_bound, dispatch_scale, dispatch_terms, evaluate,
    layer_max_load, objective_lower_bound, pair_cost, sends, solve_info, spans,
)
from moesim.placement.ilp.joint import joint_model, solve_joint
from moesim.placement.ilp.nodes import node_swaps, place_nodes_first, split_nodes
from moesim.placement.ilp.policy import ilp, optimise
from moesim.placement.ilp.replicas import (
    balance_replicated_layer, optimise_replicas, replica_hood_model, solve_replica_hood,
)
from moesim.placement.ilp.search import improving_pairs
from moesim.placement.ilp.swaps import affinity_swaps
from moesim.placement.policies import lpt  # noqa: F401  (was importable from the single module; tests use it)

__all__ = [
    "METHODS", "Breakdown", "CostModel", "affinity_swaps", "align_layers", "balance_layer",
    "balance_replicated_layer", "chain_dp", "chain_dp_size", "check_feasible", "check_options", "cost_model",
    "dispatch_lower_bound", "dispatch_scale", "dispatch_terms", "evaluate", "ilp", "improve_layer",
    "improving_pairs", "joint_model", "layer_max_load", "linear_assignment", "load_lower_bound", "node_swaps",
    "objective_lower_bound", "optimise", "optimise_replicas", "pair_cost", "place_nodes_first",
    "replica_hood_model", "sends", "solve_info", "solve_joint", "solve_replica_hood", "spans", "split_nodes",
]
