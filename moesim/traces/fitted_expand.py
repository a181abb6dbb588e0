"""A fitted generator carried over to a larger model of the same family: more experts, more layers, another top-k.

Used to give a DeepSeek-V3-shaped model (58 MoE layers x 256 experts, top-8) routing that comes from real data:
the shipped fit of DeepSeek-V2-Lite's real prefill routing (26 MoE layers x 64 experts, top-6). The expansion:
- experts: each fitted expert is split into ``split = num_experts / fitted experts`` experts of equal share
  (DeepSeek-V3 has 4x V2-Lite's experts), then the identities are shuffled per layer (one permutation per
  layer, drawn from ``rng``), so the hot experts land on different ranks in different layers;
- layers: MoE layer ``l`` of the model takes the popularity of fitted layer ``l x fitted layers // num_layers``
  (proportional; with more model layers than fitted ones, neighbouring layers share a fitted layer, under
  independent shuffles);
- top-k: the popularity is each expert's share of the picks; a token of the model draws the model's ``top_k``
  distinct experts from it (Plackett-Luce, as the generator does), so a top-6 fit gives top-8 picks with the
  same shares, up to the flattening of sampling without replacement (an expert is picked at most once per
  token: V2-Lite's hottest expert split in four, 1.9% of the picks, draws about 3.5% fewer than its share);
- drift (``drift_sigma``, ``drift_rho``) and the per-GPU mix are the fit's, applied per batch as the generator does;
- cross-layer transitions are dropped (coupling 0): a model layer pair maps to one fitted layer or to a pair
  the fit has, and the fit's successors of 64 experts say nothing about which of an expert's 4 splits follows.
  Same-layer co-activation that came from shared predecessors goes with them.
This is how ``benchmarks/bench_plan.py`` builds its DeepSeek-V3-shaped count dump. It is V2-Lite's routing at
V3's shape, not DeepSeek-V3's or R1's own routing, which is not published.
"""

from __future__ import annotations

import numpy as np

from moesim.traces.fitted_generator import FittedParams


def layer_map(num_layers: int, fitted_layers: int) -> np.ndarray:
    """The fitted layer each of ``num_layers`` model layers takes: ``l x fitted_layers // num_layers``."""
    return (np.arange(num_layers) * fitted_layers) // num_layers


def expanded_popularity(params: FittedParams, *, num_layers: int, num_experts: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Popularity [num_layers, num_experts] (rows sum to 1): the fitted layers mapped, every fitted expert split
    into ``num_experts / params.num_experts`` experts of equal share, identities shuffled per layer (one
    ``rng.permutation`` per layer, in layer order)."""
    if num_layers < 1 or num_experts < 1 or num_experts % params.num_experts:
        raise ValueError(f"num_experts={num_experts} must be a positive multiple of the fit's "
                         f"{params.num_experts} experts (and num_layers={num_layers} >= 1)")
    split = num_experts // params.num_experts
    src = params.popularity[layer_map(num_layers, params.num_layers)]
    src = src / src.sum(axis=1, keepdims=True)
    pop = np.repeat(src, split, axis=1) / split
    return np.stack([row[rng.permutation(num_experts)] for row in pop])


def expand_params(params: FittedParams, *, num_layers: int, num_experts: int, top_k: int,
                  rng: np.random.Generator) -> FittedParams:
    """The fitted generator at the model's shape (see the module docstring): popularity expanded, top-k the
    model's, the fit's drift and per-GPU mix, no cross-layer transitions."""
    pop = expanded_popularity(params, num_layers=num_layers, num_experts=num_experts, rng=rng)
    pairs = num_layers - 1
    return FittedParams(
        name=f"{params.name} expanded to {num_layers} layers x {num_experts} experts, top-{top_k}",
        num_layers=num_layers, num_experts=num_experts, top_k=top_k, popularity=pop,
        successors=np.zeros((pairs, num_experts, 0), dtype=np.int64),
        successor_logits=np.zeros((pairs, num_experts, 0)),
        coupling=np.zeros(pairs), drift_sigma=params.drift_sigma, drift_rho=params.drift_rho,
        gpu_mix_sigma=params.gpu_mix_sigma,
        fitted_to={"expanded_from": params.name, "split": num_experts // params.num_experts,
                   "fitted_layers": params.num_layers, "fitted_top_k": params.top_k},
    ).check()
