"""The terminal report: one table per cluster and a verdict saying which placement wins, by how much, why."""

from __future__ import annotations

from moesim.metrics.serving import headline
from moesim.metrics.summary import RunMetrics


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.0f}%" if old else "n/a"


def table(metrics: list[RunMetrics], cluster: str) -> str:
    rows = [m for m in metrics if m.cluster == cluster]
    head = ("placement", "e2e ms", "speedup", "a2a tail p50/p99 ms", "compute max/mean", "imbalance",
            "inter-node GB", "busiest link")
    body = []
    for m in rows:
        link = m.busiest_link
        body.append((
            m.placement,
            f"{m.e2e_ms['mean']:.2f}",
            f"{m.speedup_vs_baseline:.3f}x" if m.speedup_vs_baseline else "-",
            f"{m.a2a_tail_ms['p50']:.3f} / {m.a2a_tail_ms['p99']:.3f}",
            f"{m.compute_skew['max_over_mean']:.2f}",
            f"{m.compute_skew['imbalance']:.2f}",
            f"{m.traffic_GB['inter_node_per_batch']:.2f}",
            f"{link.get('kind', '')} {link.get('utilisation', 0) * 100:.0f}%",
        ))
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def verdict(metrics: list[RunMetrics], cluster: str, baseline: str) -> str:
    rows = [m for m in metrics if m.cluster == cluster]
    best = min(rows, key=lambda m: m.e2e_ms["mean"])
    base = next(m for m in rows if m.placement == baseline)
    if best.placement == baseline:
        return f"{cluster}: {baseline} (the baseline) is already the fastest placement."
    why = (f"a2a tail p99 {_pct(best.a2a_tail_ms['p99'], base.a2a_tail_ms['p99'])}, "
           f"slowest-GPU compute {_pct(best.compute_ms['mean'], base.compute_ms['mean'])} "
           f"(token skew {base.compute_skew['max_over_mean']:.2f} -> {best.compute_skew['max_over_mean']:.2f})")
    if base.traffic_GB["inter_node_per_batch"] > 0:
        inter = _pct(best.traffic_GB["inter_node_per_batch"], base.traffic_GB["inter_node_per_batch"])
        why += f", inter-node traffic {inter}"
    return (f"{cluster}: {best.placement} is fastest, {best.speedup_vs_baseline:.3f}x vs {baseline} "
            f"({base.e2e_ms['mean']:.2f} -> {best.e2e_ms['mean']:.2f} ms per batch); {why}.")


# moesim.metrics.summary.term_ms, in the order a layer runs them
TERMS = {"dense_layers": "dense layers", "attention": "attention", "route": "route", "shared_expert": "shared expert",
         "wait": "wait", "dispatch": "dispatch", "stream_wait": "stream wait", "experts": "experts",
         "expert_tp": "expert TP", "combine": "combine", "reduce": "reduce"}
ALWAYS = ("attention", "dispatch", "experts", "combine")  # shown even when zero


def term_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """One row per placement (name, :func:`moesim.metrics.summary.term_ms`), one column per term in ms per batch;
    a term that is zero in every row is left out (unless it is one of :data:`ALWAYS`), and ``total`` ends the row."""
    shown = [k for k in TERMS if k in ALWAYS or any(abs(t.get(k, 0.0)) > 0 for _, t in rows)]
    head = ("placement", *(TERMS[k] for k in shown), "total")
    body = [(name, *(f"{t.get(k, 0.0):.3f}" for k in shown), f"{sum(t.values()):.3f}") for name, t in rows]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def solve_summary(info: dict) -> str | None:
    """One line on how an optimising policy's answer was found and how far from optimal it may be."""
    if "gap" not in info:
        return None
    line = f"gap {info['gap'] * 100:.2f}% ({info.get('status', '?')}"
    if "load_gap" in info:
        line += f"; load term {info['load_gap'] * 100:.2f}%"
    line += f"), {info.get('method', '?')}/{info.get('solver', '?')}"
    if "solve_s" in info:
        line += f", {info['solve_s']:.1f} s"
    if info.get("greedy_objective"):
        change = (info["objective"] - info["greedy_objective"]) / info["greedy_objective"] * 100
        line += f"; objective {change:+.1f}% vs greedy's"
    return line


def format_report(metrics: list[RunMetrics], baseline: str) -> str:
    clusters = list(dict.fromkeys(m.cluster for m in metrics))
    parts = []
    for c in clusters:
        parts += [f"== {c} ==", table(metrics, c), ""]
    parts += ["Verdict:"] + [f"  {verdict(metrics, c, baseline)}" for c in clusters]
    if len(clusters) > 1:
        names = list(dict.fromkeys(m.placement for m in metrics))
        speed = {(m.cluster, m.placement): m.speedup_vs_baseline for m in metrics}
        parts += ["", "Speedup vs " + baseline + " by cluster:"]
        for n in names:
            cells = ", ".join(f"{c} {speed[(c, n)]:.3f}x" for c in clusters if speed.get((c, n)))
            parts.append(f"  {n}: {cells}")
    return "\n".join(parts)


def serving_lines(metrics: list[RunMetrics]) -> list[str]:
    """Per cluster and placement, the serving figures in one line (:func:`moesim.metrics.serving.headline`)."""
    return [f"  {m.cluster} / {m.placement}: {headline(m.serving)}" for m in metrics if m.serving is not None]
