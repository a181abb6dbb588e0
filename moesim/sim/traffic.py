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

Tokens are counted in chunks of 8k or more (:func:`layer_traffic`), each as whole [choice, token] arrays, so a
chunk's temporaries stay in cache; the flags (repeated rank, repeated node, no expert) are narrow-integer
comparisons, and each (token, choice) gets one int64 key for one ``bincount`` (int64 because ``bincount``
converts narrower ones slowly). With one copy of every expert the key is (source, expert, flags): a choice's
destination and node follow from its expert, so copies, per-expert pairs and node copies come out of one count
(:func:`_single_chunk`); with replicas the key is (source, destination) with a spare rank for choices that send
nothing (:func:`_count_chunk`).
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
    missing: bool  # some choices send nothing (no expert, or an unplaced one); single copies: checked per chunk
    gpus: np.ndarray
    table: np.ndarray | None  # single copies: each expert's rank, then -1 for "no expert" (see _rank_table)
    gpus_per_node: int | None
    node_of_rank: np.ndarray | None  # each rank's node, then -1 for "none" (when tp divides gpus_per_node)


def _chunk_ranks(c: _Counting, experts: np.ndarray, token_ids: np.ndarray,
                 replica_ranks: np.ndarray | None) -> np.ndarray:
    """[K, n] serving rank of each choice of the tokens ``experts`` [n, K] (-1: none)."""
    if replica_ranks is not None:  # chosen by another rule (moesim.sim.replicas)
        return np.asarray(replica_ranks)
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
    """Replicated experts (or ranks another rule chose): copies per (src, dst) pair in ``G`` rows of ``G + tp``
    bins, token-expert pairs per (rank, expert) bin and copies per (src, node) in ``G`` rows of ``nodes + 1``
    bins, of the tokens ``experts`` [n, K] (-1 = none).

    A choice that sends nothing (no expert, or a rank or node an earlier choice of the token already reached)
    takes the spare rank R (node N), whose bins in each source row are dropped afterwards: the mask is applied
    to the narrow rank array, and the int64 keys are built in one addition. Whole [K, n] arrays per numpy call:
    the calls, not the bytes, cost most at this size."""
    G, tp, E = c.G, c.tp, c.E
    R = G // tp
    ranks = _chunk_ranks(c, experts, token_ids, replica_ranks)
    none = ranks < 0 if c.missing else None
    drop = _repeats(ranks) if c.dedup else None
    if none is not None:
        drop = none if drop is None else drop | none
    lane = home % tp
    sent = ranks if drop is None else np.where(drop, ranks.dtype.type(R), ranks)  # R: the spare rank
    # flat (src, dst) of the copy for rank r: src * (G + tp) + r * tp + lane; the spare rank lands on bins >= G
    keys = np.add(home * (G + tp) + lane, sent * tp if tp > 1 else sent, dtype=np.int64)
    copies = np.bincount(keys.ravel(), minlength=G * (G + tp))
    # the rank computing a (token, expert) pair depends on the token
    per_bin = np.bincount(np.where(ranks >= 0, ranks * np.int64(E) + experts.T, R * E).ravel(), minlength=R * E + 1)
    if c.gpus_per_node is None:
        return copies, per_bin, None
    N = -(-G // c.gpus_per_node)  # one copy per (token, destination node)
    if c.node_of_rank is not None:
        nodes = c.node_of_rank.take(ranks)  # rank -1 takes the last entry, -1
    else:
        nodes = (ranks * np.int64(tp) + lane) // c.gpus_per_node
    drop = _repeats(nodes)
    if none is not None:
        drop |= none
    nodes = np.where(drop, nodes.dtype.type(N), nodes)  # N: the spare node
    node_keys = np.add(home * (N + 1), nodes, dtype=np.int64)
    return copies, per_bin, np.bincount(node_keys.ravel(), minlength=G * (N + 1))


def _flag(mask: np.ndarray) -> np.ndarray:
    """A bool mask as 0/1 int8 (no copy), to add to narrow integers without a wide temporary."""
    return mask.view(np.int8)


def _single_chunk(c: _Counting, experts: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Single copies: per (source GPU, expert + 1, sends a copy, first choice of the token on its node) bin,
    how many (token, choice) of the tokens ``experts`` [n, K] fall in it (expert 0: no expert).

    The flags come from the ranks; a choice's destination GPU and node are functions of its expert and source,
    so one bincount over (source, expert, flags) keys counts copies, per-expert pairs and node copies at once,
    and the keys are built in int16 but for one addition."""
    assert c.table is not None
    E = c.E
    ex = np.ascontiguousarray(experts.T)  # [K, n]; one pass over the (strided) layer of the trace
    ranks = c.table.take(ex)  # expert -1 takes the last entry, -1
    unplaced = ranks < 0  # no expert, or an unplaced one
    none = unplaced if unplaced.any() else None
    code = ex + ex.dtype.type(1)
    code <<= 2
    silent = _repeats(ranks) if c.dedup else None  # sends no copy: a repeated rank, or no rank at all
    if none is not None:
        silent = none if silent is None else silent | none
    code += 2 if silent is None else _flag(~silent) << 1
    if c.gpus_per_node is not None:
        rpn = c.gpus_per_node // c.tp  # ranks per node, when tp divides gpus_per_node
        if c.node_of_rank is not None and rpn & (rpn - 1) == 0:
            nodes = ranks >> (rpn.bit_length() - 1)  # rank -1 stays -1
        elif c.node_of_rank is not None:
            nodes = c.node_of_rank.take(ranks)
        else:
            nodes = (ranks * np.int64(c.tp) + home % c.tp) // c.gpus_per_node
        again = _repeats(nodes)
        code += _flag(~(again if none is None else again | none))
    keys = np.add(home * (4 * (E + 1)), code, dtype=np.int64)
    return np.bincount(keys.ravel(), minlength=c.G * 4 * (E + 1))


def _single_traffic(c: _Counting, experts: np.ndarray, home: np.ndarray, chunk: int) -> LayerTraffic:
    """:func:`layer_traffic` with one copy of every expert (:func:`_single_chunk`'s bins, summed over chunks)."""
    G, tp, E = c.G, c.tp, c.E
    R = G // tp
    narrow = np.int16 if 4 * (E + 1) < 2**15 else np.int64
    bins = np.zeros(G * 4 * (E + 1), dtype=np.int64)
    for a in range(0, experts.shape[0], chunk):
        bins += _single_chunk(c, experts[a : a + chunk].astype(narrow, copy=False), home[a : a + chunk])
    b = bins.reshape(G, E + 1, 4)[:, 1:, :]  # [source, expert, flags]
    rank = c.gpus[:, 0].astype(np.int64)
    placed = np.flatnonzero(rank >= 0)
    src = np.arange(G)[:, None]
    dst = rank[placed][None, :] * tp + src % tp  # [G, placed]: each choice's destination GPU
    sends = b[:, placed, 2] + b[:, placed, 3]
    copies = np.bincount((src * G + dst).ravel(), weights=sends.ravel(), minlength=G * G)
    pairs = b.sum(axis=(0, 2))
    expert_tokens = np.zeros(R * E, dtype=np.int64)
    expert_tokens[rank[placed] * E + placed] = pairs[placed]
    node_copies = None
    if c.gpus_per_node is not None:
        N = -(-G // c.gpus_per_node)
        firsts = b[:, placed, 1] + b[:, placed, 3]
        node_copies = np.bincount((src * N + dst // c.gpus_per_node).ravel(), weights=firsts.ravel(),
                                  minlength=G * N).round().astype(np.int64).reshape(G, N)
    pair_copies = copies.round().astype(np.int64).reshape(G, G)
    return LayerTraffic(copies=pair_copies, expert_tokens=expert_tokens.reshape(R, E),
                        recv_copies=pair_copies.sum(axis=0), node_copies=node_copies)


_CHUNK = 1 << 13  # tokens counted at once: a chunk's [K, n] int64 keys (512 KiB at top-8) stay in cache


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
    missing = table is not None or bool(experts.min(initial=0) < 0 or gpus[:, 0].min(initial=0) < 0
                                        or (replica_ranks is not None and np.min(replica_ranks, initial=0) < 0))
    node_of_rank = None  # a rank's GPUs share a node when tp divides gpus_per_node
    if gpus_per_node is not None and gpus_per_node % tp == 0:
        node_of_rank = np.append(np.arange(R) // (gpus_per_node // tp), -1).astype(small)
    spec = _Counting(G, tp, E, dedup, missing, gpus, table, gpus_per_node, node_of_rank)
    if table is not None:
        return _single_traffic(spec, experts, home, max(_CHUNK, (4 * G * (E + 1)) // 8))
    N = 0 if gpus_per_node is None else -(-G // gpus_per_node)
    copies = np.zeros(G * (G + tp), dtype=np.int64)
    per_bin = np.zeros(R * E + 1, dtype=np.int64)
    node_pairs = None if gpus_per_node is None else np.zeros(G * (N + 1), dtype=np.int64)
    chunk = max(_CHUNK, (G * G) // 8)  # a chunk's keys outnumber the bins they are counted in
    for a in range(0, experts.shape[0], chunk):
        part = slice(a, a + chunk)
        got = _count_chunk(spec, experts[part], home[part], token_ids[part],
                           None if replica_ranks is None else replica_ranks[:, part])
        copies += got[0]
        per_bin += got[1]
        if node_pairs is not None and got[2] is not None:
            node_pairs += got[2]
    pair_copies = np.ascontiguousarray(copies.reshape(G, G + tp)[:, :G])
    node_copies = None if node_pairs is None else np.ascontiguousarray(node_pairs.reshape(G, N + 1)[:, :N])
    return LayerTraffic(copies=pair_copies, expert_tokens=per_bin[:-1].reshape(R, E),
                        recv_copies=pair_copies.sum(axis=0), node_copies=node_copies)


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
