"""DeepSeek-R1's routing skew at EP32, as a Zipf exponent of moesim's synthetic generator: fitted on the one figure
TensorRT-LLM publishes of it and checked on the other.

TensorRT-LLM's wide-EP load balancer (docs blog4 Table 1 and examples/wide_ep/ep_load_balancer; SERVING.md section
5) measured R1 at EP32 without EPLB, averaging per-layer, per-iteration figures at a mean of 1,024 picks per rank:
(max - mean) / mean of the picks per expert ("by slot") 10.948, and per rank ("by rank") 1.564. This script
finds the ``zipf_alpha`` of the synthetic generator (group-limited as DeepSeek-V3 routes: 8 groups, top-4, top-8;
its default GPU mix and affinity) whose by-slot imbalance is R1's, by bisection on one seed's 8 batches of 16
layers (128 tokens per rank: 1,024 picks), and prints the by-rank imbalance it implies beside R1's, on that seed and
on a held-out one. benchmarks/deployments.py's R1-skew section uses the exponent.

    python benchmarks/fit_r1_skew.py      # a minute on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesim.traces.synthetic import SyntheticParams, generate_trace  # noqa: E402

EXPERTS, RANKS, TOKENS, LAYERS, BATCHES = 256, 32, 128, 16, 8
R1_BY_SLOT, R1_BY_RANK = 10.948, 1.564


def imbalance(alpha: float, seed: int) -> tuple[float, float]:
    """Mean over layers and batches of (max - mean) / mean picks per expert and per contiguous rank of 8 experts."""
    trace = generate_trace(num_layers=LAYERS, num_experts=EXPERTS, top_k=8, num_gpus=RANKS, tokens_per_gpu=TOKENS,
                           batches=BATCHES, params=SyntheticParams(zipf_alpha=alpha, groups=8, topk_groups=4),
                           rng=np.random.default_rng(seed))
    experts = np.asarray(trace.experts)
    slot, rank = [], []
    for b in range(BATCHES):
        batch = experts[b * RANKS * TOKENS:(b + 1) * RANKS * TOKENS]
        for layer in range(LAYERS):
            picks = np.bincount(batch[:, layer].ravel(), minlength=EXPERTS)
            per_rank = picks.reshape(RANKS, -1).sum(1)
            slot.append(picks.max() / picks.mean() - 1)
            rank.append(per_rank.max() / per_rank.mean() - 1)
    return float(np.mean(slot)), float(np.mean(rank))


def main() -> None:
    lo, hi = 0.3, 1.0
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if imbalance(mid, 0)[0] < R1_BY_SLOT else (lo, mid)
    alpha = round((lo + hi) / 2, 2)
    print(f"zipf_alpha {alpha} (by-slot imbalance fitted to R1's {R1_BY_SLOT}; by rank held out, R1 {R1_BY_RANK})")
    for seed, role in ((0, "fitted seed"), (1, "held-out seed")):
        slot, rank = imbalance(alpha, seed)
        print(f"  {role}: by slot {slot:.3f} ({slot / R1_BY_SLOT - 1:+.1%}), by rank {rank:.3f} "
              f"({rank / R1_BY_RANK - 1:+.1%})")


if __name__ == "__main__":
    main()
