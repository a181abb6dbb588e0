"""Routing statistics of a profiling window, in numpy: what the placement optimisers are fed.

From expert ids ``experts[token, layer, choice]`` (-1 = no expert):

- ``expert_loads``: ``load[l, e]``, token-expert pairs per expert and layer;
- ``transition_counts``: ``R[l, e, f]``, for l < L-1, the number of (token, choice at l, choice at l+1) with
  expert e at layer l and expert f at layer l+1 (MoETuner's inter-layer routing dependency); a token
  with top-k at both layers adds k x k pairs, which is the traffic of a context-coherent transfer before
  de-duplication per GPU pair;
- ``coactivation_counts``: ``C[l, e, f]``, tokens that pick both e and f in layer l (e != f; symmetric).

Counting is chunked over tokens so memory stays bounded for large windows (DeepSeek-V3: 256 experts,
top-8). Deliberately ignored: gate weights (every pick counts one) and token order.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 16  # tokens per bincount pass


def expert_loads(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts] token-expert pairs per expert, as float."""
    T, L, _ = experts.shape
    E = num_experts
    ex = experts.astype(np.int64)
    valid = ex >= 0
    flat = (ex + (np.arange(L) * E)[None, :, None])[valid]
    return np.bincount(flat, minlength=L * E).reshape(L, E).astype(float)


def _pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int, *, skip_same: bool) -> np.ndarray:
    """Counts of (a[t, i], b[t, j]) over tokens and choices; -1 entries skipped."""
    E = num_experts
    out = np.zeros(E * E + 1, dtype=np.int64)
    for s in range(0, a.shape[0], _CHUNK):
        x = a[s : s + _CHUNK].astype(np.int32)
        y = b[s : s + _CHUNK].astype(np.int32)
        idx = x[:, :, None] * np.int32(E) + y[:, None, :]
        ok = None
        if (x < 0).any() or (y < 0).any():
            ok = (x[:, :, None] >= 0) & (y[:, None, :] >= 0)
        if skip_same:
            same = x[:, :, None] == y[:, None, :]
            ok = ~same if ok is None else ok & ~same
        if ok is not None:
            idx = np.where(ok, idx, np.int32(E * E))
        out += np.bincount(idx.ravel(), minlength=E * E + 1)
    return out[:-1].reshape(E, E).astype(float)


def transition_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers - 1, experts, experts]: picks of e at layer l followed by picks of f at layer l + 1."""
    L = experts.shape[1]
    out = np.zeros((max(L - 1, 0), num_experts, num_experts))
    for l in range(L - 1):
        out[l] = _pair_counts(experts[:, l, :], experts[:, l + 1, :], num_experts, skip_same=False)
    return out


def coactivation_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts, experts]: tokens picking both e and f in one layer (zero diagonal)."""
    L = experts.shape[1]
    out = np.zeros((L, num_experts, num_experts))
    for l in range(L):
        out[l] = _pair_counts(experts[:, l, :], experts[:, l, :], num_experts, skip_same=True)
    return out
