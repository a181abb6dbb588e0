"""DeepSeek's expert-parallel load balancer (EPLB), re-implemented in numpy and vectorised across layers.

Semantics follow ``eplb.py`` of github.com/deepseek-ai/EPLB exactly, ties included:

- :func:`balanced_packing` ``(w[X, n], m)``: items by weight, heaviest first (in the order torch's CPU sort
  leaves equal weights: libstdc++'s introsort, emulated for rows with ties), each into the lightest pack that
  still has one of its ``n / m`` places (the lowest pack index among equals, as Python's ``min``); pack weights
  accumulate in float32 as torch does.
- :func:`replicate_experts` ``(w[X, E], P)``: each of the ``P - E`` extra slots goes to
  ``argmax_e w_e / count_e`` (the first maximum, as ``torch.max``), divisions in float32.
- :func:`rebalance_experts`: hierarchical when ``num_groups % num_nodes == 0`` (expert groups packed onto
  nodes, replicas made inside each node, replicas of load ``w_e / count_e`` packed onto the node's GPUs),
  otherwise global (the same with one group and one node). Returns ``phy2log [L, P]``,
  ``log2phy [L, E, max_count]`` (-1 padded) and ``logcnt [L, E]``; physical slot ``p`` lives on GPU
  ``p // (P / num_gpus)``.

Where the reference loops over layers in Python, here every row (layer, or layer x node) advances
together: the only Python loops run over the items of one row, so a DeepSeek-V3-shaped rebalance
(58 layers, 256 experts, 288 slots, 32 GPUs) takes a few milliseconds instead of about a second.

The ``eplb`` placement policy wraps it. Like the reference it has no communication term and assumes
replicas split an expert's load evenly; it may put two replicas of one expert on one GPU, which a moesim
placement cannot express (a GPU holds an expert or not), so such twins are merged into one copy and counted
in ``info["merged_twins"]`` (the spare slot stays empty).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from moesim.placement.format import Placement
from moesim.placement.registry import PlacementProblem, register
from moesim.placement.replication import placement_from_mask


_THRESHOLD = 16  # libstdc++'s _S_threshold


def _adjust_heap(k: list[float], ix: list[int], first: int, hole: int, length: int, vk: float, vi: int) -> None:
    """libstdc++'s ``__adjust_heap`` (with its ``__push_heap``) on the min-heap the descending order makes."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if k[first + child] > k[first + child - 1]:
            child -= 1
        k[first + hole], ix[first + hole] = k[first + child], ix[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        k[first + hole], ix[first + hole] = k[first + child - 1], ix[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # __push_heap
    while hole > top and k[first + parent] > vk:
        k[first + hole], ix[first + hole] = k[first + parent], ix[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    k[first + hole], ix[first + hole] = vk, vi


def _heap_sort(k: list[float], ix: list[int], first: int, last: int) -> None:
    """``__partial_sort(first, last, last)``: make a heap of ``[first, last)``, then pop it."""
    n = last - first
    if n >= 2:
        for parent in range((n - 2) // 2, -1, -1):
            _adjust_heap(k, ix, first, parent, n, k[first + parent], ix[first + parent])
    while last - first > 1:
        last -= 1
        vk, vi = k[last], ix[last]
        k[last], ix[last] = k[first], ix[first]
        _adjust_heap(k, ix, first, 0, last - first, vk, vi)


def _median_to_first(k: list[float], ix: list[int], first: int, last: int) -> None:
    """``__move_median_to_first``: the median of items ``first + 1``, the middle and ``last - 1`` to ``first``."""
    x, y, z = first + 1, first + (last - first) // 2, last - 1
    kx, ky, kz = k[x], k[y], k[z]
    if kx > ky:
        m = y if ky > kz else (z if kx > kz else x)
    elif kx > kz:
        m = x
    elif ky > kz:
        m = z
    else:
        m = y
    k[first], k[m] = k[m], k[first]
    ix[first], ix[m] = ix[m], ix[first]


def _unguarded_partition(k: list[float], ix: list[int], first: int, last: int) -> int:
    """``__unguarded_partition`` of ``[first + 1, last)`` around the pivot at ``first``; returns the cut."""
    lo, hi, pk = first + 1, last, k[first]
    while True:
        while k[lo] > pk:
            lo += 1
        hi -= 1
        while pk > k[hi]:
            hi -= 1
        if not lo < hi:
            return lo
        k[lo], k[hi] = k[hi], k[lo]
        ix[lo], ix[hi] = ix[hi], ix[lo]
        lo += 1


def _introsort(k: list[float], ix: list[int], first: int, last: int, depth: int) -> None:
    """``__introsort_loop``: quicksort down to runs of ``_THRESHOLD`` items, heap sort past ``depth``."""
    while last - first > _THRESHOLD:
        if depth == 0:
            _heap_sort(k, ix, first, last)
            return
        depth -= 1
        _median_to_first(k, ix, first, last)
        cut = _unguarded_partition(k, ix, first, last)
        _introsort(k, ix, cut, last, depth)
        last = cut


def _insertion_sort(k: list[float], ix: list[int], first: int, last: int) -> None:
    """``__insertion_sort`` of ``[first, last)``."""
    for i in range(first + 1, last):
        vk, vi = k[i], ix[i]
        if vk > k[first]:
            k[first + 1 : i + 1] = k[first:i]
            ix[first + 1 : i + 1] = ix[first:i]
            k[first], ix[first] = vk, vi
        else:
            _unguarded_linear_insert(k, ix, i)


def _unguarded_linear_insert(k: list[float], ix: list[int], i: int) -> None:
    """``__unguarded_linear_insert``: move item ``i`` down to its place (an item before it is not lighter)."""
    vk, vi = k[i], ix[i]
    while vk > k[i - 1]:
        k[i], ix[i] = k[i - 1], ix[i - 1]
        i -= 1
    k[i], ix[i] = vk, vi


def _unguarded_insertion_sort(k: list[float], ix: list[int], first: int, last: int) -> None:
    """``__unguarded_insertion_sort`` of ``[first, last)``, the hot loop: the linear insert inlined and entered
    only for items that move."""
    for i in range(first, last):
        vk = k[i]
        if vk > k[i - 1]:
            vi = ix[i]
            j = i
            while vk > k[j - 1]:
                k[j] = k[j - 1]
                ix[j] = ix[j - 1]
                j -= 1
            k[j] = vk
            ix[j] = vi


def _std_sort_desc(keys: list[float]) -> list[int]:
    """The permutation libstdc++'s ``std::sort`` (introsort) leaves when it sorts (key, index) pairs by key,
    descending - what torch's CPU ``sort(descending=True)`` does (it is not stable past 16 items). Only the
    order of equal keys depends on this; rows without ties are sorted by numpy. The helpers above are the
    libstdc++ routines of the same names, on the lists of keys ``k`` and indices ``ix`` (comparisons
    inlined: this runs in pure Python)."""
    k = list(keys)
    ix = list(range(len(k)))
    n = len(k)
    if n:
        _introsort(k, ix, 0, n, 2 * (n.bit_length() - 1))  # std::__sort: then __final_insertion_sort
        if n > _THRESHOLD:
            _insertion_sort(k, ix, 0, _THRESHOLD)
            _unguarded_insertion_sort(k, ix, _THRESHOLD, n)
        else:
            _insertion_sort(k, ix, 0, n)
    return ix


def torch_sort_desc(weight: np.ndarray) -> np.ndarray:
    """Row-wise descending argsort with torch's CPU tie order (rows with ties go through
    :func:`_std_sort_desc`; the rest through numpy, which then gives the same answer)."""
    order = np.argsort(-weight, axis=1, kind="stable")
    if weight.shape[1] > _THRESHOLD:  # up to 16 items std::sort is an insertion sort: stable
        srt = np.take_along_axis(weight, order, axis=1)
        for row in np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1)):
            order[row] = _std_sort_desc(weight[row].tolist())
    return order


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the ``n`` items of each row of ``weight [X, n]`` into ``num_packs`` packs of ``n / num_packs``
    items each, heaviest item first into the lightest pack with room. Returns ``(pack_index, rank_in_pack)``,
    both int64 [X, n]."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n), (rows, n)).copy(), np.zeros((rows, n), dtype=np.int64)
    order = torch_sort_desc(weight)
    r = np.arange(rows)
    pack_w = np.zeros((rows, num_packs), dtype=np.float32)
    pack_n = np.zeros((rows, num_packs), dtype=np.int64)
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    full = np.float32(np.inf)
    for j in range(n):
        item = order[:, j]
        pack = np.where(pack_n < per_pack, pack_w, full).argmin(axis=1)  # first lightest open pack
        pack_index[r, item] = pack
        rank_in_pack[r, item] = pack_n[r, pack]
        pack_w[r, pack] += weight[r, item]
        pack_n[r, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn the ``E`` experts of each row of ``weight [X, E]`` into ``num_phy`` replicas, each extra one going
    to the expert with the heaviest load per replica. Returns ``(phy2log [X, P], rank [X, P], logcnt [X, E])``:
    the expert of each physical replica, its replica number, and each expert's replica count."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical slots cannot hold {num_log} experts")
    r = np.arange(rows)
    phy2log = np.broadcast_to(np.arange(num_phy), (rows, num_phy)).copy()
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    for i in range(num_log, num_phy):
        pick = (weight / logcnt.astype(np.float32)).argmax(axis=1)
        phy2log[:, i] = pick
        rank[:, i] = logcnt[r, pick]
        logcnt[r, pick] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    # 1. expert groups onto nodes
    tokens_per_group = weight.reshape(L, num_groups, group_size).sum(axis=2, dtype=np.float32)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node: rows are (layer, node)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_phy // num_nodes)
    # 3. replicas onto the node's GPUs
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1) + np.arange(0, E, E // num_nodes)[None, :, None]).reshape(L, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB: ``weight [layers, experts]`` loads -> ``(phy2log, log2phy, logcnt)``; see the module
    docstring. Raises ValueError on the reference's preconditions (experts divisible by groups, slots by
    GPUs, GPUs by nodes). Arguments are named as the reference's: its GPUs are moesim's EP ranks."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError("weight must be [layers, experts]")
    L, E = weight.shape
    if num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not split evenly into {num_nodes} nodes")
    if num_replicas % num_gpus:
        raise ValueError(f"{num_replicas} physical experts do not split evenly over {num_gpus} GPUs")
    if num_replicas < E:
        raise ValueError(f"{num_replicas} physical experts cannot hold {E} experts")
    if num_groups >= 1 and num_groups % num_nodes == 0:
        if E % num_groups:
            raise ValueError(f"{E} experts do not split evenly into {num_groups} groups")
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = np.full((L, E * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + phyrank, np.broadcast_to(np.arange(num_replicas), (L, num_replicas)),
                      axis=1)
    return phy2log, log2phy.reshape(L, E, width), logcnt


def placement_from_phy2log(phy2log: np.ndarray, num_experts: int, num_ranks: int, policy: str,
                           info: dict | None = None) -> Placement:
    """A placement from a physical-slot map (slot ``p`` on GPU ``p // slots_per_gpu``); twins of one expert
    on one GPU become one copy (counted in ``info["merged_twins"]``)."""
    L, P = phy2log.shape
    gpu = np.broadcast_to(np.arange(P) // (P // num_ranks), (L, P))
    held = np.zeros((L, num_experts, num_ranks), dtype=bool)
    held[np.arange(L)[:, None], phy2log, gpu] = True
    twins = int(P * L - held.sum())
    return placement_from_mask(held, policy, {**(info or {}), "merged_twins": twins})


def redundant_count(num_experts: int, num_ranks: int, redundant_experts: int | None) -> int:
    """Redundant experts to use: the given number, or by default the fewest that fill every GPU's slots
    equally (0 when the GPUs divide the experts). Raises ValueError when slots would be unequal."""
    if redundant_experts is None:
        return (-num_experts) % num_ranks
    if redundant_experts < 0:
        raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
    if (num_experts + redundant_experts) % num_ranks:
        raise ValueError(f"redundant_experts={redundant_experts}: {num_experts} experts + {redundant_experts} "
                         f"redundant must fill the {num_ranks} GPUs (EP ranks) equally; use a multiple of "
                         f"{num_ranks} plus {(-num_experts) % num_ranks}")
    return redundant_experts


def check_replica_memory(problem: PlacementProblem, slots_per_gpu: int, policy: str) -> None:
    """Raise ValueError when ``slots_per_gpu`` copies per layer exceed what the GPUs' memory holds."""
    cap = problem.max_slots_per_gpu
    if cap is not None and slots_per_gpu > cap:
        most = cap * problem.num_ranks - problem.num_experts
        raise ValueError(f"{policy}: {slots_per_gpu} expert copies per GPU per layer do not fit in memory "
                         f"(room for {cap}: memory_GB x expert_memory_fraction over every layer's copies); lower "
                         f"redundant_experts to at most {most}")


@register("eplb", replicas="redundant_experts")
def eplb(problem: PlacementProblem, *, redundant_experts: int | None = None, num_groups: int = 1,
         mode: Literal["auto", "hierarchical", "global"] = "auto") -> Placement:
    """DeepSeek EPLB on the profiled loads: ``redundant_experts`` extra copies of hot experts (default: the
    fewest that fill every GPU equally), ``num_groups`` expert groups (DeepSeek-V3: 8), nodes and GPUs from
    the cluster. ``auto`` is hierarchical when the nodes divide the groups, else global (as the reference)."""
    E, G = problem.num_experts, problem.num_ranks
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"eplb: num_groups={num_groups} must divide the {E} experts (DeepSeek-V3: 8 groups of 32)")
    R = redundant_count(E, G, redundant_experts)
    P = E + R
    check_replica_memory(problem, P // G, "eplb")
    nodes = problem.num_nodes
    if G % nodes:
        nodes = 1  # a partial last node: no node level
    if mode == "global":
        groups, nodes = 1, 1
    elif mode == "hierarchical":
        if num_groups % nodes:
            raise ValueError(f"eplb: hierarchical mode needs num_groups ({num_groups}) divisible by the "
                             f"{nodes} nodes")
        groups = num_groups
    else:
        groups = num_groups
    phy2log, _, logcnt = rebalance_experts(problem.load, P, groups, nodes, G)
    hierarchical = groups % nodes == 0 and nodes > 1
    return placement_from_phy2log(phy2log, E, G, "eplb", {
        "redundant_experts": R, "num_groups": groups, "nodes": nodes,
        "mode": "hierarchical" if hierarchical else "global", "max_replicas": int(logcnt.max())})
