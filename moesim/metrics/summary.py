"""Metrics of one simulated run, computed afterwards from its flat records (pure functions).

Conventions (there is no common one, so several are reported; see DOMAIN.md section 3):
- end-to-end time: per batch, from its start to the last GPU finishing the last MoE layer;
- all-to-all time of a GPU in one collective: from the collective's start (its last GPU joining, so
  skew waits are excluded and reported apart as ``sync_wait``) to that GPU's own last byte; the
  *tail* of a collective is its slowest GPU (MoETuner's "all-to-all tail latency");
- compute skew per (batch, layer) over EP ranks: max/mean of tokens and of expert time, vLLM's
  balancedness mean/max, and TensorRT-LLM's imbalance (max - mean)/mean;
- traffic: bytes that leave a GPU to another GPU in its node (NVLink) or in another node (network);
- busiest link: the largest bytes / (capacity x simulated time) over all links.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moesim.metrics.serving import ServingMetrics
from moesim.sim.engine import SimRecords


def _stats(x: np.ndarray, scale: float = 1e3) -> dict[str, float]:
    x = np.asarray(x, dtype=float).ravel() * scale
    if x.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)),
            "max": float(x.max())}


@dataclass(frozen=True)
class RunMetrics:
    cluster: str
    placement: str
    e2e_ms: dict[str, float]
    a2a_tail_ms: dict[str, float]
    dispatch_tail_ms: dict[str, float]
    combine_tail_ms: dict[str, float]
    a2a_mean_ms: float
    sync_wait_ms: float
    layer_ms: dict[str, float]
    compute_ms: dict[str, float]
    compute_skew: dict[str, float]
    traffic_GB: dict[str, float]
    busiest_link: dict[str, Any]
    speedup_vs_baseline: float | None = None
    serving: ServingMetrics | None = None  # tokens/s per GPU and per node, TPOT (moesim.metrics.serving)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["serving"] = self.serving.to_json() if self.serving is not None else None
        if out["serving"] is None:
            del out["serving"]
        return out


def per_rank(x: np.ndarray, tp: int) -> np.ndarray:
    """[..., G] per-GPU values -> [..., ranks]: the first GPU of each EP rank (all are equal)."""
    return x[..., ::tp]


def skew(values: np.ndarray) -> dict[str, np.ndarray]:
    """Skew measures over the last axis."""
    mean = values.mean(axis=-1)
    mx = values.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "max_over_mean": np.where(mean > 0, mx / mean, 1.0),
            "mean_over_max": np.where(mx > 0, mean / mx, 1.0),
            "imbalance": np.where(mean > 0, (mx - mean) / mean, 0.0),
        }


def summarize(rec: SimRecords) -> RunMetrics:
    g = rec.gpu
    disp = g["t_dispatch_done"] - g["t_dispatch_start"]  # [B, L, G]
    comb = g["t_combine_done"] - g["t_combine_start"]
    wait = (g["t_dispatch_start"] - g["t_dispatch_join"]) + (g["t_combine_start"] - g["t_combine_join"])
    tails = np.concatenate([disp.max(axis=2).ravel(), comb.max(axis=2).ravel()])
    layer_end = g["t_layer_end"].max(axis=2)
    layer_start = g["t_layer_start"].min(axis=2)

    tokens = per_rank(g["tokens"], rec.tp)
    compute = per_rank(g["t_compute_end"] - g["t_compute_start"], rec.tp)
    tok_skew = skew(tokens)
    time_skew = skew(compute)
    compute_skew = {
        "max_over_mean": float(tok_skew["max_over_mean"].mean()),
        "max_over_mean_worst": float(tok_skew["max_over_mean"].max()),
        "mean_over_max": float(tok_skew["mean_over_max"].mean()),
        "imbalance": float(tok_skew["imbalance"].mean()),
        "time_max_over_mean": float(time_skew["max_over_mean"].mean()),
        "time_imbalance": float(time_skew["imbalance"].mean()),
    }
    B = max(len(rec.batch_end), 1)
    traffic = {
        "intra_node_per_batch": float(g["bytes_out_intra"].sum() / B / 1e9),
        "inter_node_per_batch": float(g["bytes_out_inter"].sum() / B / 1e9),
    }
    util = rec.link_bytes / (rec.link_capacity * rec.sim_time) if rec.sim_time > 0 else rec.link_bytes * 0
    k = int(np.argmax(util)) if util.size else 0
    busiest = {"link": rec.link_names[k], "kind": rec.link_kind[k], "utilisation": float(util[k]),
               "GB": float(rec.link_bytes[k] / 1e9)} if util.size else {}
    return RunMetrics(
        cluster=rec.cluster,
        placement=rec.placement,
        e2e_ms=_stats(rec.batch_end - rec.batch_start),
        a2a_tail_ms=_stats(tails),
        dispatch_tail_ms=_stats(disp.max(axis=2)),
        combine_tail_ms=_stats(comb.max(axis=2)),
        a2a_mean_ms=float(np.concatenate([disp.ravel(), comb.ravel()]).mean() * 1e3),
        sync_wait_ms=float(wait.mean() * 1e3),
        layer_ms=_stats(layer_end - layer_start),
        compute_ms=_stats(compute.max(axis=2)),
        compute_skew=compute_skew,
        traffic_GB=traffic,
        busiest_link=busiest,
    )


def term_ms(rec: SimRecords) -> dict[str, float]:
    """Milliseconds per batch of each step of the layers, summed over the MoE layers and averaged over GPUs and
    batches: ``dense_layers`` (the dense transformer layers), ``attention`` (the MoE layers' attention, with its TP
    collectives), ``route`` (the kernel pipeline's steps before the dispatch), ``shared_expert``, ``wait`` (for the
    slowest GPU to join the all-to-alls), ``dispatch``, ``experts``, ``expert_tp`` (the expert-TP all-gather and
    reduce-scatter), ``combine`` and ``reduce``. A GPU runs them one after another, so they add up to the mean
    GPU's time per batch. With two-batch overlap (``rec.micro``) they are micro-batch 0's, the other micro-batch
    running beside them: ``stream_wait`` replaces ``expert_tp`` (waiting for the compute stream the other holds
    before the experts; the wait before the reduction is in ``reduce``), and the shared experts run beside the
    dispatch (not counted apart)."""
    g = rec.micro[0] if rec.micro else rec.gpu
    spans = {
        "dense_layers": g["t_attn_start"] - g["t_layer_start"],
        "attention": g["t_dense_end"] - g["t_attn_start"],
        "route": g["t_shared_start"] - g["t_dense_end"],
        "shared_expert": g["t_dispatch_join"] - g["t_shared_start"],
        "wait": (g["t_dispatch_start"] - g["t_dispatch_join"]) + (g["t_combine_start"] - g["t_combine_join"]),
        "dispatch": g["t_dispatch_done"] - g["t_dispatch_start"],
        "experts": g["t_compute_end"] - g["t_compute_start"],
        "expert_tp": (g["t_compute_start"] - g["t_dispatch_done"]) + (g["t_combine_join"] - g["t_compute_end"]),
        "combine": g["t_combine_done"] - g["t_combine_start"],
        "reduce": g["t_layer_end"] - g["t_combine_done"],
    }
    if rec.micro:
        spans["stream_wait"] = spans.pop("expert_tp")
    return {k: float(v.sum(axis=1).mean() * 1e3) if v.size else 0.0 for k, v in spans.items()}


def with_speedups(metrics: list[RunMetrics], baseline: str) -> list[RunMetrics]:
    """Attach speedup = baseline mean e2e / this mean e2e, per cluster."""
    base = {m.cluster: m.e2e_ms["mean"] for m in metrics if m.placement == baseline}
    out = []
    for m in metrics:
        ref = base.get(m.cluster)
        speed = ref / m.e2e_ms["mean"] if ref and m.e2e_ms["mean"] > 0 else None
        out.append(RunMetrics(**{**m.__dict__, "speedup_vs_baseline": speed}))
    return out
