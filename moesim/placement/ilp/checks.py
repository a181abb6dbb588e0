"""Checks shared by the ILP policies: is the instance feasible, are the solver options valid.

A violated constraint is a one-line :class:`moesim.errors.InputError` naming the field. Deliberately not
checked here: whether a method suits the instance's size (the method's own module says, e.g.
:func:`moesim.placement.ilp.chain_dp.chain_dp_size`). See docs/ilp.md.
"""

from __future__ import annotations

from moesim.errors import InputError
from moesim.placement.registry import PlacementProblem

METHODS = ("auto", "exact", "joint", "decompose")


def check_feasible(problem: PlacementProblem) -> None:
    """One-line InputError naming the constraint an instance cannot meet."""
    E, G, s, L = problem.num_experts, problem.num_ranks, problem.slots_per_gpu, problem.num_layers
    if E > s * G:
        raise InputError(f"infeasible: {E} experts do not fit {G} ranks x {s} slots per layer", field="slots_per_gpu")
    if problem.memory_slots is not None and problem.memory_slots * G < L * E:
        raise InputError(f"infeasible: {L} layers x {E} experts need {L * E} expert copies, memory holds "
                         f"{problem.memory_slots} per rank x {G} ranks", field="memory_slots")
    if problem.memory_slots is not None and problem.memory_slots < L * s:
        # feasible only with per-layer counts balanced across layers, which these policies do not plan
        raise InputError(f"memory holds {problem.memory_slots} expert copies per rank, under {L} layers x {s} "
                         "slots; add ranks or memory", field="memory_slots")
    if problem.load.shape != (L, E):
        raise InputError(f"load must be [{L}, {E}], got {list(problem.load.shape)}", field="load")


def check_options(method: str, time_limit_s: float, gap: float) -> None:
    """The ``ilp`` policy's method, time limit and relative gap."""
    if method not in METHODS:
        raise InputError(f"must be one of {', '.join(METHODS)}, got {method!r}", field="method")
    check_budget(time_limit_s, gap)


def check_budget(time_limit_s: float, gap: float) -> None:
    """A time limit > 0 and a relative gap in [0, 1)."""
    if not time_limit_s > 0:
        raise InputError(f"must be > 0, got {time_limit_s!r}", field="time_limit_s")
    if not 0 <= gap < 1:
        raise InputError(f"must be in [0, 1), got {gap!r}", field="gap")
