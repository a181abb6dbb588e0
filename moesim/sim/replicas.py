"""Which replica of an expert serves a token: the rules serving systems use, in numpy.

- ``token_index`` (vLLM): the token's index modulo the expert's replica count picks one - pseudo-random,
  blind to where the token lives (:func:`moesim.sim.traffic.replica_lookup`).
- ``local`` (SGLang's static dispatch): a fixed choice per (source EP rank, expert): the replica on the
  token's own rank if there is one, else one on its node, else any; where several sources share the
  candidates they are spread evenly over them (SGLang draws that spread at random; here it is a fixed
  rotation by expert id, so runs are reproducible).
- ``balanced_split`` (like DeepSeek's LPLB): per batch and layer, each replicated expert's tokens are split
  among its replicas to minimise the heaviest EP rank's token count, given what the unreplicated experts
  already put on every rank. The fractional optimum is found by block coordinate descent on the sum of
  squared rank loads, one expert at a time by water-filling (for loads of this form - a fixed vector plus a
  transportation of each expert's tokens - the least sum of squares is also the least maximum); it is then
  rounded to whole tokens (largest remainders) and the tokens dealt out so that every replica receives
  its share from every home rank (the all-to-all stays spread over all GPU pairs, as with ``token_index``).

Ignored: the cost of computing the split (LPLB solves it on the GPU in microseconds), and any
communication term in the choice (``balanced_split`` balances compute only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moesim.placement.format import Placement
from moesim.sim.traffic import replica_lookup

if TYPE_CHECKING:
    from moesim.traces.format import Layout, Trace

RULES = ("token_index", "local", "balanced_split")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown replica rule {rule!r}; valid: {', '.join(RULES)}")
    return rule


def local_table(gpus: np.ndarray, num_ranks: int, ranks_per_node: int) -> np.ndarray:
    """SGLang static dispatch for one layer: ``table[source rank, expert]`` = the serving rank.

    ``gpus [E, W]`` holds each expert's ranks, -1 padded."""
    reps_count = (gpus >= 0).sum(axis=1)
    table = np.repeat(gpus[:, 0][None, :], num_ranks, axis=0).astype(np.int64)  # single copies: the only one
    src = np.arange(num_ranks)
    node_of = src // max(ranks_per_node, 1)
    for e in np.flatnonzero(reps_count > 1):
        reps = np.sort(gpus[e][gpus[e] >= 0]).astype(np.int64)
        holds = np.zeros(num_ranks, dtype=bool)
        holds[reps] = True
        table[holds, e] = src[holds]
        rep_node = reps // max(ranks_per_node, 1)
        far: list[np.ndarray] = []
        for n in np.unique(node_of):
            needy = src[(node_of == n) & ~holds]
            near = reps[rep_node == n]
            if needy.size == 0:
                continue
            if near.size:
                table[needy, e] = near[(np.arange(needy.size) + e) % near.size]
            else:
                far.append(needy)
        if far:
            needy = np.concatenate(far)
            table[needy, e] = reps[(np.arange(needy.size) + e) % reps.size]
    return table


def water_fill(base: list[float], amount: float) -> list[float]:
    """Pour ``amount`` onto bins of heights ``base``: the shares that leave the filled bins level and no
    lower than before (the least sum of squares of the new heights)."""
    order = sorted(range(len(base)), key=base.__getitem__)
    level = base[order[0]]
    left = amount
    k = 1
    while True:
        nxt = base[order[k]] if k < len(order) else float("inf")
        need = (nxt - level) * k
        if need >= left:
            level += left / k
            break
        left -= need
        level = nxt
        k += 1
    return [max(level - b, 0.0) for b in base]


def split_loads(counts: np.ndarray, replicas: list[np.ndarray], fixed: np.ndarray, *, passes: int = 50,
                tol: float = 1e-3) -> list[np.ndarray]:
    """Fractional split of each replicated expert's ``counts[i]`` tokens over its ranks ``replicas[i]`` that
    minimises the heaviest rank, given the loads ``fixed [ranks]`` already there. Returns one share array per
    expert (aligned with ``replicas[i]``). Heaviest experts are placed first, then refined."""
    load = np.asarray(fixed, dtype=float).tolist()
    shares: list[list[float]] = [[0.0] * len(r) for r in replicas]
    reps = [r.tolist() for r in replicas]
    order = np.argsort(-np.asarray(counts, dtype=float), kind="stable").tolist()
    for sweep in range(passes):
        moved = 0.0
        for i in order:
            rs, old = reps[i], shares[i]
            base = [load[r] - s for r, s in zip(rs, old)]
            new = water_fill(base, float(counts[i]))
            for r, b, s in zip(rs, base, new):
                load[r] = b + s
            moved = max(moved, max(abs(a - b) for a, b in zip(new, old)))
            shares[i] = new
        if sweep and moved <= tol:
            break
    return [np.array(s) for s in shares]


def _round_shares(share: np.ndarray, total: int) -> np.ndarray:
    """Whole tokens summing to ``total``, by largest remainders (ties to the earlier replica)."""
    base = np.floor(share).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        base[np.argsort(-(share - base), kind="stable")[:short]] += 1
    return base


def balanced_split(gpus: np.ndarray, choices: np.ndarray, home_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """``balanced_split`` for one layer and batch: the serving rank of each (choice, token) of ``choices``
    [K, T] (-1 where no expert, and -1 returned there)."""
    E = gpus.shape[0]
    reps_count = (gpus >= 0).sum(axis=1)
    out = np.full(choices.shape, -1, dtype=np.int64)
    valid = choices >= 0
    ex = np.where(valid, choices, 0).astype(np.int64)
    single = valid & (reps_count[ex] == 1)
    out[single] = gpus[ex[single], 0]
    counts = np.bincount(choices[valid].astype(np.int64), minlength=E)
    fixed = np.bincount(out[single], minlength=num_ranks).astype(float)
    multi = np.flatnonzero((reps_count > 1) & (counts > 0))
    if multi.size == 0:
        return out
    replicas = [np.sort(gpus[e][gpus[e] >= 0]).astype(np.int64) for e in multi]
    shares = split_loads(counts[multi], replicas, fixed)
    # pairs of replicated experts, dealt out so that every replica gets its share from every home rank:
    # ordered by (expert, occurrence of that expert among the home rank's tokens, home rank), then cut into
    # consecutive chunks of the rounded shares
    k_idx, t_idx = np.nonzero(valid & (reps_count[ex] > 1))
    e_of = ex[k_idx, t_idx]
    h_of = home_rank[t_idx].astype(np.int64)
    order = np.lexsort((t_idx, h_of, e_of))
    group = e_of[order] * num_ranks + h_of[order]
    first = np.r_[True, group[1:] != group[:-1]]
    start_of = np.flatnonzero(first)
    occurrence = np.empty(order.size, dtype=np.int64)
    occurrence[order] = np.arange(order.size) - np.repeat(start_of, np.diff(np.r_[start_of, order.size]))
    order = np.lexsort((h_of, occurrence, e_of))
    k_idx, t_idx, e_of = k_idx[order], t_idx[order], e_of[order]
    start = np.searchsorted(e_of, multi)
    pos = np.arange(e_of.size) - start[np.searchsorted(multi, e_of)]
    for j, e in enumerate(multi):
        n = int(counts[e])
        bounds = np.cumsum(_round_shares(shares[j], n))
        sl = slice(start[j], start[j] + n)
        out[k_idx[sl], t_idx[sl]] = replicas[j][np.searchsorted(bounds, pos[sl], side="right")]
    return out


class ReplicaChooser:
    """The replica rule applied to one placement: ``ranks(layer, experts, home_rank, token_ids)`` gives the
    serving EP rank of each (choice, token) as [K, T], or None when the layer has no replicas or the rule is
    ``token_index`` (the traffic code's own lookup then applies)."""

    def __init__(self, rule: str, placement: Placement, ranks_per_node: int) -> None:
        self.rule = check_rule(rule)
        self.placement = placement
        self.ranks_per_node = ranks_per_node
        self._tables: dict[int, np.ndarray] = {}

    def ranks(self, layer: int, experts: np.ndarray, home_rank: np.ndarray) -> np.ndarray | None:
        gpus = self.placement.gpus[layer]
        if self.rule == "token_index" or gpus.shape[1] == 1 or not (gpus[:, 1] >= 0).any():
            return None
        choices = np.ascontiguousarray(np.asarray(experts).T)  # [K, T]
        R = self.placement.num_ranks
        if self.rule == "local":
            table = self._tables.get(layer)
            if table is None:
                table = self._tables[layer] = local_table(gpus, R, self.ranks_per_node)
            flat = np.vstack([table.T, np.full((1, R), -1)])  # row E (= index -1): no expert
            return flat[choices.astype(np.int64), home_rank[None, :]]
        return balanced_split(gpus, choices, home_rank, R)


def rank_tokens(trace: "Trace", layout: "Layout", placement: Placement, rule: str, *, tp: int = 1,
                ranks_per_node: int | None = None) -> np.ndarray:
    """[batches, layers, ranks] token-expert pairs each EP rank computes under ``rule`` - the load the
    engine would see, without simulating time (for imbalance studies)."""
    from moesim.sim.traffic import layer_traffic

    G = placement.num_ranks * tp
    chooser = ReplicaChooser(rule, placement, ranks_per_node or placement.num_ranks)
    batches = layout.batch_indices()
    out = np.zeros((len(batches), placement.num_layers, placement.num_ranks), dtype=np.int64)
    for b, idx in enumerate(batches):
        home = layout.home[idx]
        for l in range(placement.num_layers):
            ex = trace.experts[idx, l, :]
            tr = layer_traffic(ex, home, idx, placement.gpus[l], num_gpus=G, tp=tp,
                               num_experts=placement.num_experts, dedup=True,
                               replica_ranks=chooser.ranks(l, ex, home // tp))
            out[b, l] = tr.expert_tokens.sum(axis=1)
    return out


def token_index_ranks(gpus: np.ndarray, experts: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """vLLM's rule for one layer, [K, T] (what :func:`moesim.sim.traffic.replica_lookup` does per choice)."""
    choices = np.ascontiguousarray(np.asarray(experts).T)
    return np.stack([replica_lookup(gpus, c, token_ids) for c in choices]).astype(np.int64)
