"""Placement policies by name.

A policy is a pure function ``policy(problem, **options) -> Placement``: no SimPy, no file I/O, all
randomness from ``problem.seed``. Options are keyword-only parameters; unknown options, unknown names
and duplicate registrations raise and list the valid choices. Every result passes one validator.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from pydantic import TypeAdapter, ValidationError

from moesim.placement.format import Placement
from moesim.placement.validate import validate_placement


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a policy may use. ``load[l, e]``: token-expert pairs seen in the profiling window."""

    num_layers: int
    num_experts: int
    num_gpus: int  # EP ranks
    gpus_per_node: int  # EP ranks per node
    slots_per_gpu: int  # expert copies per EP rank per layer
    load: np.ndarray
    seed: int = 0

    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)


Policy = Callable[..., Placement]
_REGISTRY: dict[str, Policy] = {}


def register(name: str) -> Callable[[Policy], Policy]:
    def deco(fn: Policy) -> Policy:
        if name in _REGISTRY:
            raise ValueError(f"placement policy {name!r} is already registered; registered: "
                             f"{', '.join(policy_names())}")
        _REGISTRY[name] = fn
        return fn

    return deco


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str) -> Policy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown placement policy {name!r}; valid: {', '.join(policy_names())}") from None


def policy_options(name: str) -> dict[str, Any]:
    """The options a policy accepts, with their defaults."""
    sig = inspect.signature(get_policy(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}


def check_option(name: str, option: str, value: Any) -> Any:
    """Validate one option value against the policy's type annotation; raises TypeError saying what is expected."""
    hints = typing.get_type_hints(get_policy(name))
    hint = hints.get(option, Any)
    try:
        return TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError:
        expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise TypeError(f"option {option!r} of policy {name!r} must be {expected}, got {value!r}") from None


def make_placement(name: str, problem: PlacementProblem, **options: Any) -> Placement:
    """Run policy ``name`` with ``options`` and validate its output."""
    fn = get_policy(name)
    accepted = policy_options(name)
    for key in options:
        if key not in accepted:
            valid = ", ".join(accepted) or "none"
            raise KeyError(f"policy {name!r} has no option {key!r}; valid: {valid}")
    options = {key: check_option(name, key, value) for key, value in options.items()}
    placement = fn(problem, **options)
    validate_placement(placement, num_layers=problem.num_layers, num_experts=problem.num_experts,
                       num_gpus=problem.num_gpus, source=f"policy {name}")
    slots = placement.copies_per_gpu().max()
    if slots > problem.slots_per_gpu:
        raise AssertionError(f"policy {name} used {slots} slots on a GPU, over {problem.slots_per_gpu}")
    return placement
