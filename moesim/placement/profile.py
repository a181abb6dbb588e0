"""Routing statistics of a profiling window, in numpy: what the placement optimisers are fed.

From expert ids ``experts[token, layer, choice]`` (-1 = no expert):

- ``expert_loads``: ``load[l, e]``, token-expert pairs per expert and layer;
- ``transition_counts``: ``R[l, e, f]``, for l < L-1, the number of (token, choice at l, choice at l+1) with
  expert e at layer l and expert f at layer l+1 (MoETuner's inter-layer routing dependency); a token
  with top-k at both layers adds k x k pairs, which is the traffic of a context-coherent transfer before
  de-duplication per GPU pair;
- ``coactivation_counts``: ``C[l, e, f]``, tokens that pick both e and f in layer l (e != f; symmetric).

The counting is :mod:`moesim.traces.counts` (the same numbers as the trace statistics), returned as float;
it is chunked over tokens so memory stays bounded for large windows (DeepSeek-V3: 256 experts, top-8).
Deliberately ignored: gate weights (every pick counts one) and token order.
"""

from __future__ import annotations

import numpy as np

from moesim.traces.counts import count_coactivations, count_picks, count_transitions


def expert_loads(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts] token-expert pairs per expert, as float."""
    return count_picks(experts, num_experts).astype(float)


def transition_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers - 1, experts, experts]: picks of e at layer l followed by picks of f at layer l + 1."""
    return count_transitions(experts, num_experts).astype(float)


def coactivation_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts, experts]: tokens picking both e and f in one layer (zero diagonal)."""
    out = count_coactivations(experts, num_experts).astype(float)
    same = np.arange(num_experts)
    out[:, same, same] = 0.0  # a token that picks e twice pairs e with itself: not a pair of two experts
    return out
