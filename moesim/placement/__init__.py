"""Placement layer: the placement format, the policy registry, baseline policies, the validator."""

from moesim.placement import policies as _policies  # noqa: F401  (registers the baselines)
from moesim.placement import eplb as _eplb  # noqa: F401  (registers eplb)
from moesim.placement import affinity as _affinity  # noqa: F401  (registers affinity)
from moesim.placement import ilp as _ilp  # noqa: F401  (registers ilp)
from moesim.placement import ilp_moetuner as _ilp_moetuner  # noqa: F401  (registers ilp_moetuner)
from moesim.placement.format import Placement, load_placement, save_placement
from moesim.placement.registry import (
    PlacementProblem, get_policy, make_placement, policy_names, policy_options, register,
)
from moesim.placement.validate import Capacity, validate_placement

__all__ = [
    "Capacity", "Placement", "PlacementProblem", "get_policy", "load_placement", "make_placement",
    "policy_names", "policy_options", "register", "save_placement", "validate_placement",
]
