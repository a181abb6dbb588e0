"""Rebalancing reports: per-batch time series with rebalance points, the verdict, and the sweep trade-off.

Pure functions of :class:`moesim.study.rebalance.RebalanceResult` (and of sweep rows); files are written by
the caller into a temporary folder that is moved into place only when complete (:mod:`moesim.report.files`,
:mod:`moesim.cli_sweep`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moesim.study.rebalance import RebalanceResult  # noqa: E402

SERIES_FIELDS = ("cluster", "batch", "plan_version", "rebalance", "stall_ms", "overlap_slowdown_ms", "static_ms",
                 "rebalanced_ms", "baseline_ms", "static_imbalance", "rebalanced_imbalance", "baseline_imbalance")
SWEEP_FIELDS = ("cluster", "redundant_experts", "every_batches", "window_batches", "rebalances", "static_ms",
                "rebalanced_ms", "migration_ms", "gross_gain_pct", "net_gain_pct", "GB_moved",
                "static_imbalance", "rebalanced_imbalance")


def _redundant(result: RebalanceResult, info: dict[str, Any] | None) -> str:
    r = (info or {}).get("redundant_experts")
    return f"{r} redundant experts" if r is not None else "its replicas"


def verdict(result: RebalanceResult, info: dict[str, Any] | None = None) -> str:
    """One plain paragraph: does rebalancing pay, by how much, and below which interval it stops paying."""
    s = result.summary()
    cfg = result.config
    how = f"every {cfg.every_batches} batches (window {cfg.window_batches}, " + \
        ("incremental" if cfg.incremental else "full re-plan") + f", {cfg.migration})"
    head = f"{result.cluster}: rebalancing {result.placement} with {_redundant(result, info)} {how}"
    cost = (f"{s['rebalances']} rebalances moved {s['GB_moved']:.1f} GB ({s['copies_moved']} expert copies), "
            f"{s['cost_per_rebalance_ms']:.2f} ms each")
    if s["net_gain"] > 0:
        text = (f"{head} saves {s['net_gain'] * 100:.1f}% net vs planning once "
                f"({s['gross_gain'] * 100:.1f}% before migration cost; {cost})")
    else:
        text = (f"{head} costs {-s['net_gain'] * 100:.1f}% net vs planning once "
                f"({s['gross_gain'] * 100:+.1f}% before migration cost; {cost})")
    be = s["break_even_every_batches"]
    if be is None:
        text += "; fresher plans do not serve faster here, so rebalancing cannot pay at any interval."
    else:
        text += (f"; break-even interval about {be:.1f} batches: rebalancing at shorter intervals costs more "
                 f"than it saves (at this run's gain per batch; `moesim sweep` measures each interval).")
    if "baseline" in result.batch_ms:
        base = float(result.batch_ms["baseline"].sum())
        with_mig = s["total_ms"]["rebalanced_with_migration"]
        text += f" Against the baseline placement: {base / with_mig:.3f}x." if with_mig > 0 else ""
    return text


def write_series_csv(results: list[RebalanceResult], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SERIES_FIELDS)
        for r in results:
            points = {m.batch for m in r.migrations}
            for b in range(r.num_batches):
                w.writerow((r.cluster, b, int(r.plan_version[b]), int(b in points), round(float(r.stall_ms[b]), 6),
                            round(float(r.slow_ms[b]), 6), round(float(r.batch_ms["static"][b]), 6),
                            round(float(r.batch_ms["rebalanced"][b]), 6),
                            round(float(r.batch_ms["baseline"][b]), 6) if "baseline" in r.batch_ms else "",
                            round(float(r.imbalance["static"][b]), 6), round(float(r.imbalance["rebalanced"][b]), 6),
                            round(float(r.imbalance["baseline"][b]), 6) if "baseline" in r.imbalance else ""))


def plot_series(results: list[RebalanceResult], path: Path, title: str) -> None:
    """Per-batch end-to-end time and imbalance per series, rebalance points marked, one column per cluster."""
    fig, axes = plt.subplots(2, len(results), figsize=(7 * len(results), 6), sharex="col", squeeze=False)
    for c, r in enumerate(results):
        x = np.arange(r.num_batches)
        top, bottom = axes[0, c], axes[1, c]
        styles = {"baseline": ("tab:gray", ":"), "static": ("tab:blue", "--"), "rebalanced": ("tab:red", "-")}
        for key, (color, ls) in styles.items():
            if key in r.batch_ms:
                label = {"static": f"{r.placement}, planned once", "rebalanced": f"{r.placement}, rebalanced",
                         "baseline": "baseline"}[key]
                top.plot(x, r.batch_ms[key], color=color, ls=ls, marker=".", label=label)
                bottom.plot(x, r.imbalance[key], color=color, ls=ls, marker=".", label=label)
        if r.stall_ms.any():
            top.bar(x, r.stall_ms, bottom=r.batch_ms["rebalanced"], color="tab:orange", alpha=0.6,
                    label="migration stall")
        for m in r.migrations:
            for ax in (top, bottom):
                ax.axvline(m.batch - 0.5, color="k", lw=0.7, ls="--", alpha=0.5)
        top.set_ylabel("end-to-end ms per batch")
        bottom.set_ylabel("imbalance (max-mean)/mean")
        bottom.set_xlabel("batch (dashed: rebalance)")
        top.set_title(f"{r.cluster}: net {r.summary()['net_gain'] * 100:+.1f}% vs planned once")
        top.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_row(result: RebalanceResult, redundant: int) -> dict[str, Any]:
    s = result.summary()
    return {"cluster": result.cluster, "redundant_experts": redundant, "every_batches": result.config.every_batches,
            "window_batches": result.config.window_batches, "rebalances": s["rebalances"],
            "static_ms": s["total_ms"]["static"], "rebalanced_ms": s["total_ms"]["rebalanced_with_migration"],
            "migration_ms": s["migration_cost_ms"], "gross_gain_pct": s["gross_gain"] * 100,
            "net_gain_pct": s["net_gain"] * 100, "GB_moved": s["GB_moved"],
            "static_imbalance": s["imbalance_mean"]["static"],
            "rebalanced_imbalance": s["imbalance_mean"]["rebalanced"]}


def write_sweep_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SWEEP_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def sweep_verdict(rows: list[dict[str, Any]], reference_ms: dict[str, float] | None = None) -> list[str]:
    """Per cluster: the best (redundant, interval) by total time including migration, and per redundant count
    the break-even interval (the shortest swept interval from which every longer one still saves net).
    ``reference_ms``: the cluster's no-replica, never-rebalanced total, to state the overall saving."""
    out = []
    for cluster in dict.fromkeys(r["cluster"] for r in rows):
        mine = [r for r in rows if r["cluster"] == cluster]
        best = min(mine, key=lambda r: r["rebalanced_ms"])
        once = min(mine, key=lambda r: r["static_ms"])
        ref = (reference_ms or {}).get(cluster)
        if best["rebalanced_ms"] < once["static_ms"]:
            vs = (f"; {(1 - best['rebalanced_ms'] / ref) * 100:.1f}% vs no redundant experts and no rebalancing"
                  if ref else "")
            out.append(f"{cluster}: rebalancing every {best['every_batches']} batches with "
                       f"{best['redundant_experts']} redundant experts is best: it saves "
                       f"{(1 - best['rebalanced_ms'] / once['static_ms']) * 100:.1f}% net (migration included) vs "
                       f"the best plan made once ({once['redundant_experts']} redundant){vs}.")
        else:
            vs = (f", {(1 - once['static_ms'] / ref) * 100:.1f}% faster than without redundant experts"
                  if ref else "")
            out.append(f"{cluster}: planning once with {once['redundant_experts']} redundant experts is best{vs}; "
                       f"rebalancing never pays here (closest: every {best['every_batches']} batches with "
                       f"{best['redundant_experts']} redundant, {best['net_gain_pct']:+.1f}% net vs planning once).")
        for red in sorted({r["redundant_experts"] for r in mine}):
            pts = sorted((r["every_batches"], r["net_gain_pct"]) for r in mine if r["redundant_experts"] == red)
            paying = [n for n, g in pts if g > 0]
            if not paying:
                out.append(f"  {red} redundant: rebalancing costs more than it saves at every swept interval "
                           f"({', '.join(str(n) for n, _ in pts)} batches).")
                continue
            start = next(i for i in range(len(pts)) if all(g > 0 for _, g in pts[i:])) \
                if pts[-1][1] > 0 else None
            if start is None:
                out.append(f"  {red} redundant: saves only at " + ", ".join(f"every {n}" for n in paying) + " batches.")
                continue
            n0 = pts[start][0]
            below = f"; below {n0} batches it costs more than it saves" if start > 0 else \
                " (every swept interval saves)"
            out.append(f"  {red} redundant: rebalancing every {n0}+ batches saves "
                       f"{max(g for _, g in pts[start:]):.1f}% net at best{below}.")
    return out


def plot_tradeoff(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Net saving vs rebalance interval, one line per redundant-expert count, one panel per cluster."""
    clusters = list(dict.fromkeys(r["cluster"] for r in rows))
    fig, axes = plt.subplots(1, len(clusters), figsize=(7 * len(clusters), 4.5), squeeze=False)
    for ax, cluster in zip(axes[0], clusters):
        mine = [r for r in rows if r["cluster"] == cluster]
        for red in sorted({r["redundant_experts"] for r in mine}):
            pts = sorted((r["every_batches"], r["net_gain_pct"], r["gross_gain_pct"]) for r in mine
                         if r["redundant_experts"] == red)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{red} redundant, net")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", ls=":", color=line.get_color(),
                    label=f"{red} redundant, before migration")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("rebalance every N batches")
        ax.set_ylabel("saving vs planning once, %")
        ax.set_title(cluster)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_json(results: list[RebalanceResult], infos: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ``rebalance`` entries of results.json: summary, migrations and verdict per cluster."""
    out = []
    for r in results:
        entry = r.summary()
        entry["migrations"] = [{"batch": m.batch, "switched_at": m.switched_at, "copies_moved": m.copies_moved,
                                "GB": m.bytes_moved / 1e9, "transfer_ms": m.transfer_s * 1e3} for m in r.migrations]
        entry["verdict"] = verdict(r, (infos or {}).get(r.cluster))
        out.append(entry)
    return out
