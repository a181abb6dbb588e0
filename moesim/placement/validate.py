"""The one validator every placement passes: each policy's output, and every placement file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import InputError
from moesim.placement.format import Placement


@dataclass(frozen=True)
class Capacity:
    """What a placement must fit: expert slots per GPU per layer, and expert-weight memory per GPU."""

    slots_per_gpu: int | None  # copies per GPU per layer; None = unlimited
    expert_bytes_per_gpu: float  # one expert copy's weights on one GPU of an EP rank
    memory_bytes_per_gpu: float  # budget for expert weights on one GPU


def validate_placement(placement: Placement, *, num_layers: int, num_experts: int, num_ranks: int,
                       capacity: Capacity | None = None, source: str | None = None) -> Placement:
    """Check ranges, completeness, duplicates and capacity; return the placement or raise InputError."""
    name = source or f"placement {placement.policy or '?'}"
    gpus = placement.gpus
    if placement.num_ranks != num_ranks:
        raise InputError(f"placement is for {placement.num_ranks} GPUs (EP ranks), the cluster has {num_ranks}",
                         source=name, field="num_ranks")
    if gpus.shape[0] != num_layers:
        raise InputError(f"has {gpus.shape[0]} layers, the model has {num_layers}", source=name, field="layers")
    if gpus.shape[1] != num_experts:
        raise InputError(f"lists {gpus.shape[1]} experts per layer, the model has {num_experts}",
                         source=name, field="layers[0].expert_gpus")
    bad = (gpus < -1) | (gpus >= num_ranks)
    if bad.any():
        l, e, r = (int(i[0]) for i in np.nonzero(bad))
        raise InputError(f"GPU {int(gpus[l, e, r])} out of range [0, {num_ranks})", source=name,
                         field=f"layers[{l}].expert_gpus[{e}]")
    missing = (gpus < 0).all(axis=2)
    if missing.any():
        l, e = (int(i[0]) for i in np.nonzero(missing))
        raise InputError("expert has no GPU", source=name, field=f"layers[{l}].expert_gpus[{e}]")
    srt = np.sort(gpus, axis=2)
    dup = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)
    if dup.any():
        l, e, _ = (int(i[0]) for i in np.nonzero(dup))
        raise InputError("lists one GPU twice", source=name, field=f"layers[{l}].expert_gpus[{e}]")
    if capacity is None:
        return placement
    copies = placement.copies_per_gpu()
    if capacity.slots_per_gpu is not None and copies.max() > capacity.slots_per_gpu:
        l, g = (int(i[0]) for i in np.nonzero(copies > capacity.slots_per_gpu))
        raise InputError(f"GPU {g} holds {int(copies[l, g])} experts in layer {l}, over its "
                         f"{capacity.slots_per_gpu} slots", source=name, field=f"layers[{l}]")
    mem = copies.sum(axis=0) * capacity.expert_bytes_per_gpu
    if mem.max() > capacity.memory_bytes_per_gpu:
        g = int(mem.argmax())
        raise InputError(f"GPU {g} needs {mem[g] / 1e9:.1f} GB for expert weights, over its budget of "
                         f"{capacity.memory_bytes_per_gpu / 1e9:.1f} GB", source=name, field="layers")
    return placement
