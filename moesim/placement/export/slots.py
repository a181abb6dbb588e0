"""Physical expert slots: a placement as the ``physical_to_logical`` map the serving engines load, and back.

Convention shared by vLLM, SGLang and TensorRT-LLM (docs/engine_formats.md): per MoE layer there are ``P``
physical slots, ``P = E + redundant``, equal on every EP rank (``P % R == 0``); slot ``p`` lives on EP rank
``p // (P / R)`` and holds logical expert ``map[l, p]``; every logical expert has at least one slot in every
layer. A moesim placement lists, per expert, the EP ranks holding a copy; :func:`slot_map` lays each rank's
copies into its slots in expert-id order. It refuses what the convention cannot express: an expert without a
slot, or ranks holding different numbers of copies. One exception: an ``eplb`` placement whose algorithm put two
replicas of one expert on one rank (moesim keeps one copy, ``info["merged_twins"]`` counts them, the slot stays
empty) gets each empty slot back as a second copy of an expert its rank already holds - the same per-rank
loads, which is what EPLB's twin gave.
Ignored: the order of slots within a rank (an engine's dispatch picks a replica by rank, not by slot).
"""

from __future__ import annotations

import numpy as np

from moesim.errors import InputError
from moesim.placement.format import Placement


def identity_map(num_layers: int, num_experts: int, num_slots: int) -> np.ndarray:
    """The engines' default map: slot ``p`` holds expert ``p % E`` (SGLang's ``trivial``, vLLM's initial map)."""
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    return np.tile(np.arange(num_slots, dtype=np.int64) % num_experts, (num_layers, 1))


def _check_complete(placement: Placement, engine: str, source: str | None) -> None:
    missing = (placement.gpus < 0).all(axis=2)
    if missing.any():
        l, e = (int(i[0]) for i in np.nonzero(missing))
        raise InputError(f"expert {e} has no EP rank in MoE layer {l}; {engine} needs every expert in every layer",
                         source=source, field=f"layers[{l}].expert_gpus[{e}]")


def slot_map(placement: Placement, engine: str = "the engine", source: str | None = None) -> np.ndarray:
    """``physical_to_logical [layers, P]`` (int64) of ``placement``; InputError (naming ``engine``) when the
    slot convention cannot express it. See the module docstring."""
    _check_complete(placement, engine, source)
    L, R = placement.num_layers, placement.num_ranks
    copies = placement.copies_per_gpu()  # [L, R]
    per_rank = int(copies.max())
    short = per_rank * L * R - int(copies.sum())
    twins = placement.info.get("merged_twins", 0) if placement.policy == "eplb" else 0
    if short and short != twins:
        l, r = (int(i[0]) for i in np.nonzero(copies < per_rank))
        raise InputError(f"EP rank {r} holds {int(copies[l, r])} experts in MoE layer {l}, others {per_rank}: "
                         f"{engine} gives every rank the same number of slots (P = {per_rank} x {R} ranks); "
                         "use a placement that fills every rank equally (eplb, or greedy/ilp with "
                         "redundant_experts making E + redundant a multiple of the ranks)", source=source,
                         field=f"layers[{l}]")
    out = np.empty((L, R * per_rank), dtype=np.int64)
    for l in range(L):
        held = placement.gpus[l]
        for r in range(R):
            experts = np.nonzero((held == r).any(axis=1))[0]
            fill = np.resize(experts, per_rank)  # an eplb twin's empty slot: a second copy of one held here
            out[l, r * per_rank:(r + 1) * per_rank] = fill
    return out


def placement_from_map(phy2log: np.ndarray, num_experts: int, num_ranks: int, policy: str,
                       info: dict | None = None, source: str | None = None) -> Placement:
    """The placement a ``physical_to_logical`` map gives (twins on one rank become one copy, counted in
    ``info["merged_twins"]``); InputError when the map breaks the slot convention."""
    from moesim.placement.eplb import placement_from_phy2log

    phy2log = np.asarray(phy2log, dtype=np.int64)
    L, P = phy2log.shape
    if P % num_ranks:
        raise InputError(f"{P} slots do not split evenly over {num_ranks} EP ranks", source=source,
                         field="physical_to_logical_map")
    bad = (phy2log < 0) | (phy2log >= num_experts)
    if bad.any():
        l, p = (int(i[0]) for i in np.nonzero(bad))
        raise InputError(f"slot {p} of layer {l} holds expert {int(phy2log[l, p])}, out of range [0, {num_experts})",
                         source=source, field="physical_to_logical_map")
    seen = np.zeros((L, num_experts), dtype=bool)
    seen[np.arange(L)[:, None], phy2log] = True
    if not seen.all():
        l, e = (int(i[0]) for i in np.nonzero(~seen))
        raise InputError(f"expert {e} has no slot in layer {l}", source=source, field="physical_to_logical_map")
    return placement_from_phy2log(phy2log, num_experts, num_ranks, policy, info)
