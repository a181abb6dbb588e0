"""``moesim trace stats`` of a count trace: what counts can say - load skew per MoE layer, per-window imbalance
and drift across windows - computed as :mod:`moesim.traces.stats` computes them for a per-token trace (same
names in the JSON summary), so the two compare.

Deliberately absent: co-activation, successor (cross-layer) shares and their mutual information, which need
per-token paths; the summary lists them under ``needs_per_token`` rather than guessing them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.traces.count_trace import CountTrace
from moesim.traces.stats import load_skew, window_drift

NEEDS_PER_TOKEN = ("co-activation shares", "successor (cross-layer) shares and mutual information",
                   "per-token heatmaps (--plots)")


def _med(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else None


def count_stats(ct: CountTrace, *, top_m: int = 8) -> dict[str, Any]:
    """Flat, JSON-ready figures of a count trace (medians over MoE layers unless named otherwise)."""
    load = ct.total()
    mom, cv = load_skew(load)
    m = min(top_m, ct.meta.num_experts)
    tv_cons, tv_all, tv_noise, churn = window_drift(ct.loads, load, m)
    per_window = ct.loads.max(axis=2) / np.maximum(ct.loads.mean(axis=2), 1e-300)  # [W, L]
    active = ct.loads.sum(axis=2) > 0
    window_mom = np.where(active, per_window, np.nan)
    return {
        "kind": "counts", "windows": ct.num_windows, "layers": ct.meta.num_layers, "experts": ct.meta.num_experts,
        "top_k": ct.meta.top_k, "top_m": m, "picks": int(load.sum()),
        "tokens": int(ct.tokens().sum()), "tokens_known": ct.window_tokens is not None,
        "load_max_over_mean_median": _med(mom),
        "load_max_over_mean_max": float(np.nanmax(mom)) if np.isfinite(mom).any() else None,
        "load_cv_median": _med(cv),
        "window_load_max_over_mean_median": _med(window_mom.ravel()),
        "drift_tv_consecutive_median": _med(tv_cons), "drift_tv_to_all_median": _med(tv_all),
        "drift_tv_noise_median": _med(tv_noise), "hot_set_churn": None if np.isnan(churn) else churn,
        "layer_ids": list(ct.layer_ids) if ct.layer_ids is not None else None,
        "num_decoder_layers": ct.num_decoder_layers, "source": ct.meta.source,
        "needs_per_token": list(NEEDS_PER_TOKEN),
        "per_layer": [{"layer": i, "load_max_over_mean": None if np.isnan(mom[i]) else float(mom[i]),
                       "load_cv": None if np.isnan(cv[i]) else float(cv[i]),
                       "drift_tv_consecutive": None if np.isnan(tv_cons[i]) else float(tv_cons[i])}
                      for i in range(ct.meta.num_layers)],
    }


def format_count_stats(s: dict[str, Any], *, name: str, layers: int | None = 12) -> str:
    """The summary as text: a header, the medians, then one row per MoE layer (the first ``layers``)."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    tokens = f"{s['tokens']} tokens" if s["tokens_known"] else f"at least {s['tokens']} tokens (picks / top_k)"
    lines = [
        f"{name}: counts of {s['windows']} windows x {s['layers']} MoE layers x {s['experts']} experts, top-"
        f"{s['top_k']}, {s['picks']} picks, {tokens}",
        f"  load skew        max/mean median {f(s['load_max_over_mean_median'])}, max "
        f"{f(s['load_max_over_mean_max'])}; CV median {f(s['load_cv_median'])}; per window max/mean median "
        f"{f(s['window_load_max_over_mean_median'])}",
        f"  drift            {s['windows']} windows: TV consecutive {f(s['drift_tv_consecutive_median'])}, to all "
        f"{f(s['drift_tv_to_all_median'])}, sampling noise alone {f(s['drift_tv_noise_median'])}; hot-set churn "
        f"(top {s['top_m']}) {f(s['hot_set_churn'])}",
        f"  not from counts  {', '.join(s['needs_per_token'])}: they need per-token paths",
        f"{'layer':>6s} {'id':>5s} {'max/mean':>8s} {'CV':>6s} {'TV cons':>7s}",
    ]
    ids = s["layer_ids"]
    for row in s["per_layer"][:layers]:
        i = row["layer"]
        lines.append(f"{i:6d} {ids[i] if ids else i:5d} {f(row['load_max_over_mean']):>8s} {f(row['load_cv']):>6s} "
                     f"{f(row['drift_tv_consecutive']):>7s}")
    if layers is not None and len(s["per_layer"]) > layers:
        lines.append(f"  ... {len(s['per_layer']) - layers} more layers (--all-layers)")
    return "\n".join(lines)
