"""What a training study prints and writes: a table per cluster (step time, tokens/s, speedup, where the step's
time goes, imbalance, memory), the verdict, and the files ``training.json`` (format ``moesim.training/1``: every
layout's summary), ``training_steps.csv`` (one row per cluster, layout and step) and ``training.png`` (step time
per step, one line per layout). Written atomically into the run's folder (:func:`moesim.fileio.output_folder`)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from moesim.fileio import FolderKind, contains, figure, is_matplotlib_png, output_folder, starts_with
from moesim.study.training import TrainingResult, verdict

TRAINING_FORMAT = "moesim.training/1"
TRAIN_OUTPUTS = FolderKind(
    "moesim run's training outputs",
    files={"training.json": contains(f'"format": "{TRAINING_FORMAT}"'.encode(), within=1 << 20),
           "training_steps.csv": starts_with(b"cluster,layout,step,"),
           "training.png": is_matplotlib_png})
STEP_FIELDS = ("step", "compute", "bubble", "fssdp", "grad_sync", "optimizer", "migration")


def table(result: TrainingResult, cluster: str) -> str:
    """One row per layout of ``cluster``."""
    head = ("layout", "step ms", "tokens/s", "speedup", "compute", "fssdp", "grad sync", "optim", "migr",
            "wait/mb", "imbalance", "overlap", "memory GB")
    rows = [head]
    for s in result.summary()["runs"]:
        if s["cluster"] != cluster:
            continue
        ms, mem = s["step_ms"], s["memory_GB"]
        fits = "" if s["fits"] else " (>" + f"{mem['capacity']:.0f})"
        rows.append((s["layout"], f"{ms['step']:.1f}", f"{s['tokens_per_s']:,.0f}", f"{s['speedup_vs_baseline']:.3f}x",
                     f"{ms['compute']:.1f}", f"{ms['fssdp']:.1f}", f"{ms['grad_sync']:.1f}", f"{ms['optimizer']:.1f}",
                     f"{ms['migration']:.1f}", f"{s['micro_batch_ms'].get('wait', 0.0):.1f}",
                     f"{s['imbalance']:.2f}", f"{s['overlap_share']:.0%}", f"{mem['total']:.1f}{fits}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def format_report(result: TrainingResult) -> str:
    clusters = list(dict.fromkeys(r.cluster for r in result.runs))
    parts = [f"== {c} ==\n{table(result, c)}" for c in clusters]
    legend = ("(ms per step: compute = micro-batches' forward and backward; fssdp = exposed sparse all-gathers and "
              "reduce-scatters; grad sync = exposed gradient all-reduce; wait/mb = mean time a GPU waits for the "
              "slowest to join an all-to-all, per micro-batch; imbalance = (max - mean) / mean expert rows per GPU; "
              "overlap = communication hidden under compute, DualPipe)")
    return "\n\n".join(parts) + "\n" + legend + "\n\nVerdict:\n" + "\n".join(f"  {v}" for v in verdict(result))


def _rows(result: TrainingResult) -> list[dict[str, Any]]:
    rows = []
    for r in result.runs:
        for b, (s, imb) in enumerate(zip(r.step_s, r.imbalance)):
            rows.append({"cluster": r.cluster, "layout": r.name, "step": b,
                         **{f"{k}_ms": round(s[k] * 1e3, 6) for k in STEP_FIELDS}, "imbalance": round(imb, 6)})
    return rows


def _plot(result: TrainingResult, path: Path) -> None:
    clusters = list(dict.fromkeys(r.cluster for r in result.runs))
    fig = figure(figsize=(7, 3 * len(clusters)))
    for i, c in enumerate(clusters):
        ax = fig.add_subplot(len(clusters), 1, i + 1)
        for r in result.runs:
            if r.cluster == c:
                ax.plot([s["step"] * 1e3 for s in r.step_s], marker="o", label=r.name)
        ax.set_title(f"{c}: step time per step")
        ax.set_xlabel("step")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_training_outputs(result: TrainingResult, out_dir: str | os.PathLike[str], *,
                           plots_on: bool = True) -> list[Path]:
    """Write the training study's files into ``out_dir`` (replacing an older run's as a whole)."""
    out = Path(out_dir)
    with output_folder(out, TRAIN_OUTPUTS) as tmp:
        summary = {**result.summary(), "format": TRAINING_FORMAT}
        (tmp / "training.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        with open(tmp / "training_steps.csv", "w", newline="") as fh:
            fields = ["cluster", "layout", "step", *(f"{k}_ms" for k in STEP_FIELDS), "imbalance"]
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(_rows(result))
        if plots_on:
            _plot(result, tmp / "training.png")
        written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    return [out / rel for rel in written]
