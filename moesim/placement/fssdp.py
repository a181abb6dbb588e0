"""Fully sharded sparse data parallelism (FSSDP; Hecate, Qing et al., arXiv 2502.02581): where each expert's
training state lives, and what the two sparse collectives move to materialise experts every iteration.

Every expert's parameters, gradients and optimizer states are sharded over the EP ranks: ``shards[l, e, r]``
is the fraction of expert ``e`` of layer ``l`` that rank ``r`` owns (each (l, e) sums to 1). A *sharding
policy* (registered by name, :func:`register_sharding`) chooses it once:

- ``uniform``: every expert split evenly over all ranks (FSDP's sharding);
- ``home`` (Hecate's heterogeneous sharding): each expert's states split over the ranks that hold it in a
  reference placement (the static EP plan from the profile), so materialising an expert where it usually runs
  moves nothing and FSSDP costs nothing over expert parallelism when loads do not move;
- ``node``: each expert split evenly over the ranks of the node(s) of its reference copies, so its
  materialisation elsewhere in the node is an NVLink transfer.

Each iteration a placement says which experts to *materialise* where (any registered placement policy,
re-planned on the iteration's predicted loads, or :func:`everywhere`); with sparse materialisation a copy
that receives no rows is not materialised. The SparseAllGather brings every materialised (layer, expert,
rank) copy the shards other ranks own: rank ``g`` receives ``shards[l, e, h] x expert_bytes`` from each
``h != g``; the SparseReduceScatter sends each copy's gradient back to the owners of its shards (the
transpose, at the gradient's bytes). With every expert materialised on every rank and uniform shards this is
FSDP's all-gather and reduce-scatter of all expert parameters: ``(R - 1) / R x expert_bytes`` per expert in
and out of every rank (tested). Pure numpy; no hardware. Ignored: the order of shards within an expert, and
sharding a single expert's rows unevenly across its owners.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from moesim.placement.format import Placement

Sharding = Callable[[Placement, int], np.ndarray]
_SHARDINGS: dict[str, Sharding] = {}


def register_sharding(name: str) -> Callable[[Sharding], Sharding]:
    """Register a sharding policy ``fn(reference, ranks_per_node) -> shards [L, E, R]``; a name twice raises."""

    def deco(fn: Sharding) -> Sharding:
        if name in _SHARDINGS:
            raise ValueError(f"sharding policy {name!r} is registered twice; registered: {', '.join(_SHARDINGS)}")
        _SHARDINGS[name] = fn
        return fn

    return deco


def sharding_names() -> list[str]:
    return sorted(_SHARDINGS)


def make_shards(name: str, reference: Placement, ranks_per_node: int) -> np.ndarray:
    """``shards [L, E, R]`` of the sharding policy ``name``; raises KeyError listing the valid names."""
    if name not in _SHARDINGS:
        raise KeyError(f"unknown sharding policy {name!r}; valid: {', '.join(sharding_names())}")
    shards = _SHARDINGS[name](reference, ranks_per_node)
    assert np.allclose(shards.sum(axis=2), 1.0)
    return shards


def held(placement: Placement) -> np.ndarray:
    """bool [L, E, R]: which rank holds (materialises) a copy of each expert."""
    out = np.zeros((placement.num_layers, placement.num_experts, placement.num_ranks), dtype=bool)
    l, e, k = np.nonzero(placement.gpus >= 0)
    out[l, e, placement.gpus[l, e, k]] = True
    return out


@register_sharding("uniform")
def uniform(reference: Placement, ranks_per_node: int) -> np.ndarray:
    L, E = reference.num_layers, reference.num_experts
    return np.full((L, E, reference.num_ranks), 1.0 / reference.num_ranks)


@register_sharding("home")
def home(reference: Placement, ranks_per_node: int) -> np.ndarray:
    mask = held(reference).astype(float)
    return mask / mask.sum(axis=2, keepdims=True)


@register_sharding("node")
def node(reference: Placement, ranks_per_node: int) -> np.ndarray:
    R = reference.num_ranks
    per = max(1, min(ranks_per_node, R))
    node_of = np.arange(R) // per
    mask = held(reference)
    num_nodes = int(node_of.max()) + 1
    nodes = np.zeros((reference.num_layers, reference.num_experts, num_nodes), dtype=bool)
    for n in range(num_nodes):
        nodes[:, :, n] = mask[:, :, node_of == n].any(axis=2)
    spread = nodes[:, :, node_of].astype(float)
    return spread / spread.sum(axis=2, keepdims=True)


def everywhere(num_layers: int, num_experts: int, num_ranks: int, policy: str = "everywhere") -> Placement:
    """Every expert materialised on every rank (FSDP of the experts; tokens need no all-to-all)."""
    gpus = np.broadcast_to(np.arange(num_ranks, dtype=np.int32), (num_layers, num_experts, num_ranks)).copy()
    return Placement(num_ranks=num_ranks, gpus=gpus, policy=policy)


def sparse_allgather_bytes(materialised: np.ndarray, shards: np.ndarray, expert_bytes: float) -> np.ndarray:
    """[R, R] bytes rank h sends rank g to materialise one layer: ``materialised [E, R]`` copies, ``shards
    [E, R]`` ownership, ``expert_bytes`` per whole expert; a rank's own shard stays local (zero diagonal)."""
    out = shards.T.astype(float) @ materialised.astype(float) * expert_bytes
    np.fill_diagonal(out, 0.0)
    return out


def sparse_reduce_scatter_bytes(materialised: np.ndarray, shards: np.ndarray, grad_bytes: float) -> np.ndarray:
    """[R, R] bytes rank g sends rank h: the gradient of each materialised copy, split to its shards' owners."""
    return sparse_allgather_bytes(materialised, shards, grad_bytes).T


def lanes(rank_bytes: np.ndarray, tp: int) -> np.ndarray:
    """[G, G] from [R, R] rank-level bytes: each of a rank's ``tp`` GPUs moves ``1 / tp`` lane to lane."""
    if tp == 1:
        return rank_bytes
    R = rank_bytes.shape[0]
    out = np.zeros((R * tp, R * tp))
    for lane in range(tp):
        out[lane::tp, lane::tp] = rank_bytes / tp
    return out
