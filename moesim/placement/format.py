"""Expert placements: per MoE layer, per expert, the EP ranks that hold a copy.

JSON interchange format::

    {"format": "moesim.placement/1", "num_ranks": R, "policy": "greedy",
     "layers": [{"expert_gpus": [[g], [g1, g2], ...]}, ...]}

An EP rank is a GPU, or with expert tensor parallelism (``tp > 1``) a group of ``tp`` GPUs that shard every
expert it holds (``num_ranks`` = GPUs / tp); the ids in ``expert_gpus`` are EP ranks. The reader also takes
``num_gpus``, the field's former name. In memory a placement is a dense int array ``gpus[layer, expert,
replica]`` padded with -1, so the engine can look replicas up with numpy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from moesim.errors import InputError
from moesim.fileio import atomic_write, head, read_json_object

FORMAT = "moesim.placement/1"
_FORMER_NUM_RANKS = "num_gpus"  # what files written before the rename call num_ranks; still read
MAX_GPUS = 2**31 - 1  # EP ranks are int32 in the dense array


@dataclass(frozen=True)
class Placement:
    num_ranks: int  # EP ranks (GPUs / tp)
    gpus: np.ndarray  # int32 [layers, experts, max_replicas], -1 padded
    policy: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.gpus.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.gpus.shape[1])

    def replicas(self) -> np.ndarray:
        """[layers, experts] number of copies of each expert."""
        return (self.gpus >= 0).sum(axis=2)

    def copies_per_gpu(self) -> np.ndarray:
        """[layers, gpus] number of expert copies each GPU holds."""
        out = np.zeros((self.num_layers, self.num_ranks), dtype=np.int64)
        for l in range(self.num_layers):
            g = self.gpus[l][self.gpus[l] >= 0]
            out[l] = np.bincount(g, minlength=self.num_ranks)
        return out

    @classmethod
    def from_assignment(cls, assign: np.ndarray, num_ranks: int, policy: str = "",
                        info: dict[str, Any] | None = None) -> "Placement":
        """One copy per expert: ``assign[layer, expert]`` is its GPU."""
        return cls(num_ranks=num_ranks, gpus=np.asarray(assign, dtype=np.int32)[:, :, None],
                   policy=policy, info=dict(info or {}))

    @classmethod
    def from_lists(cls, layers: list[list[list[int]]], num_ranks: int, policy: str = "",
                   info: dict[str, Any] | None = None) -> "Placement":
        width = max((len(r) for layer in layers for r in layer), default=1)
        num_experts = max((len(layer) for layer in layers), default=0)
        gpus = np.full((len(layers), num_experts, max(width, 1)), -1, dtype=np.int32)
        for l, layer in enumerate(layers):
            for e, reps in enumerate(layer):
                gpus[l, e, : len(reps)] = reps
        return cls(num_ranks=num_ranks, gpus=gpus, policy=policy, info=dict(info or {}))

    def to_json(self) -> dict[str, Any]:
        layers = [{"expert_gpus": [[int(g) for g in reps if g >= 0] for reps in layer]} for layer in self.gpus]
        return {"format": FORMAT, "num_ranks": self.num_ranks, "policy": self.policy, "info": self.info,
                "layers": layers}


def save_placement(placement: Placement, path: str | os.PathLike[str]) -> Path:
    """Write ``placement`` as JSON atomically."""
    def write(fh: IO[str]) -> None:
        json.dump(placement.to_json(), fh, indent=1, sort_keys=True)
        fh.write("\n")

    return atomic_write(path, write)


def is_placement_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a placement file moesim wrote (its ``format`` comes first)."""
    return f'"format": "{FORMAT.split("/")[0]}/'.encode() in head(Path(path), 200)


def _num_ranks(raw: dict, src: str) -> int:
    """The file's EP rank count, under its name or its former one (not both)."""
    key = "num_ranks"
    if _FORMER_NUM_RANKS in raw:
        if key in raw:
            raise InputError(f"give num_ranks only ({_FORMER_NUM_RANKS} is its former name)", source=src,
                             field=_FORMER_NUM_RANKS)
        key = _FORMER_NUM_RANKS
    num_ranks = raw.get(key)
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or not 0 < num_ranks <= MAX_GPUS:
        raise InputError(f"must be a positive integer up to {MAX_GPUS}, got {num_ranks!r}", source=src, field=key)
    return num_ranks


def load_placement(path: str | os.PathLike[str]) -> Placement:
    """Read a placement file; structural problems raise :class:`InputError` naming file and field.

    Range and capacity checks against a model and cluster are :func:`moesim.placement.validate`'s job.
    """
    src = str(path)
    raw = read_json_object(path)
    unknown = set(raw) - {"format", "num_ranks", _FORMER_NUM_RANKS, "layers", "policy", "info"}
    if unknown:
        raise InputError("unknown key; expected format, num_ranks, layers, policy, info", source=src,
                         field=sorted(unknown)[0])
    if raw.get("format") != FORMAT:
        raise InputError(f"must be {FORMAT!r}, got {raw.get('format')!r}", source=src, field="format")
    num_ranks = _num_ranks(raw, src)
    layers = raw.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InputError("must be a non-empty list", source=src, field="layers")
    lists: list[list[list[int]]] = []
    for l, layer in enumerate(layers):
        where = f"layers[{l}].expert_gpus"
        if not isinstance(layer, dict) or set(layer) != {"expert_gpus"}:
            raise InputError('must be an object {"expert_gpus": [...]}', source=src, field=f"layers[{l}]")
        experts = layer["expert_gpus"]
        if not isinstance(experts, list) or not experts:
            raise InputError("must be a non-empty list", source=src, field=where)
        for e, reps in enumerate(experts):
            ok = isinstance(reps, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in reps)
            if not ok:
                raise InputError("must be a list of GPU indices", source=src, field=f"{where}[{e}]")
            if len(reps) > num_ranks:
                raise InputError(f"{len(reps)} copies of one expert, more than the {num_ranks} GPUs (a GPU holds at "
                                 "most one)", source=src, field=f"{where}[{e}]")
            bad = next((g for g in reps if not 0 <= g < num_ranks), None)
            if bad is not None:
                raise InputError(f"GPU {bad} out of range [0, {num_ranks})", source=src, field=f"{where}[{e}]")
        lists.append(experts)
    info = raw.get("info") or {}
    if not isinstance(info, dict):
        raise InputError("must be a JSON object", source=src, field="info")
    if len({len(layer) for layer in lists}) != 1:
        raise InputError("every layer must list the same number of experts", source=src, field="layers")
    return Placement.from_lists(lists, num_ranks, policy=str(raw.get("policy", "")), info=info)
