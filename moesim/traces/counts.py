"""Routing counts of an expert-id array ``experts[token, layer, choice]`` (-1 = no expert), the one place
they are computed (trace statistics, the fitted generator and the placement optimisers' profiles all use
these):

- picks per (layer, expert) [L, E];
- co-activations: same-token, same-layer pairs of picks (ordered, distinct choices) [L, E, E];
- transitions: a token's every pick at layer l with every pick at layer l+1 [L-1, E, E] (MoETuner's R);
- picks per (window, layer, expert) [W, L, E], for a window id per token.

Every count is accumulated over blocks of tokens (a bounded number of index entries per numpy call), so a
memory-mapped array of any length is read once, block by block, and never copied whole; ``progress(n)``, when
given, is told of the ``n`` tokens of each block counted. Counts are int64.
Ignored: gate weights (every pick counts one), the order of the top-k picks, and token order.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

Progress = Callable[[int], object]  # told of the tokens of each block counted

_PAIR_BLOCK = 1 << 22  # pair indices built per numpy call


def _blocks(total: int, per_token: int, progress: Progress | None = None) -> Iterator[slice]:
    """Slices of tokens to count at once; ``progress`` is told of each when the next is asked for (counted)."""
    step = max(1, _PAIR_BLOCK // max(per_token, 1))
    for a in range(0, total, step):
        blk = slice(a, min(a + step, total))
        yield blk
        if progress is not None:
            progress(blk.stop - blk.start)


def count_picks(experts: np.ndarray, num_experts: int, progress: Progress | None = None) -> np.ndarray:
    """Picks per (layer, expert): int64 [L, E]; -1 (no expert) is not counted."""
    T, L, K = experts.shape
    E = num_experts
    out = np.zeros(L * E, dtype=np.int64)
    offset = (np.arange(L, dtype=np.int64) * E)[None, :, None]
    for blk in _blocks(T, L * K, progress):
        ex = np.asarray(experts[blk], dtype=np.int64)
        flat = (ex + offset)[ex >= 0]
        out += np.bincount(flat, minlength=L * E)
    return out.reshape(L, E)


def count_coactivations(experts: np.ndarray, num_experts: int, progress: Progress | None = None) -> np.ndarray:
    """Same-token, same-layer pairs of picks at distinct choices: int64 [L, E, E], symmetric (zero diagonal
    unless a token picks one expert twice)."""
    T, L, K = experts.shape
    E = num_experts
    out = np.zeros(L * E * E, dtype=np.int64)
    offset = (np.arange(L, dtype=np.int64) * E * E)[None, :, None, None]
    off_diag = ~np.eye(K, dtype=bool)
    for blk in _blocks(T, L * K * K, progress):
        ex = np.asarray(experts[blk], dtype=np.int64)
        a, b = ex[:, :, :, None], ex[:, :, None, :]
        keep = (a >= 0) & (b >= 0) & off_diag
        out += np.bincount((offset + a * E + b)[keep], minlength=L * E * E)
    return out.reshape(L, E, E)


def count_transitions(experts: np.ndarray, num_experts: int, progress: Progress | None = None) -> np.ndarray:
    """Adjacent-layer pairs of one token, every pick at l with every pick at l+1: int64 [L-1, E, E]."""
    T, L, K = experts.shape
    E = num_experts
    if L < 2:
        if progress is not None:
            progress(T)
        return np.zeros((0, E, E), dtype=np.int64)
    out = np.zeros((L - 1) * E * E, dtype=np.int64)
    offset = (np.arange(L - 1, dtype=np.int64) * E * E)[None, :, None, None]
    for blk in _blocks(T, (L - 1) * K * K, progress):
        ex = np.asarray(experts[blk], dtype=np.int64)
        a, b = ex[:, :-1, :, None], ex[:, 1:, None, :]
        keep = (a >= 0) & (b >= 0)
        out += np.bincount((offset + a * E + b)[keep], minlength=(L - 1) * E * E)
    return out.reshape(L - 1, E, E)


def count_window_picks(experts: np.ndarray, num_experts: int, windows: np.ndarray,
                       progress: Progress | None = None) -> np.ndarray:
    """Picks per (window, layer, expert): int64 [W, L, E], ``windows`` int64 [T] holding each token's
    window (W = the largest + 1)."""
    T, L, K = experts.shape
    E = num_experts
    W = int(windows.max()) + 1 if windows.size else 0
    out = np.zeros(W * L * E, dtype=np.int64)
    lay = (np.arange(L, dtype=np.int64) * E)[None, :, None]
    for blk in _blocks(T, L * K, progress):
        ex = np.asarray(experts[blk], dtype=np.int64)
        idx = ex + lay + (windows[blk] * (L * E))[:, None, None]
        out += np.bincount(idx[ex >= 0], minlength=W * L * E)
    return out.reshape(W, L, E)
