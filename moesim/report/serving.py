"""The serving sweep's outputs: a table, serving.csv, serving.json and the latency-throughput plot serving.png.

Pure functions of the sweep rows (:func:`moesim.study.serving.serving_sweep`), and :func:`write_serving`, which
writes them all at once into a folder (:func:`moesim.fileio.output_folder`: the older outputs or the new ones,
never a mix). The plot puts throughput per GPU against latency (the time of a forward: TPOT in decode), one line
per cluster and placement, each point labelled by its batch.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from moesim.fileio import FolderKind, figure, is_matplotlib_png, output_folder, plain_text, starts_with
from moesim.study.serving import ROW_FIELDS

SERVING_FORMAT = "moesim.serving/1"
# what ``moesim serving`` writes into its folder (recognised when a later sweep replaces it)
SERVING_OUTPUTS = FolderKind("moesim serving's outputs", files={
    "serving.csv": starts_with(",".join(ROW_FIELDS[:3]).encode()),
    "serving.json": starts_with(f'{{\n "format": "{SERVING_FORMAT}"'.encode()),
    "serving.png": is_matplotlib_png})

_UNITS = {"prefill": ("tokens/GPU", "input tok/s", "ms/forward"), "decode": ("requests/GPU", "output tok/s", "TPOT ms"),
          "batch": ("tokens/GPU", "tok/s", "ms/forward")}


def serving_table(rows: list[dict[str, Any]]) -> str:
    """The sweep as a table: one row per (cluster, placement, batch), throughput per GPU and per node, latency."""
    phase = rows[0]["phase"] if rows else "batch"
    batch, rate, latency = _UNITS[phase]
    head: tuple[str, ...] = ("cluster", "placement", batch, f"{rate} per GPU", f"{rate} per node", latency, "p99 ms")
    if phase == "decode":
        head += ("tok/s per request",)
    body = []
    for r in rows:
        cells: tuple[str, ...] = (r["cluster"], r["placement"], f"{r['batch']:,}", f"{r['tokens_per_s_per_gpu']:,.0f}",
                 f"{r['tokens_per_s_per_node']:,.0f}", f"{r['forward_ms']:.3f}", f"{r['forward_ms_p99']:.3f}")
        if phase == "decode":
            cells += (f"{r['output_tokens_per_s_per_request']:.1f}",)
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def _short(value: Any) -> Any:
    """A float to 6 significant digits (as results.json keeps them); anything else as it is."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def write_serving_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(ROW_FIELDS)
        for r in rows:
            w.writerow(["" if r.get(k) is None else _short(r[k]) for k in ROW_FIELDS])


def plot_serving(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput per GPU against latency, one line per (cluster, placement) in the order of the batch, each point
    labelled by its batch."""
    phase = rows[0]["phase"] if rows else "batch"
    batch, rate, latency = _UNITS[phase]
    fig = figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for key in dict.fromkeys((r["cluster"], r["placement"]) for r in rows):
        pts = sorted((r["batch"], r["forward_ms"], r["tokens_per_s_per_gpu"]) for r in rows
                     if (r["cluster"], r["placement"]) == key)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=plain_text(" / ".join(key)))
        for b, x, y in pts:
            ax.annotate(f"{b:,}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"latency: {latency} (a forward of the batch)")
    ax.set_ylabel(f"throughput: {rate} per GPU")
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}")
    ax.set_xlim(0, max((r["forward_ms"] for r in rows), default=1.0) * 1.1)  # room for the labels
    ax.set_ylim(0, max((r["tokens_per_s_per_gpu"] for r in rows), default=1.0) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(title=f"cluster / placement (points: {batch})", fontsize=8)
    ax.set_title(plain_text(title))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def serving_json(rows: list[dict[str, Any]], scenario: str) -> dict[str, Any]:
    return {"format": SERVING_FORMAT, "scenario": scenario,
            "rows": [{k: _short(v) for k, v in r.items() if v is not None} for r in rows]}


def write_serving(rows: list[dict[str, Any]], scenario: str, out: str | os.PathLike[str], *,
                  plots_on: bool = True) -> list[str]:
    """serving.csv, serving.json and (with ``plots_on``) serving.png into ``out``, all or nothing; returns the names
    written. A folder holding files moesim did not write is an InputError, raised before anything is written."""
    with output_folder(out, SERVING_OUTPUTS) as tmp:
        write_serving_csv(rows, tmp / "serving.csv")
        (tmp / "serving.json").write_text(json.dumps(serving_json(rows, scenario), indent=1) + "\n")
        if plots_on:
            plot_serving(rows, tmp / "serving.png", f"{scenario}: throughput vs latency by batch")
        return sorted(p.name for p in tmp.iterdir())
