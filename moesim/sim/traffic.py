"""Token bookkeeping for one MoE layer, in numpy: who sends how many token copies where.

A token lives on its home GPU h; EP rank r is GPUs ``r*tp .. r*tp+tp-1``; a copy for rank r goes to
the GPU of rank r in the same TP lane (``h % tp``). With ``dedup`` a token sends one copy per destination
rank (DeepEP and optimised kernels); otherwise one per (token, expert) (a naive ``all_to_all``). Among an
expert's replicas the token index picks one (vLLM's pseudo-random rule), unless the caller passes the
ranks another rule chose (``replica_ranks``, :mod:`moesim.sim.replicas`).

Hierarchical all-to-all (DeepEP normal kernels, Tutel 2DH): a token bound for another node crosses the
network once per destination node, to the GPU of that node with the sender's local rank, which forwards
it over NVLink to each destination GPU there (:func:`hierarchical_bytes`). ``gpus_per_node`` asks
:func:`layer_traffic` for the per-node copy counts this needs.

Arrays are handled one top-k choice at a time ([choice, token] rows), which keeps numpy's temporaries
small and contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerTraffic:
    copies: np.ndarray  # [G, G] token copies dispatched from GPU s to GPU d (combine is the transpose)
    expert_tokens: np.ndarray  # [ranks, experts] token-expert pairs each EP rank computes
    recv_copies: np.ndarray  # [G] copies each GPU receives in dispatch
    node_copies: np.ndarray | None = None  # [G, nodes] tokens from GPU s with a destination on each node


def replica_lookup(gpus: np.ndarray, experts: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """EP rank serving each (token, choice): ``gpus[e, replica]`` table, -1 padded; -1 where no expert.

    ``token_ids`` broadcasts against ``experts`` (e.g. [T] ids with [choices, T] experts).
    """
    small = np.int16 if gpus.max(initial=0) < 2**15 else gpus.dtype  # narrow ranks: cheaper to compare
    table = np.vstack([gpus, np.full((1, gpus.shape[1]), -1)]).astype(small)  # row -1: no expert
    if gpus.shape[1] == 1:
        return table[:, 0][experts]
    replicas = np.append((gpus >= 0).sum(axis=1), 1)
    return table[experts, token_ids % replicas[experts]]


def layer_traffic(experts: np.ndarray, home: np.ndarray, token_ids: np.ndarray, gpus: np.ndarray, *,
                  num_gpus: int, tp: int, num_experts: int, dedup: bool,
                  gpus_per_node: int | None = None, replica_ranks: np.ndarray | None = None) -> LayerTraffic:
    """``experts`` [T, K] of one layer for the tokens of one batch; ``gpus`` [E, R] the layer's placement.

    With ``gpus_per_node`` also count, per source GPU and node, the tokens with at least one destination
    GPU on that node (one network copy each in a hierarchical all-to-all)."""
    G, R, E = num_gpus, num_gpus // tp, num_experts
    # [K, T]; a contiguous copy first (one pass over a possibly strided trace), then an in-cache transpose
    choices = np.ascontiguousarray(np.ascontiguousarray(experts).T)
    token_ids = np.asarray(token_ids)
    home = np.asarray(home, dtype=np.int64)
    pair_of_rank0 = (home * G + home % tp).astype(np.int32)  # flat (src, dst) of the copy for rank 0; rank r adds r*tp
    copies = np.zeros(G * G + 1, dtype=np.int64)  # the last bin collects what is not sent
    replicated = gpus.shape[1] > 1
    expert_tokens = np.zeros(R * E + 1, dtype=np.int64)  # replicated: by (rank, expert); the last bin: no expert
    per_expert = np.zeros(E + 1, dtype=np.int64)  # single copies: by expert, "no expert" (-1) in bin 0
    ranks: list[np.ndarray] = []
    nodes: list[np.ndarray] = []
    if gpus_per_node is not None:
        N = -(-G // gpus_per_node)
        node_pairs = np.zeros(G * N + 1, dtype=np.int64)
        home_node_row = home * N
        lane = home % tp
    for j in range(choices.shape[0]):
        # replica_ranks [K, T]: the serving rank chosen by another rule (moesim.sim.replicas)
        rank = replica_lookup(gpus, choices[j], token_ids) if replica_ranks is None else replica_ranks[j]
        send = rank >= 0
        if replicated:  # the rank computing a (token, expert) pair depends on the token
            expert_tokens += np.bincount(np.where(send, rank * np.int64(E) + choices[j], R * E), minlength=R * E + 1)
        else:
            per_expert += np.bincount(choices[j] + 1, minlength=E + 1)
        if dedup:  # one copy per destination rank: an earlier choice on the same rank already sent it
            for earlier in ranks:
                send &= rank != earlier
            ranks.append(rank)
        copies += np.bincount(np.where(send, pair_of_rank0 + rank * np.int32(tp), np.int32(G * G)),
                              minlength=G * G + 1)
        if gpus_per_node is not None:  # one copy per (token, destination node)
            node = (rank.astype(np.int64) * tp + lane) // gpus_per_node
            first = rank >= 0
            for earlier in nodes:
                first &= node != earlier
            nodes.append(np.where(rank >= 0, node, -1))
            node_pairs += np.bincount(np.where(first, home_node_row + node, G * N), minlength=G * N + 1)
    if not replicated:  # each expert's single rank computes all its pairs
        placed = np.flatnonzero(gpus[:, 0] >= 0)
        expert_tokens[gpus[placed, 0] * np.int64(E) + placed] = per_expert[1:][placed]
    pair_copies = copies[:-1].reshape(G, G)
    return LayerTraffic(copies=pair_copies, expert_tokens=expert_tokens[:-1].reshape(R, E),
                        recv_copies=pair_copies.sum(axis=0),
                        node_copies=None if gpus_per_node is None else node_pairs[:-1].reshape(G, N))


def hierarchical_bytes(copies: np.ndarray, node_copies: np.ndarray, gpus_per_node: int,
                       bytes_per_copy: float) -> np.ndarray:
    """[G, G] bytes each GPU sends in a hierarchical all-to-all (dispatch direction; combine is the transpose).

    GPU s sends a token once to each other node n that holds one of its destinations, to its rail peer
    ``n * gpus_per_node + s % gpus_per_node`` (``node_copies[s, n]`` copies); the peer forwards it over
    NVLink to every destination GPU on n but itself (``copies[s, d]``). Destinations on s's own node get
    it from s directly. Both stages run at once, as in DeepEP's pipelined kernels.
    """
    G = copies.shape[0]
    gpn = gpus_per_node
    src, dst = np.nonzero(copies)
    via = (dst // gpn) * gpn + src % gpn  # the rail peer on the destination node (s itself on its own node)
    out = np.bincount(via * G + dst, weights=copies[src, dst] * bytes_per_copy, minlength=G * G).reshape(G, G)
    out[np.arange(G), np.arange(G)] = copies.diagonal() * bytes_per_copy  # a GPU's copies to itself stay local
    s_idx, n_idx = np.nonzero(node_copies)
    remote = n_idx != s_idx // gpn
    s_idx, n_idx = s_idx[remote], n_idx[remote]
    peer = n_idx * gpn + s_idx % gpn
    out[s_idx, peer] += node_copies[s_idx, n_idx] * bytes_per_copy
    return out


def _multi_hot(ranks: np.ndarray, num_ranks: int, clip: bool) -> np.ndarray:
    """[T, ranks] float: how many of each token's choices (rows of ``ranks`` [K, T], -1 = none) sit on each
    rank; with ``clip`` at most 1 (the token is there or not)."""
    K, T = ranks.shape
    flat = np.where(ranks >= 0, np.arange(T, dtype=np.int64)[None, :] * num_ranks + ranks, T * num_ranks)
    hot = np.bincount(flat.ravel(), minlength=T * num_ranks + 1)[:-1].reshape(T, num_ranks)
    return (np.minimum(hot, 1) if clip else hot).astype(float)


def coherent_traffic(prev_experts: np.ndarray, experts: np.ndarray, home: np.ndarray, token_ids: np.ndarray,
                     prev_gpus: np.ndarray, gpus: np.ndarray, *, num_gpus: int, tp: int,
                     dedup: bool) -> tuple[np.ndarray, np.ndarray]:
    """The context-coherent transfer into a layer (ExFlow): ``(copies [G, G], resident [G])``.

    After layer l-1 a token lives on the GPUs of its layer-(l-1) experts (in its TP lane ``home % tp``)
    and goes from there straight to the GPUs of its layer-l experts: one copy per distinct (source rank,
    destination rank) with ``dedup``, else one per (choice at l-1, choice at l). ``resident[g]`` counts
    the tokens GPU g holds at the start of layer l (they run the layer's attention there). Replicas are
    picked by token index (the default rule). ``prev_experts``/``experts`` are [T, K] of one batch.
    """
    G, R = num_gpus, num_gpus // tp
    home = np.asarray(home, dtype=np.int64)
    token_ids = np.asarray(token_ids)
    lane = home % tp

    def ranks(ex: np.ndarray, table: np.ndarray) -> np.ndarray:
        choices = np.ascontiguousarray(np.asarray(ex).T)
        return np.stack([replica_lookup(table, choices[j], token_ids) for j in range(choices.shape[0])]
                        ).astype(np.int64)

    src, dst = ranks(prev_experts, prev_gpus), ranks(experts, gpus)
    copies = np.zeros((G, G))
    resident = np.zeros(G)
    chunk = 1 << 15
    for ln in range(tp):
        sel = np.flatnonzero(lane == ln)
        for a in range(0, sel.size, chunk):
            part = sel[a : a + chunk]
            s_hot = _multi_hot(src[:, part], R, dedup)
            d_hot = _multi_hot(dst[:, part], R, dedup)
            copies[ln::tp, ln::tp] += s_hot.T @ d_hot  # GPU of rank r in lane ln: r * tp + ln
            resident[ln::tp] += (s_hot > 0).sum(axis=0)
    return np.rint(copies).astype(np.int64), resident
