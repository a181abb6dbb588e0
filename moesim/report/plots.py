"""Plots: speedup per placement and cluster, per-GPU load heatmaps, all-to-all tail distributions.

Drawn on Matplotlib figures with their own Agg canvas (:func:`moesim.fileio.figure`), never through pyplot, so
the backend of the program that imports moesim (a notebook's inline backend) is left as it was. Names of
clusters and placements are shown as typed (``$`` is not mathtext).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.fileio import figure, plain_text
from moesim.metrics.summary import per_rank
from moesim.study.runner import StudyResult


def _clusters_and_placements(result: StudyResult) -> tuple[list[str], list[str]]:
    clusters = list(dict.fromkeys(r.cluster.name for r in result.runs))
    names = list(dict.fromkeys(r.name for r in result.runs))
    return clusters, names


def speedup(result: StudyResult, path: Path) -> None:
    clusters, names = _clusters_and_placements(result)
    speed = {(r.cluster.name, r.name): r.metrics.speedup_vs_baseline or 0.0 for r in result.runs}
    fig = figure(figsize=(max(6, 1.4 * len(names) * max(1, len(clusters)) / 1.5), 4))
    ax = fig.subplots()
    width = 0.8 / len(clusters)
    x = np.arange(len(names))
    for i, c in enumerate(clusters):
        vals = [speed.get((c, n), 0.0) for n in names]
        bars = ax.bar(x + (i - (len(clusters) - 1) / 2) * width, vals, width, label=plain_text(c))
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in vals], fontsize=8, padding=2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [plain_text(n) for n in names])
    ax.set_ylabel(plain_text(f"end-to-end speedup vs {result.scenario.baseline}"))
    ax.set_title(plain_text(f"{result.scenario.name}: speedup by placement and cluster"))
    ax.set_ylim(0.0, max(speed.values(), default=1.0) * 1.12)  # from zero: bar heights compare
    ax.legend(title="cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gpu_load(result: StudyResult, path: Path) -> None:
    clusters, names = _clusters_and_placements(result)
    # at least 5.5 inches wide: the title must fit above a single placement
    fig = figure(figsize=(max(3.0 * len(names) + 1, 5.5), 3.0 * len(clusters) + 0.6), layout="constrained")
    axes = fig.subplots(len(clusters), len(names), squeeze=False, sharex="row", sharey=True)
    loads = {}
    for r in result.runs:
        tok = per_rank(r.records.gpu["tokens"], r.records.tp).mean(axis=0)  # [L, ranks]
        mean = tok.mean(axis=1, keepdims=True)
        loads[(r.cluster.name, r.name)] = np.divide(tok, mean, out=np.ones_like(tok), where=mean > 0)
    vmax = max(float(v.max()) for v in loads.values())
    im = None
    for i, c in enumerate(clusters):
        for j, n in enumerate(names):
            ax = axes[i, j]
            data = loads.get((c, n))
            if data is None:
                ax.axis("off")
                continue
            im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(plain_text(n) if i == 0 else "", fontsize=10)
            ax.set_xlabel("EP rank (TP group)" if r_tp(result, c) > 1 else "GPU", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{plain_text(c)}\nMoE layer")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="tokens / mean over GPUs")
    fig.suptitle("Per-GPU expert load (token-expert pairs, mean over batches)")
    fig.savefig(path, dpi=110)


def r_tp(result: StudyResult, cluster: str) -> int:
    return next(c.tp for c in result.scenario.clusters if c.name == cluster)


def a2a_tail(result: StudyResult, path: Path) -> None:
    clusters, names = _clusters_and_placements(result)
    fig = figure(figsize=(5.5 * len(clusters), 4))
    axes = fig.subplots(1, len(clusters), squeeze=False)
    for i, c in enumerate(clusters):
        ax = axes[0, i]
        for r in (r for r in result.runs if r.cluster.name == c):
            g = r.records.gpu
            tails = np.concatenate([(g["t_dispatch_done"] - g["t_dispatch_start"]).max(axis=2).ravel(),
                                    (g["t_combine_done"] - g["t_combine_start"]).max(axis=2).ravel()]) * 1e3
            xs = np.sort(tails)
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=plain_text(r.name))
        ax.set_xlabel("all-to-all tail latency per layer (ms, slowest GPU)")
        ax.set_ylabel("fraction of collectives")
        ax.set_title(plain_text(c))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("All-to-all tail latency distribution (dispatch and combine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_all(result: StudyResult, folder: Path) -> None:
    speedup(result, folder / "speedup.png")
    gpu_load(result, folder / "gpu_load.png")
    a2a_tail(result, folder / "a2a_tail.png")
