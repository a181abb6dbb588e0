"""Token bookkeeping for one MoE layer, in numpy: who sends how many token copies where.

A token lives on its home GPU h; EP rank r is GPUs ``r*tp .. r*tp+tp-1``; a copy for rank r goes to
the GPU of rank r in the same TP lane (``h % tp``). With ``dedup`` a token sends one copy per destination
rank (DeepEP and optimised kernels); otherwise one per (token, expert) (a naive ``all_to_all``). Among an
expert's replicas the token index picks one (vLLM's pseudo-random rule).

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
                  num_gpus: int, tp: int, num_experts: int, dedup: bool) -> LayerTraffic:
    """``experts`` [T, K] of one layer for the tokens of one batch; ``gpus`` [E, R] the layer's placement."""
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
    for j in range(choices.shape[0]):
        rank = replica_lookup(gpus, choices[j], token_ids)
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
    if not replicated:  # each expert's single rank computes all its pairs
        placed = np.flatnonzero(gpus[:, 0] >= 0)
        expert_tokens[gpus[placed, 0] * np.int64(E) + placed] = per_expert[1:][placed]
    copies = copies[:-1].reshape(G, G)
    return LayerTraffic(copies=copies, expert_tokens=expert_tokens[:-1].reshape(R, E),
                        recv_copies=copies.sum(axis=0))
