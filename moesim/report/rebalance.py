"""Rebalancing reports: per-batch time series with rebalance points, the verdict, and the sweep trade-off.

Pure functions of :class:`moesim.study.rebalance.RebalanceResult` (and of sweep rows); files are written by
the caller into a temporary folder that is moved into place only when complete (:mod:`moesim.report.files`,
:mod:`moesim.cli.sweep`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.fileio import FolderKind, figure, is_matplotlib_png, plain_text, starts_with
from moesim.study.rebalance import RebalanceResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SERIES_FIELDS = ("cluster", "batch", "plan_version", "rebalance", "stall_ms", "overlap_slowdown_ms", "static_ms",
                 "rebalanced_ms", "baseline_ms", "static_imbalance", "rebalanced_imbalance", "baseline_imbalance")
# what ``moesim sweep`` writes into its folder (recognised when a later sweep replaces it)
SWEEP_OUTPUTS = FolderKind("moesim sweep's outputs", files={
    "sweep.csv": starts_with(b"cluster,redundant_experts,"),
    "sweep.json": starts_with(b'{\n "format": "moesim.sweep/'),
    "tradeoff.png": is_matplotlib_png})
SWEEP_FIELDS = ("cluster", "redundant_experts", "every_batches", "window_batches", "batches", "rebalances",
                "skipped_rebalances", "static_ms",
                "rebalanced_ms", "migration_ms", "gross_gain_pct", "net_gain_pct", "GB_moved",
                "static_imbalance", "rebalanced_imbalance")


def _redundant(result: RebalanceResult, info: dict[str, Any] | None) -> str:
    r = (info or {}).get("redundant_experts")
    return f"{r} redundant experts" if r is not None else "its replicas"


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def verdict(result: RebalanceResult, info: dict[str, Any] | None = None) -> str:
    """One plain paragraph: does rebalancing pay, by how much, below which interval it stops paying, and what
    the migrations cost."""
    s = result.summary()
    cfg = result.config
    how = f"every {cfg.every_batches} batches (window {cfg.window_batches}, " + \
        ("incremental" if cfg.incremental else "full re-plan") + f", {cfg.migration})"
    head = f"{result.cluster}: rebalancing {result.placement} with {_redundant(result, info)} {how}"
    if s["net_gain"] > 0:
        text = f"{head} saves {s['net_gain'] * 100:.1f}% net vs planning once"
    else:
        text = f"{head} costs {-s['net_gain'] * 100:.1f}% net vs planning once"
    be = s["break_even_every_batches"]
    if be is None:
        text += "; fresher plans serve no faster here, so rebalancing cannot pay at any interval."
    else:
        if s["net_gain"] > 0 and be < 1:
            text += f"; it would pay even every batch (break-even about {be:.2f} batches)"
        elif s["net_gain"] > 0:
            text += f"; below about {be:.1f} batches it would cost more than it saves"
        else:
            text += f"; it would pay only at intervals above about {be:.1f} batches" + \
                (f", longer than this {s['batches']}-batch run" if be >= s["batches"] else "")
        text += (f" (break-even: {s['cost_per_rebalance_ms']:.2f} ms per rebalance over {s['saving_per_batch_ms']:.2f} "
                 "ms saved per re-planned batch, taking the saving as independent of the interval; `moesim sweep` "
                 "measures each interval).")
    gross = round(s["gross_gain"] * 100, 1) + 0.0  # no "-0.0%"
    text += (f" Before migration cost: {gross:+.1f}%; {_n(s['rebalances'], 'rebalance')} moved "
             f"{s['GB_moved']:.1f} GB ({_n(s['copies_moved'], 'expert copy', 'expert copies')}), "
             f"{s['cost_per_rebalance_ms']:.2f} ms each")
    if cfg.migration == "overlap" and result.migrations:
        mean_t = sum(m.transfer_s for m in result.migrations) / len(result.migrations) * 1e3
        text += f" in slowed batches (the transfers took {mean_t:.2f} ms on average)"
    if s["skipped_rebalances"]:
        text += (f"; {_n(s['skipped_rebalances'], 're-plan point')} skipped because the previous migration was "
                 "still in flight (overlapped transfers slower than the interval)")
    if "baseline" in result.batch_ms:
        base = float(result.batch_ms["baseline"].sum())
        with_mig = s["total_ms"]["rebalanced_with_migration"]
        text += f"; {base / with_mig:.3f}x vs the baseline placement" if with_mig > 0 else ""
    return text + "."


def write_series_csv(results: list[RebalanceResult], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
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


# How each series is drawn, in drawing order: the series often coincide (every plan is the same until the first
# rebalance; the baseline may match), so each is told apart by its style, not only its colour - the one drawn
# first is the widest line with small filled markers, each one drawn over it thinner, dashed or dotted, with a
# marker that leaves the ones below visible (an open circle around a dot, a cross through both).
SERIES_STYLES: dict[str, dict[str, Any]] = {
    "rebalanced": {"color": "tab:red", "ls": "-", "lw": 2.4, "marker": "o", "ms": 3.5, "zorder": 2.1},
    "static": {"color": "tab:blue", "ls": "--", "lw": 1.5, "marker": "o", "ms": 7.5, "mfc": "none", "mew": 1.3,
               "zorder": 2.2},
    "baseline": {"color": "tab:gray", "ls": ":", "lw": 1.3, "marker": "x", "ms": 6.0, "zorder": 2.3},
}


def _series_label(result: RebalanceResult, key: str) -> str:
    return plain_text({"static": f"{result.placement}, planned once", "rebalanced": f"{result.placement}, rebalanced",
                       "baseline": "baseline"}[key])


def _migration_marks(r: RebalanceResult, top: Any, bottom: Any, x: np.ndarray) -> None:
    """Stalls (bars on top of the rebalanced series, behind the lines), overlapped migrations (shaded batches)
    and rebalance points (dashed vertical lines)."""
    stalled = np.flatnonzero(r.stall_ms > 0)
    if stalled.size:
        top.bar(x[stalled], r.stall_ms[stalled], bottom=r.batch_ms["rebalanced"][stalled], color="tab:orange",
                alpha=0.45, zorder=1.5, label="migration stall")
    slowed = np.flatnonzero(r.slow_ms > 0)
    for i, b in enumerate(slowed):  # overlap: batches served while weights move, each one slower
        top.axvspan(b - 0.5, b + 0.5, color="tab:orange", alpha=0.15, lw=0,
                    label=f"migration in flight ({r.config.overlap_slowdown:.0%} slower)" if i == 0 else None)
    for m in r.migrations:
        for ax in (top, bottom):
            ax.axvline(m.batch - 0.5, color="k", lw=0.7, ls="--", alpha=0.5, zorder=1)


def series_figure(results: list[RebalanceResult], title: str) -> Figure:
    """Per-batch end-to-end time and imbalance per series, rebalance points marked, one column per cluster;
    every batch from 0 is inside the axes, and coinciding series stay visible (:data:`SERIES_STYLES`)."""
    fig = figure(figsize=(7 * len(results), 6.6))
    axes = fig.subplots(2, len(results), sharex="col", squeeze=False)
    for c, r in enumerate(results):
        x = np.arange(r.num_batches)
        top, bottom = axes[0, c], axes[1, c]
        for key, style in SERIES_STYLES.items():
            if key in r.batch_ms:
                top.plot(x, r.batch_ms[key], label=_series_label(r, key), **style)
                bottom.plot(x, r.imbalance[key], label=_series_label(r, key), **style)
        _migration_marks(r, top, bottom, x)
        pad = max(0.6, 0.03 * r.num_batches)  # room for the first and last markers
        for ax in (top, bottom):
            ax.use_sticky_edges = False  # the bars' bases would pin an axis limit onto a data point
            ax.set_xlim(-pad, r.num_batches - 1 + pad)
            ax.margins(y=0.08)
            ax.autoscale_view()
        top.set_ylabel("end-to-end ms per batch")
        bottom.set_ylabel("imbalance (max-mean)/mean")
        bottom.set_xlabel("batch (dashed: rebalance)")
        top.set_title(plain_text(f"{r.cluster}: net {r.summary()['net_gain'] * 100:+.1f}% vs planned once"))
        handles, labels = top.get_legend_handles_labels()
        bottom.legend(handles, labels, fontsize=8, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(plain_text(title))
    fig.tight_layout()
    return fig


def plot_series(results: list[RebalanceResult], path: Path, title: str) -> None:
    """:func:`series_figure`, written to ``path``."""
    series_figure(results, title).savefig(path, dpi=110)


def sweep_row(result: RebalanceResult, redundant: int) -> dict[str, Any]:
    s = result.summary()
    return {"cluster": result.cluster, "redundant_experts": redundant, "every_batches": result.config.every_batches,
            "window_batches": result.config.window_batches, "batches": s["batches"], "rebalances": s["rebalances"],
            "skipped_rebalances": s["skipped_rebalances"],
            "static_ms": s["total_ms"]["static"], "rebalanced_ms": s["total_ms"]["rebalanced_with_migration"],
            "migration_ms": s["migration_cost_ms"], "gross_gain_pct": s["gross_gain"] * 100,
            "net_gain_pct": s["net_gain"] * 100, "GB_moved": s["GB_moved"],
            "static_imbalance": s["imbalance_mean"]["static"],
            "rebalanced_imbalance": s["imbalance_mean"]["rebalanced"]}


def write_sweep_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=SWEEP_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def sweep_break_even(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cluster and redundant count, the measured break-even interval: where the net saving crosses zero
    for good (from the last swept interval that loses to the first from which every longer one saves,
    linearly between the two). ``every_batches`` is None when no swept interval saves, when the saving is not
    kept at longer intervals, or when even the shortest swept interval saves (``below`` is then that interval:
    the break-even lies below it)."""
    out = []
    for cluster in dict.fromkeys(r["cluster"] for r in rows):
        mine = [r for r in rows if r["cluster"] == cluster]
        for red in sorted({r["redundant_experts"] for r in mine}):
            pts = sorted((r["every_batches"], r["net_gain_pct"]) for r in mine if r["redundant_experts"] == red)
            entry: dict[str, Any] = {"cluster": cluster, "redundant_experts": red, "every_batches": None,
                                     "between": None, "below": None}
            if pts[-1][1] > 0:
                start = next(i for i in range(len(pts)) if all(g > 0 for _, g in pts[i:]))
                if start == 0:
                    entry["below"] = pts[0][0]
                else:
                    (n0, g0), (n1, g1) = pts[start - 1], pts[start]
                    entry["every_batches"] = n0 + (n1 - n0) * (0.0 - g0) / (g1 - g0)
                    entry["between"] = [n0, n1]
            out.append(entry)
    return out


def sweep_verdict(rows: list[dict[str, Any]], reference_ms: dict[str, float] | None = None) -> list[str]:
    """Per cluster: the best (redundant, interval) by total time including migration, and per redundant count
    the measured break-even interval (:func:`sweep_break_even`). ``reference_ms``: the cluster's no-replica,
    never-rebalanced total, to state the overall saving."""
    out = []
    crossings = {(e["cluster"], e["redundant_experts"]): e for e in sweep_break_even(rows)}
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
            top = max(pts, key=lambda p: p[1])
            be = crossings[(cluster, red)]
            if top[1] <= 0:
                out.append(f"  {red} redundant: rebalancing costs more than it saves at every swept interval "
                           f"({', '.join(str(n) for n, _ in pts)} batches).")
            elif be["below"] is not None:
                span = f"{pts[0][0]} to {pts[-1][0]}" if len(pts) > 1 else f"{pts[0][0]}"
                out.append(f"  {red} redundant: every swept interval saves ({span} batches), "
                           f"best {top[1]:.1f}% net at every {top[0]}; the break-even interval is below "
                           f"{pts[0][0]} batches.")
            elif be["every_batches"] is None:
                out.append(f"  {red} redundant: saves only at " + ", ".join(f"every {n}" for n, g in pts if g > 0)
                           + f" batches (best {top[1]:.1f}% net at every {top[0]}).")
            else:
                (n0, n1) = be["between"]
                g0, g1 = dict(pts)[n0], dict(pts)[n1]
                out.append(f"  {red} redundant: below about {be['every_batches']:.1f} batches rebalancing costs "
                           f"more than it saves (net {g0:+.1f}% at every {n0}, {g1:+.1f}% at every {n1}; linear "
                           f"between them); best {top[1]:.1f}% net at every {top[0]}.")
    return out


def plot_tradeoff(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per cluster, two panels against the rebalance interval, one colour per redundant-expert count: mean ms
    per batch with migration included (planned once: flat dashed lines), and the saving vs planning once,
    net and before migration cost, with the break-even intervals marked."""
    clusters = list(dict.fromkeys(r["cluster"] for r in rows))
    crossings = {(e["cluster"], e["redundant_experts"]): e for e in sweep_break_even(rows)}
    fig = figure(figsize=(13, 5.4 * len(clusters)))
    axes = fig.subplots(len(clusters), 2, squeeze=False)
    for (left, right), cluster in zip(axes, clusters):
        mine = [r for r in rows if r["cluster"] == cluster]
        for red in sorted({r["redundant_experts"] for r in mine}):
            pts = sorted((r["every_batches"], r["net_gain_pct"], r["gross_gain_pct"],
                          r["rebalanced_ms"] / r["batches"], r["static_ms"] / r["batches"]) for r in mine
                         if r["redundant_experts"] == red)
            n = [p[0] for p in pts]
            line, = left.plot(n, [p[3] for p in pts], marker="o", label=f"{red} redundant, rebalanced")
            color = line.get_color()
            left.axhline(pts[0][4], color=color, ls="--", lw=1, label=f"{red} redundant, planned once")
            right.plot(n, [p[1] for p in pts], marker="o", color=color, label=f"{red} redundant, net")
            right.plot(n, [p[2] for p in pts], marker=".", ls=":", color=color,
                       label=f"{red} redundant, before migration")
            be = crossings[(cluster, red)]
            if be["between"] is not None:
                right.plot([be["every_batches"]], [0.0], marker="x", ms=10, mew=2, color=color, ls="none")
        left.set_ylabel("mean ms per batch, migration included")
        left.set_title(plain_text(f"{cluster}: time per batch"))
        right.axhline(0, color="k", lw=0.8)
        right.set_ylabel("saving vs planning once, %")
        right.set_title(plain_text(f"{cluster}: does rebalancing pay? (x: break-even)"))
        for ax in (left, right):
            ax.set_xlabel("rebalance every N batches")
            ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(plain_text(title))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def results_json(results: list[RebalanceResult],
                 infos: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ``rebalance`` entries of results.json: summary, migrations and verdict per cluster."""
    out = []
    for r in results:
        entry = r.summary()
        entry["migrations"] = [{"batch": m.batch, "switched_at": m.switched_at, "copies_moved": m.copies_moved,
                                "GB": m.bytes_moved / 1e9, "transfer_ms": m.transfer_s * 1e3} for m in r.migrations]
        entry["verdict"] = verdict(r, (infos or {}).get(r.cluster))
        out.append(entry)
    return out
