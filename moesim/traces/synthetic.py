"""Synthetic routing traces with expert-popularity skew, per-GPU mix and cross-layer affinity.

The model, per MoE layer l:
- popularity: expert weights proportional to 1 / rank^zipf_alpha, ranks shuffled per layer;
- per-GPU mix: each home GPU sees the popularity tilted by a log-normal factor (sigma ``gpu_mix_sigma``),
  as when different requests land on different data-parallel ranks;
- cross-layer affinity: every expert e of layer l-1 has ``affinity_fanout`` preferred successors in
  layer l (drawn by popularity). A token's picks at layer l come from the mixture
  ``(1 - affinity) * popularity(home) + affinity * successors(its top-1 expert at l-1)``.
The top_k picks are drawn without replacement (successive sampling, i.e. Plackett-Luce), so the first
pick is the token's top-1 expert. Gate weights are the picks' popularity at the token's home, normalised
(a stand-in: the engine does not use weights).

Deliberately simple: no group-limited routing, no drift over batches, one state (the top-1 expert) carried
between layers. The trace-fitting issue extends this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.traces.format import Trace, TraceMeta

_MAX_REJECTION_ROUNDS = 200


@dataclass(frozen=True)
class SyntheticParams:
    zipf_alpha: float = 0.3
    gpu_mix_sigma: float = 0.3
    affinity: float = 0.5
    affinity_fanout: int = 4


class _AliasTable:
    """Walker/Vose alias tables for many categorical rows: O(1) vectorised draws."""

    def __init__(self, weights: np.ndarray) -> None:
        rows, n = weights.shape
        self.n = n
        self.prob = np.empty((rows, n))
        self.alias = np.empty((rows, n), dtype=np.int64)
        scaled = weights / weights.sum(axis=1, keepdims=True) * n
        for r in range(rows):
            p = scaled[r].tolist()
            prob, alias = [1.0] * n, list(range(n))
            small = [i for i, v in enumerate(p) if v < 1.0]
            large = [i for i, v in enumerate(p) if v >= 1.0]
            while small and large:
                s_, l_ = small.pop(), large[-1]
                prob[s_], alias[s_] = p[s_], l_
                p[l_] -= 1.0 - p[s_]
                if p[l_] < 1.0:
                    small.append(large.pop())
            self.prob[r], self.alias[r] = prob, alias
        self.prob = self.prob.ravel()
        self.alias = self.alias.ravel()

    def sample(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        col = (rng.random(rows.size) * self.n).astype(np.int64)
        np.minimum(col, self.n - 1, out=col)
        flat = rows * self.n + col
        keep = rng.random(rows.size) < self.prob[flat]
        return np.where(keep, col, self.alias[flat])


def _first_distinct(draw, num_tokens: int, k: int) -> np.ndarray:
    """The first ``k`` distinct values of each token's i.i.d. draw sequence: [num_tokens, k].

    Keeping the first k distinct values of i.i.d. draws is exactly successive sampling without replacement.
    """
    out = np.empty((num_tokens, k), dtype=np.int64)
    pending = np.arange(num_tokens)
    seq = np.empty((0, 0), dtype=np.int64)
    for _ in range(_MAX_REJECTION_ROUNDS):
        extra = draw(pending, k + 2)
        seq = extra if seq.shape[0] != pending.size or seq.size == 0 else np.concatenate([seq, extra], axis=1)
        m = seq.shape[1]
        first = np.ones(seq.shape, dtype=bool)
        for j in range(1, m):
            first[:, j] = ~(seq[:, :j] == seq[:, j : j + 1]).any(axis=1)
        count = np.cumsum(first, axis=1)
        done = count[:, -1] >= k
        sel = first[done] & (count[done] <= k)
        out[pending[done]] = seq[done][sel].reshape(-1, k)
        pending, seq = pending[~done], seq[~done]
        if pending.size == 0:
            return out
    raise ValueError("could not draw top_k distinct experts: raise affinity_fanout or lower affinity")


def generate_trace(
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_gpus: int,
    tokens_per_gpu: int,
    batches: int,
    params: SyntheticParams,
    rng: np.random.Generator,
    structure_rng: np.random.Generator | None = None,
    model: str = "",
) -> Trace:
    """Generate ``batches x num_gpus x tokens_per_gpu`` tokens.

    ``structure_rng`` draws the popularity ranks, GPU tilts and successor sets; pass generators with the
    same seed to get traces of one distribution with independent tokens (profiling vs evaluation).
    """
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    srng = structure_rng if structure_rng is not None else rng
    E, G, K = num_experts, num_gpus, top_k
    T = batches * G * tokens_per_gpu
    ranks = np.arange(1, E + 1, dtype=float)
    base = ranks ** -params.zipf_alpha

    pops = np.empty((num_layers, G, E))
    succ_ids = np.empty((num_layers, E, params.affinity_fanout), dtype=np.int64)
    succ_w = np.empty((num_layers, E, params.affinity_fanout))
    for l in range(num_layers):
        pop = base[srng.permutation(E)]
        tilt = np.exp(params.gpu_mix_sigma * srng.standard_normal((G, E)))
        pops[l] = pop[None, :] * tilt
        pops[l] /= pops[l].sum(axis=1, keepdims=True)
        fan = min(params.affinity_fanout, E)
        p = pop / pop.sum()
        for e in range(E):
            ids = srng.choice(E, size=fan, replace=False, p=p)
            succ_ids[l, e, :fan] = ids
            succ_w[l, e, :fan] = pop[ids]

    home = ((np.arange(T) % (G * tokens_per_gpu)) // tokens_per_gpu).astype(np.int32)
    batch = (np.arange(T) // (G * tokens_per_gpu)).astype(np.int32)
    experts = np.empty((T, num_layers, K), dtype=np.int16 if E < 2**15 else np.int32)
    weights = np.empty((T, num_layers, K), dtype=np.float32)
    prev_top1: np.ndarray | None = None
    for l in range(num_layers):
        pop_table = _AliasTable(pops[l])
        succ_table = _AliasTable(succ_w[l]) if params.affinity > 0 else None
        use_affinity = prev_top1 is not None and params.affinity > 0

        def draw(idx: np.ndarray, m: int) -> np.ndarray:
            """``m`` i.i.d. draws from the mixture for each token in ``idx``: [idx.size, m]."""
            rows = np.repeat(idx, m)
            out = pop_table.sample(home[rows], rng)
            if use_affinity:
                from_succ = rng.random(rows.size) < params.affinity
                s = rows[from_succ]
                col = succ_table.sample(prev_top1[s], rng)
                out[from_succ] = succ_ids[l, prev_top1[s], col]
            return out.reshape(idx.size, m)

        experts[:, l, :] = _first_distinct(draw, T, K)
        picks = experts[:, l, :].astype(np.int64)
        w = pops[l][home[:, None], picks]
        weights[:, l, :] = w / w.sum(axis=1, keepdims=True)
        prev_top1 = picks[:, 0]

    meta = TraceMeta(num_experts=E, num_layers=num_layers, top_k=K, model=model,
                     source="moesim.synthetic", extra={"synthetic": params.__dict__ | {"num_gpus": G}})
    return Trace(experts=experts, meta=meta, weights=weights, home=home, batch=batch)
