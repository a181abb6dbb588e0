"""Baseline placement policies: contiguous (Megatron/vLLM default), round-robin, random, greedy.

All are per layer and give every EP rank an equal number of expert slots (``ceil(E / G)``); only
``greedy`` replicates, when asked (``redundant_experts``; EPLB and the ILP live in their own modules).
"""

from __future__ import annotations

import numpy as np

from moesim.placement.format import Placement
from moesim.placement.registry import PlacementProblem, register


@register("contiguous", profile=False)
def contiguous(problem: PlacementProblem) -> Placement:
    """Expert e on GPU e * G // E (= e // (E/G) when G divides E), every layer."""
    E, G = problem.num_experts, problem.num_ranks
    row = np.arange(E) * G // E
    return Placement.from_assignment(np.tile(row, (problem.num_layers, 1)), G, "contiguous")


@register("round_robin", profile=False)
def round_robin(problem: PlacementProblem) -> Placement:
    """Expert e on GPU e mod G, every layer."""
    row = np.arange(problem.num_experts) % problem.num_ranks
    return Placement.from_assignment(np.tile(row, (problem.num_layers, 1)), problem.num_ranks, "round_robin")


@register("random", profile=False)
def random(problem: PlacementProblem, *, seed: int | None = None) -> Placement:
    """A seeded random permutation of experts per layer, cut into equal slots."""
    rng = np.random.default_rng(problem.seed if seed is None else seed)
    E, G = problem.num_experts, problem.num_ranks
    assign = np.empty((problem.num_layers, E), dtype=np.int64)
    for l in range(problem.num_layers):
        assign[l, rng.permutation(E)] = np.arange(E) * G // E
    return Placement.from_assignment(assign, G, "random", {"seed": int(problem.seed if seed is None else seed)})


def lpt(load: np.ndarray, num_bins: int, slots: int) -> np.ndarray:
    """Longest-processing-time first with a slot limit: heaviest item to the lightest bin with room.

    Ties go to the lower bin index, so the result is deterministic. Returns the bin of each item.
    """
    order = np.argsort(-load, kind="stable")
    bin_load = np.zeros(num_bins)
    bin_count = np.zeros(num_bins, dtype=np.int64)
    out = np.empty(load.size, dtype=np.int64)
    for item in order:
        open_bins = np.flatnonzero(bin_count < slots)
        b = open_bins[np.argmin(bin_load[open_bins])]
        out[item] = b
        bin_load[b] += load[item]
        bin_count[b] += 1
    return out


@register("greedy", replicas="redundant_experts")
def greedy(problem: PlacementProblem, *, redundant_experts: int = 0) -> Placement:
    """Per layer, largest profiled load first onto the least-loaded GPU, equal expert slots per GPU.

    With ``redundant_experts`` N > 0, N extra copies of the hottest experts (by load per copy) are packed
    the same way, ``ceil((E + N) / G)`` slots per GPU (:func:`moesim.placement.replication.replicate_and_pack`).
    """
    if redundant_experts:
        from moesim.placement.eplb import check_replica_memory
        from moesim.placement.replication import replicate_and_pack

        if redundant_experts < 0:
            raise ValueError(f"greedy: redundant_experts must be >= 0, got {redundant_experts}")
        check_replica_memory(problem, -(-(problem.num_experts + redundant_experts) // problem.num_ranks), "greedy")
        return replicate_and_pack(problem.load, problem.num_ranks, redundant_experts, "greedy")
    assign = np.stack([lpt(problem.load[l], problem.num_ranks, problem.slots_per_gpu)
                       for l in range(problem.num_layers)])
    return Placement.from_assignment(assign, problem.num_ranks, "greedy")
