"""Replicated placements: how many copies each expert gets, and which GPUs hold them - shared by policies.

:func:`replicate_and_pack` is the one entry point for a policy that takes ``redundant_experts: N``
(``greedy``; the ILP can call it for its replica counts and its seed):

1. counts (:func:`replica_counts`): each of the ``N`` extra copies goes to the expert with the heaviest load
   per copy (EPLB's rule, which minimises the heaviest copy's load when copies split their expert's load
   evenly), never more copies than GPUs;
2. packing (:func:`pack_replicas`): copies, heaviest first (load / count each), onto the least-loaded GPU
   that has a free slot and does not hold that expert yet (longest-processing-time first with slot limits),
   ``ceil((E + N) / G)`` slots per GPU. Every layer advances together (numpy over layers).

Ignored: communication (where a copy sits relative to the tokens that use it) and the memory the copies
take (the caller checks ``PlacementProblem.max_slots_per_gpu``).
"""

from __future__ import annotations

import numpy as np

from moesim.placement.format import Placement


def replica_counts(load: np.ndarray, num_copies: int, max_copies: int) -> np.ndarray:
    """[layers, experts] copies per expert, ``num_copies`` in all per layer, at most ``max_copies`` each."""
    load = np.asarray(load, dtype=float)
    L, E = load.shape
    if not E <= num_copies <= E * max_copies:
        raise ValueError(f"{num_copies} copies of {E} experts need between {E} and {E * max_copies} "
                         f"(at most {max_copies} per expert: one per GPU)")
    counts = np.ones((L, E), dtype=np.int64)
    r = np.arange(L)
    for _ in range(num_copies - E):
        per_copy = np.where(counts < max_copies, load / counts, -np.inf)
        pick = per_copy.argmax(axis=1)  # first maximum: lowest expert id among ties
        counts[r, pick] += 1
    return counts


def pack_replicas(load: np.ndarray, counts: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """``held [layers, experts, gpus]``: copies (``counts``) packed heaviest first onto the least-loaded GPU
    with a free slot that does not hold the expert yet (ties: lowest GPU)."""
    load = np.asarray(load, dtype=float)
    L, E = load.shape
    total = int(counts[0].sum())
    if (counts.sum(axis=1) != total).any() or total > num_gpus * slots_per_gpu:
        raise ValueError(f"{total} copies do not fit {num_gpus} GPUs x {slots_per_gpu} slots")
    # every layer's copies as items: expert id and per-copy load, heaviest first (stable: lower id first)
    item_expert = np.stack([np.repeat(np.arange(E), counts[l]) for l in range(L)])
    item_load = np.take_along_axis(load / counts, item_expert, axis=1)
    order = np.argsort(-item_load, axis=1, kind="stable")
    item_expert = np.take_along_axis(item_expert, order, axis=1)
    item_load = np.take_along_axis(item_load, order, axis=1)
    r = np.arange(L)
    held = np.zeros((L, E, num_gpus), dtype=bool)
    gpu_load = np.zeros((L, num_gpus))
    gpu_n = np.zeros((L, num_gpus), dtype=np.int64)
    for j in range(total):
        e = item_expert[:, j]
        room = gpu_n < slots_per_gpu
        ok = room & ~held[r, e]
        # a copy that could only land beside its twin (a rare end-game) takes any free slot and merges
        ok = np.where(ok.any(axis=1)[:, None], ok, room)
        g = np.where(ok, gpu_load, np.inf).argmin(axis=1)
        held[r, e, g] = True
        gpu_load[r, g] += item_load[:, j]
        gpu_n[r, g] += 1
    return held


def placement_from_mask(held: np.ndarray, policy: str, info: dict | None = None) -> Placement:
    """A placement from ``held [layers, experts, gpus]`` (True where a GPU holds a copy), GPUs ascending."""
    L, E, G = held.shape
    width = max(int(held.sum(axis=2).max(initial=1)), 1)
    # stable sort puts held GPUs first, in ascending order
    order = np.argsort(~held, axis=2, kind="stable")[:, :, :width]
    ok = np.take_along_axis(held, order, axis=2)
    gpus = np.where(ok, order, -1).astype(np.int32)
    return Placement(num_gpus=G, gpus=gpus, policy=policy, info=dict(info or {}))


def replicate_and_pack(load: np.ndarray, num_gpus: int, redundant_experts: int, policy: str,
                       info: dict | None = None) -> Placement:
    """Choose replica counts and pack them (see the module docstring) into a :class:`Placement`."""
    L, E = np.asarray(load).shape
    if redundant_experts < 0:
        raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
    total = E + redundant_experts
    counts = replica_counts(load, total, num_gpus)
    held = pack_replicas(load, counts, num_gpus, -(-total // num_gpus))
    merged = int(counts.sum() - held.sum())
    return placement_from_mask(held, policy, {**(info or {}), "redundant_experts": redundant_experts,
                                              "merged_twins": merged})
