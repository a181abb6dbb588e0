"""Placement layer: the placement format, the policy registry, the policies, the validator.

Every module of this package is imported here, so a policy module dropped into ``moesim/placement/`` registers
itself (``@register``) with no edit to this file; a policy in another package registers through the entry-point
group ``moesim.policies`` (CONTRIBUTING.md: a new placement policy).
"""

import importlib
import pkgutil
from importlib.metadata import entry_points

from moesim.placement.format import Placement, load_placement, save_placement
from moesim.placement.registry import (
    PlacementProblem, PlanningCosts, get_policy, make_placement, policy_names, policy_options, register,
)
from moesim.placement.validate import Capacity, validate_placement

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # each registers its policies
    importlib.import_module(f"{__name__}.{_module}")
for _plugin in entry_points(group="moesim.policies"):  # policies of other installed packages
    _plugin.load()

__all__ = [
    "Capacity", "Placement", "PlacementProblem", "PlanningCosts", "get_policy", "load_placement", "make_placement",
    "policy_names", "policy_options", "register", "save_placement", "validate_placement",
]
