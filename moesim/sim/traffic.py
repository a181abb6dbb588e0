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

Tokens are counted in chunks of 32k (:func:`layer_traffic`), each as whole [choice, token] arrays: every
(token, choice) gets one int64 key, and one ``bincount`` per chunk counts the copies (numpy's per-call cost,
not the bytes, dominates at this size; int64 keys because ``bincount`` converts narrower ones slowly). The
chunks keep temporaries in cache and below the size numpy's allocator maps fresh from the OS.
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


def _rank_table(gpus: np.ndarray) -> np.ndarray:
    """The EP rank of each expert (-1 unplaced), with a last entry for "no expert" (index -1): -1."""
    return np.append(gpus[:, 0], -1).astype(np.int64)


@dataclass(frozen=True)
class _Counting:
    """What :func:`_count_chunk` needs besides the tokens: the layer's shape and rules."""

    G: int
    tp: int
    E: int
    dedup: bool
    missing: bool  # some choices send nothing (no expert, or an unplaced one)
    gpus: np.ndarray
    table: np.ndarray | None  # single copies: each expert's rank, then -1 for "no expert" (see _rank_table)
    gpus_per_node: int | None
    node_of_rank: np.ndarray | None  # each rank's node, then -1 for "none" (when tp divides gpus_per_node)


def _chunk_ranks(c: _Counting, experts: np.ndarray, token_ids: np.ndarray,
                 replica_ranks: np.ndarray | None) -> np.ndarray:
    """[K, n] serving rank of each choice of the tokens ``experts`` [n, K] (-1: none)."""
    if replica_ranks is not None:  # chosen by another rule (moesim.sim.replicas)
        return np.asarray(replica_ranks)
    if c.table is not None:
        return c.table.take(experts.T)
    choices = np.ascontiguousarray(experts.T)
    return np.stack([replica_lookup(c.gpus, choices[j], token_ids) for j in range(choices.shape[0])])


def _repeats(values: np.ndarray) -> np.ndarray:
    """[K, n] mask: where row j of ``values`` repeats an earlier row (an earlier choice of the same token)."""
    dup = np.zeros(values.shape, dtype=bool)
    for j in range(1, values.shape[0]):
        for i in range(j):
            dup[j] |= values[j] == values[i]
    return dup


def _count_chunk(c: _Counting, experts: np.ndarray, home: np.ndarray, token_ids: np.ndarray,
                 replica_ranks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Copies per flat (src, dst) pair, token-expert pairs per (rank, expert) bin (or, with single copies,
    per expert + 1) and copies per (src, node) of the tokens ``experts`` [n, K] (-1 = none).

    Every (token, choice) gets one int64 key (``home * G + destination GPU``); a choice that sends nothing
    (no expert, or a rank or node an earlier choice of the token already reached) gets the spare last bin.
    Whole [K, n] arrays per numpy call: the calls, not the bytes, cost most at this size."""
    G, tp, E = c.G, c.tp, c.E
    ranks = _chunk_ranks(c, experts, token_ids, replica_ranks)
    none = ranks < 0 if c.missing else None
    base = home * G + home % tp  # flat (src, dst) of the copy for rank 0; rank r adds r*tp
    keys = np.add(base, ranks * tp if tp > 1 else ranks, dtype=np.int64)
    drop = _repeats(ranks) if c.dedup else None
    if none is not None:
        drop = none if drop is None else drop | none
    if drop is not None:
        np.copyto(keys, G * G, where=drop)
    copies = np.bincount(keys.ravel(), minlength=G * G + 1)
    if c.table is not None:
        per_bin = np.bincount(np.add(experts, 1, dtype=np.int64).ravel(), minlength=E + 1)
    else:  # replicated: the rank computing a (token, expert) pair depends on the token
        per_bin = np.bincount(np.where(ranks >= 0, ranks * np.int64(E) + experts.T, (G // tp) * E).ravel(),
                              minlength=(G // tp) * E + 1)
    if c.gpus_per_node is None:
        return copies, per_bin, None
    N = -(-G // c.gpus_per_node)  # one copy per (token, destination node)
    if c.node_of_rank is not None:
        nodes = c.node_of_rank.take(ranks)  # rank -1 takes the last entry, -1
    else:
        nodes = (ranks * np.int64(tp) + home % tp) // c.gpus_per_node
    node_keys = np.add(home * N, nodes, dtype=np.int64)
    drop = _repeats(nodes)
    if none is not None:
        drop |= none
    np.copyto(node_keys, G * N, where=drop)
    return copies, per_bin, np.bincount(node_keys.ravel(), minlength=G * N + 1)


_CHUNK = 1 << 15  # tokens counted at once: the keys stay in cache, and no allocation is large enough to be mmapped


def layer_traffic(experts: np.ndarray, home: np.ndarray, token_ids: np.ndarray, gpus: np.ndarray, *,
                  num_gpus: int, tp: int, num_experts: int, dedup: bool,
                  gpus_per_node: int | None = None, replica_ranks: np.ndarray | None = None) -> LayerTraffic:
    """``experts`` [T, K] of one layer for the tokens of one batch; ``gpus`` [E, R] the layer's placement.

    With ``gpus_per_node`` also count, per source GPU and node, the tokens with at least one destination
    GPU on that node (one network copy each in a hierarchical all-to-all). Tokens are counted in chunks
    (:func:`_count_chunk`), whose counts add up."""
    G, R, E = num_gpus, num_gpus // tp, num_experts
    experts = np.asarray(experts)
    token_ids = np.asarray(token_ids)
    home = np.asarray(home, dtype=np.int64)
    replicated = gpus.shape[1] > 1
    small = np.int16 if G < 2**15 else np.int64  # ranks and nodes: narrow ones compare faster
    table = None if replicated or replica_ranks is not None else _rank_table(gpus).astype(small)
    missing = bool(experts.min(initial=0) < 0 or gpus[:, 0].min(initial=0) < 0
                   or (replica_ranks is not None and np.min(replica_ranks, initial=0) < 0))
    node_of_rank = None  # a rank's GPUs share a node when tp divides gpus_per_node
    if gpus_per_node is not None and gpus_per_node % tp == 0:
        node_of_rank = np.append(np.arange(R) // (gpus_per_node // tp), -1).astype(small)
    spec = _Counting(G, tp, E, dedup, missing, gpus, table, gpus_per_node, node_of_rank)
    copies = np.zeros(G * G + 1, dtype=np.int64)
    per_bin = np.zeros(E + 1 if table is not None else R * E + 1, dtype=np.int64)
    node_pairs = None if gpus_per_node is None else np.zeros(G * -(-G // gpus_per_node) + 1, dtype=np.int64)
    chunk = max(_CHUNK, (G * G) // 8)  # a chunk's keys outnumber the bins they are counted in
    for a in range(0, experts.shape[0], chunk):
        part = slice(a, a + chunk)
        got = _count_chunk(spec, experts[part], home[part], token_ids[part],
                           None if replica_ranks is None else replica_ranks[:, part])
        copies += got[0]
        per_bin += got[1]
        if node_pairs is not None and got[2] is not None:
            node_pairs += got[2]
    if table is not None:  # each expert's single rank computes all its pairs
        expert_tokens = np.zeros(R * E, dtype=np.int64)
        placed = np.flatnonzero(gpus[:, 0] >= 0)
        expert_tokens[gpus[placed, 0] * np.int64(E) + placed] = per_bin[1:][placed]
    else:
        expert_tokens = per_bin[:-1]
    pair_copies = copies[:-1].reshape(G, G)
    return LayerTraffic(copies=pair_copies, expert_tokens=expert_tokens.reshape(R, E),
                        recv_copies=pair_copies.sum(axis=0),
                        node_copies=None if node_pairs is None else node_pairs[:-1].reshape(G, -1))


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
