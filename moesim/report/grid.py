"""A grid sweep's files: one JSON per finished point, the merged table (JSON and CSV), and its plots.

The output folder holds ``points/DIGEST.json`` (written atomically as each point finishes, so a killed sweep
keeps what it finished), ``sweep.json`` and ``sweep.csv`` (every point, every metric, in grid order), and two
plots: ``speedup_vs_gpus.png`` (per placement, the speedup over the baseline against the cluster's GPU count:
the single- to multi-node curve) when the GPU count varies, and ``heatmap.png`` (the speedup over two swept keys,
one panel per placement) when two keys vary. The merged files hold no wall times, so an interrupted and resumed
sweep writes the same bytes as an uninterrupted one. Each file is replaced atomically; the folder as a whole is
not swapped (the point files must outlive a killed run). Deliberately not here: running points
(:mod:`moesim.study.sweep`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from moesim.errors import InputError
from moesim.fileio import FolderKind, atomic_write, contains, figure, is_matplotlib_png, plain_text, starts_with
from moesim.study.grid import Axis, SweepPoint
from moesim.study.sweep import PointOutcome

GRID_FORMAT = "moesim.grid/1"
POINT_FORMAT = "moesim.grid-point/1"
# what a grid sweep writes into its folder (recognised when a later sweep resumes in it, or a run replaces the
# folder around it)
GRID_OUTPUTS = FolderKind(
    "moesim sweep --grid's outputs",
    files={"sweep.json": starts_with(b'{\n "format": "moesim.grid/'), "sweep.csv": starts_with(b"point,digest,"),
           "speedup_vs_gpus.png": is_matplotlib_png, "heatmap.png": is_matplotlib_png},
    folders={"points": FolderKind("finished sweep points",
                                  files={"*.json": contains(f'"format": "{POINT_FORMAT}"'.encode())})})


def write_point(out: Path, point: SweepPoint, outcome: PointOutcome) -> Path:
    """``points/DIGEST.json``: the point's values and rows (or error) and its wall time, atomically."""
    data = {"format": POINT_FORMAT, "digest": point.digest, "values": [[k, v] for k, v in point.values],
            "rows": None if outcome.rows is None else list(outcome.rows), "error": outcome.error,
            "seconds": round(outcome.seconds, 3)}
    text = json.dumps(data, indent=1) + "\n"
    return atomic_write(out / "points" / f"{point.digest}.json", lambda fh: fh.write(text))


def finished_points(out: Path, points: Sequence[SweepPoint]) -> dict[str, PointOutcome]:
    """The points of ``points`` that an earlier run in ``out`` finished without error, by digest; a point file
    that cannot be read (a run killed while writing leaves none: writes are atomic) is simply run again."""
    found: dict[str, PointOutcome] = {}
    for p in points:
        path = out / "points" / f"{p.digest}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows = data.get("rows") if isinstance(data, dict) else None
        if data.get("format") == POINT_FORMAT and data.get("digest") == p.digest and isinstance(rows, list):
            found[p.digest] = PointOutcome(p.index, p.digest, tuple(rows), None, float(data.get("seconds", 0.0)))
    return found


def columns(rows: list[dict[str, Any]], failures: list[dict[str, Any]]) -> list[str]:
    """Every column of the merged table, in first-seen order."""
    return list(dict.fromkeys(k for r in [*rows, *failures] for k in r))


def write_merged(out: Path, scenario: str, axes: list[Axis], points: Sequence[SweepPoint], rows: list[dict[str, Any]],
                 failures: list[dict[str, Any]], baseline: str) -> list[str]:
    """sweep.json and sweep.csv (failed points in the CSV with their ``error`` and no metrics)."""
    data = {"format": GRID_FORMAT, "scenario": scenario, "baseline": baseline,
            "axes": [{"key": a.key, "values": list(a.values)} for a in axes],
            "points": [{"point": p.index, "digest": p.digest, **dict(p.values)} for p in points],
            "rows": rows, "failures": failures}
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(out / "sweep.json", lambda fh: fh.write(text))
    buf = io.StringIO()
    cols = columns(rows, failures)
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in sorted([*rows, *failures], key=lambda r: r["point"]):  # stable: rows keep their order in a point
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    atomic_write(out / "sweep.csv", lambda fh: fh.write(buf.getvalue()))
    return ["sweep.json", "sweep.csv"]


def _others(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """Swept keys other than ``keys`` whose values vary among ``rows``."""
    return [k for k in keys if len({json.dumps(r.get(k)) for r in rows}) > 1]


def plot_speedup_vs_gpus(rows: list[dict[str, Any]], keys: Sequence[str], baseline: str, path: Path | IO[bytes],
                         title: str) -> bool:
    """Speedup over ``baseline`` against GPU count, one line per placement (and per value of any other varying
    key that does not change the GPU count, up to 12 lines). Returns False (nothing drawn) when the GPU count
    does not vary."""
    if len({r["gpus"] for r in rows}) < 2:
        return False
    split = [k for k in _others(rows, keys) if not _determines_gpus(rows, k)]
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("speedup_vs_baseline") is None:
            continue
        label = ", ".join(f"{k}={r.get(k)}" for k in split)
        groups.setdefault((r["placement"], label), []).append((r["gpus"], r["speedup_vs_baseline"]))
    fig = figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    for (placement, label), pts in list(groups.items())[:12]:
        xs = sorted({g for g, _ in pts})
        ys = [float(np.mean([s for g, s in pts if g == x])) for x in xs]
        ls = "--" if placement == baseline else "-"
        ax.plot(xs, ys, marker="o", ls=ls, label=plain_text(placement + (f" ({label})" if label else "")))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["gpus"] for r in rows}), [str(g) for g in sorted({r["gpus"] for r in rows})])
    ax.set_xlabel("GPUs in the cluster")
    ax.set_ylabel(plain_text(f"end-to-end speedup vs {baseline}"))
    ax.set_title(plain_text(title), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return True


def _determines_gpus(rows: list[dict[str, Any]], key: str) -> bool:
    """Whether the value of ``key`` alone fixes the GPU count (a key such as cluster.nodes)."""
    seen: dict[str, int] = {}
    for r in rows:
        v = json.dumps(r.get(key))
        if seen.setdefault(v, r["gpus"]) != r["gpus"]:
            return False
    return True


def plot_heatmap(rows: list[dict[str, Any]], keys: Sequence[str], baseline: str, path: Path | IO[bytes], title: str,
                 pair: tuple[str, str] | None = None) -> bool:
    """Speedup over ``baseline`` over two swept keys (``pair``, else the first two that vary), one panel per
    other placement, each cell the mean over everything else that varies (clusters, other keys). Returns False
    (nothing drawn) when fewer than two keys vary."""
    varying = _others(rows, keys)
    if pair is None:
        if len(varying) < 2:
            return False
        pair = (varying[0], varying[1])
    xk, yk = pair
    xs = list(dict.fromkeys(json.dumps(r.get(xk)) for r in rows))
    ys = list(dict.fromkeys(json.dumps(r.get(yk)) for r in rows))
    names = [n for n in dict.fromkeys(r["placement"] for r in rows) if n != baseline]
    if not names:
        return False
    fig = figure(figsize=(1.2 + 3.6 * len(names), 0.9 + 0.45 * len(ys) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    values = [r["speedup_vs_baseline"] for r in rows if r["placement"] in names and r.get("speedup_vs_baseline")]
    lo, hi = min(values, default=1.0), max(values, default=1.0)
    im = None
    for ax, name in zip(axes, names):
        grid = np.full((len(ys), len(xs)), np.nan)
        for j, yv in enumerate(ys):
            for i, xv in enumerate(xs):
                cell = [r["speedup_vs_baseline"] for r in rows if r["placement"] == name
                        and json.dumps(r.get(xk)) == xv and json.dumps(r.get(yk)) == yv
                        and r.get("speedup_vs_baseline") is not None]
                if cell:
                    grid[j, i] = float(np.mean(cell))
        im = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-9), aspect="auto", origin="lower")
        for j in range(len(ys)):
            for i in range(len(xs)):
                if not np.isnan(grid[j, i]):
                    bright = (grid[j, i] - lo) / max(hi - lo, 1e-9) > 0.6  # viridis turns yellow: dark text
                    ax.text(i, j, f"{grid[j, i]:.2f}x", ha="center", va="center", fontsize=8,
                            color="k" if bright else "w")
        ax.set_xticks(range(len(xs)), [plain_text(v) for v in xs], fontsize=8)
        ax.set_yticks(range(len(ys)), [plain_text(v) for v in ys], fontsize=8)
        ax.set_xlabel(plain_text(xk))
        ax.set_ylabel(plain_text(yk))
        ax.set_title(plain_text(name))
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.85, label=plain_text(f"speedup vs {baseline}"))
    rest = [k for k in varying if k not in pair] + (["cluster"] if len({r["cluster"] for r in rows}) > 1 else [])
    fig.suptitle(plain_text(title + (f" (mean over {', '.join(rest)})" if rest else "")), fontsize=10)
    fig.savefig(path, dpi=110, format="png")
    return True


def write_plots(out: Path, rows: list[dict[str, Any]], keys: Sequence[str], baseline: str, scenario: str,
                pair: tuple[str, str] | None = None) -> list[str]:
    """The plots the table allows, each written atomically; returns the names written."""
    if pair is not None:
        for k in pair:
            if k not in keys:
                raise InputError(f"{k!r} is not a swept key; swept: {', '.join(keys)}", field="--heatmap")
    written = []
    ok = [r for r in rows if r.get("speedup_vs_baseline") is not None]
    drawers: list[tuple[str, Callable[[IO[bytes]], bool]]] = [
        ("speedup_vs_gpus.png", lambda fh: plot_speedup_vs_gpus(ok, keys, baseline, fh,
                                                                f"{scenario}: speedup vs GPU count, per placement")),
        ("heatmap.png", lambda fh: plot_heatmap(ok, keys, baseline, fh, f"{scenario}: speedup", pair))]
    for name, draw in drawers:
        buf = io.BytesIO()
        if draw(buf):
            data = buf.getvalue()
            atomic_write(out / name, lambda fh: fh.write(data), binary=True)
            written.append(name)
        else:  # an older sweep's plot in this folder would describe another grid
            (out / name).unlink(missing_ok=True)
    return written
