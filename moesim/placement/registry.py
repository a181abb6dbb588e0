"""Placement policies by name.

A policy is a pure function ``policy(problem, **options) -> Placement``: no SimPy, no file I/O, all
randomness from ``problem.seed``. Options are keyword-only parameters; unknown options, unknown names
and duplicate registrations raise and list the valid choices. Every result passes one validator.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from pydantic import TypeAdapter, ValidationError

from moesim.placement.format import Placement
from moesim.placement.validate import validate_placement


@dataclass(frozen=True, eq=False)
class PlanningCosts:
    """The hardware as an optimising policy plans on it, in seconds and bytes. A study builds it from the
    engine's own compute and topology models (:func:`moesim.sim.costs.hardware_costs`, whose result is one);
    the defaults are unit costs, for a policy tried on its own."""

    compute_s_per_pair: float = 1.0  # expert compute per token-expert pair on an EP rank
    rank_s_per_byte: np.ndarray | None = None  # [G, G] between EP ranks, 0 on the diagonal; None: 1 between ranks
    dispatch_bytes: float = 1.0  # bytes one token copy carries to an expert's rank
    combine_bytes: float | None = None  # bytes one expert output carries back; None: dispatch_bytes
    # what one dispatch copy of a token goes to: "node" (hierarchical all-to-all: one network copy per
    # destination node), "gpu" (direct, one copy per destination rank) or "expert" (one per pick)
    a2a_copies: str = "gpu"
    coherent: bool = False  # context-coherent dataflow: tokens travel from layer l's experts to layer l+1's


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a policy may use. ``load[l, e]``: token-expert pairs seen in the profiling window."""

    num_layers: int
    num_experts: int
    num_ranks: int  # EP ranks
    gpus_per_node: int  # EP ranks per node
    slots_per_gpu: int  # expert copies per EP rank per layer
    load: np.ndarray
    seed: int = 0
    # expert copies per EP rank per layer that its memory holds (replicas included); None = not bounded
    max_slots_per_gpu: int | None = None
    memory_slots: int | None = None  # expert copies an EP rank's memory holds over all layers; None = unbounded
    # Routing statistics of the profiling window, for the policies that look past the loads (all optional).
    routing: np.ndarray | None = None  # [tokens, layers, top_k] expert ids of the profiling window
    transitions: np.ndarray | None = None  # [layers-1, E, E]; None: counted from routing on first use
    coactivation: np.ndarray | None = None  # [layers, E, E]; None: counted from routing on first use
    costs: PlanningCosts = field(default_factory=PlanningCosts)  # the hardware, for the optimising policies
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # lazy statistics

    @property
    def num_nodes(self) -> int:
        return -(-self.num_ranks // self.gpus_per_node)

    def transition_counts(self) -> np.ndarray:
        """``R[l, e, f]`` (see :mod:`moesim.placement.profile`): given, counted from ``routing``, or zeros."""
        if "transitions" not in self._cache:
            from moesim.placement.profile import transition_counts
            L, E = self.num_layers, self.num_experts
            if self.transitions is not None:
                self._cache["transitions"] = np.asarray(self.transitions, dtype=float)
            elif self.routing is not None:
                self._cache["transitions"] = transition_counts(self.routing, E)
            else:
                self._cache["transitions"] = np.zeros((max(L - 1, 0), E, E))
        return self._cache["transitions"]

    def coactivation_counts(self) -> np.ndarray:
        """``C[l, e, f]``: given, counted from ``routing``, or zeros."""
        if "coactivation" not in self._cache:
            from moesim.placement.profile import coactivation_counts
            L, E = self.num_layers, self.num_experts
            if self.coactivation is not None:
                self._cache["coactivation"] = np.asarray(self.coactivation, dtype=float)
            elif self.routing is not None:
                self._cache["coactivation"] = coactivation_counts(self.routing, E)
            else:
                self._cache["coactivation"] = np.zeros((L, E, E))
        return self._cache["coactivation"]


Policy = Callable[..., Placement]
_REGISTRY: dict[str, Policy] = {}
_REPLICAS: dict[str, str] = {}  # policy -> the option giving its number of extra expert copies
_PAIRWISE: set[str] = set()  # policies that count expert-pair statistics (layers x experts^2)
_NO_PROFILE: set[str] = set()  # policies that read no profile statistics (load, routing): shape and seed only


def register(name: str, *, replicas: str | None = None, pairwise: bool = False,
             profile: bool = True) -> Callable[[Policy], Policy]:
    """Register ``policy(problem, **options)`` under ``name``. ``replicas`` declares that the policy
    replicates experts and names its option giving the number of extra copies (e.g. ``redundant_experts``):
    memory checks and slot limits read it from there. ``pairwise`` declares that it reads the transition or
    co-activation counts (layers x experts x experts), which the memory estimate of a study then counts.
    ``profile=False`` declares that it reads nothing of the profiling window (``load``, ``routing`` and their
    counts): a study then hands it a problem whose ``load`` is zeros and generates no profile for it."""
    def deco(fn: Policy) -> Policy:
        if name in _REGISTRY:
            raise ValueError(f"placement policy {name!r} is already registered; registered: "
                             f"{', '.join(policy_names())}")
        if replicas is not None and replicas not in inspect.signature(fn).parameters:
            raise ValueError(f"placement policy {name!r} declares replicas option {replicas!r}, which it does not take")
        _REGISTRY[name] = fn
        if replicas is not None:
            _REPLICAS[name] = replicas
        if pairwise:
            _PAIRWISE.add(name)
        if not profile:
            _NO_PROFILE.add(name)
        return fn

    return deco


def replica_option(name: str) -> str | None:
    """The option of policy ``name`` that gives its number of extra expert copies (None: it does not replicate)."""
    return _REPLICAS.get(name)


def replica_slots(name: str, options: dict[str, Any]) -> int:
    """Extra expert copies per layer that policy ``name`` is asked for by ``options`` (0 if it does not
    replicate)."""
    key = _REPLICAS.get(name)
    value = options.get(key) if key is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def uses_pairwise(name: str) -> bool:
    """Whether policy ``name`` counts expert-pair statistics (see :func:`register`)."""
    return name in _PAIRWISE


def reads_profile(name: str) -> bool:
    """Whether policy ``name`` reads the profiling window's statistics (see :func:`register`)."""
    return name not in _NO_PROFILE


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
                       num_ranks=problem.num_ranks, source=f"policy {name}")
    slots = placement.copies_per_gpu().max()
    # redundant experts (replicas) add ceil(R / G) slots per GPU beyond the equal share
    allowed = problem.slots_per_gpu + -(-replica_slots(name, options) // problem.num_ranks)
    if slots > allowed:
        raise AssertionError(f"policy {name} used {slots} slots on a GPU, over {allowed}")
    return placement
