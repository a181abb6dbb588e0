"""Token bookkeeping for one MoE layer, in numpy: who sends how many token copies where.

A token lives on its home GPU h; EP rank r is GPUs ``r*tp .. r*tp+tp-1``; a copy for rank r goes to
the GPU of rank r in the same TP lane (``h % tp``). With ``dedup`` a token sends one copy per destination
rank (DeepEP and optimised kernels); otherwise one per (token, expert) (a naive ``all_to_all``). Among an
expert's replicas the token index picks one (vLLM's pseudo-random rule).
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
    """EP rank serving each (token, choice): ``gpus[e, replica]`` table, -1 padded; -1 where no expert."""
    valid = experts >= 0
    e = np.where(valid, experts, 0)
    if gpus.shape[1] == 1:
        rank = gpus[e, 0]
    else:
        n = (gpus >= 0).sum(axis=1)
        pick = token_ids[:, None] % n[e]
        rank = gpus[e, pick]
    return np.where(valid, rank, -1)


def layer_traffic(experts: np.ndarray, home: np.ndarray, token_ids: np.ndarray, gpus: np.ndarray, *,
                  num_gpus: int, tp: int, num_experts: int, dedup: bool) -> LayerTraffic:
    """``experts`` [T, K] of one layer for the tokens of one batch; ``gpus`` [E, R] the layer's placement."""
    G, R = num_gpus, num_gpus // tp
    rank = replica_lookup(gpus, experts, token_ids)  # [T, K]
    valid = rank >= 0
    if dedup:
        srt = np.sort(rank, axis=1)
        first = np.ones_like(srt, dtype=bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        send = first & (srt >= 0)
        dst_rank = srt
    else:
        send = valid
        dst_rank = rank
    src = np.broadcast_to(home[:, None], dst_rank.shape)
    dst = dst_rank * tp + (src % tp)
    copies = np.bincount((src[send] * G + dst[send]).astype(np.int64), minlength=G * G).reshape(G, G)
    e = experts[valid].astype(np.int64)
    expert_tokens = np.bincount(rank[valid].astype(np.int64) * num_experts + e,
                                minlength=R * num_experts).reshape(R, num_experts)
    return LayerTraffic(copies=copies, expert_tokens=expert_tokens, recv_copies=copies.sum(axis=0))
