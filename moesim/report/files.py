"""Result files: results.json, per-layer per-GPU CSV, placements, plots, timeline - all or nothing.

Everything is first written into a fresh temporary folder beside the output folder, which replaces it only
when every file is complete (:func:`moesim.fileio.output_folder`): a failure or Ctrl-C leaves the older
outputs as they were, and a folder holding files moesim did not write is refused before anything is written,
never mixed into. Cluster and placement names become file names only through :func:`moesim.fileio.safe_names`
(``placements/CLUSTER/PLACEMENT.json``), so no name can point outside the folder. results.json holds no
wall-clock times or paths of this machine, so the same scenario and seed give a byte-identical file - apart
from the ``placement_info.solve_s`` an optimising policy reports (its own wall time).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moesim.fileio import FolderKind, contains, is_matplotlib_png, output_folder, safe_names, starts_with
from moesim.placement.format import is_placement_file, save_placement
from moesim.report import plots, timeline
from moesim.report import rebalance as rebalance_report
from moesim.report import serving as serving_report
from moesim.report.grid import GRID_OUTPUTS
from moesim.study.runner import StudyResult

RESULTS_FORMAT = "moesim.results/1"

# what ``moesim run`` writes into its folder: an older run's folder holding only these is replaced whole
RUN_OUTPUTS = FolderKind(
    "moesim run's outputs",
    files={"results.json": contains(f'"format": "{RESULTS_FORMAT}"'.encode(), within=1 << 26),
           "per_gpu_layer.csv": starts_with(b"cluster,placement,batch,"),
           "rebalance.csv": starts_with(b"cluster,batch,plan_version,"),
           "timeline.json": starts_with(b'{"traceEvents":'),
           **{png: is_matplotlib_png for png in ("speedup.png", "gpu_load.png", "a2a_tail.png", "rebalance.png")}},
    folders={"placements": FolderKind("placements", folders={
        "*": FolderKind("placements", files={"*.json": is_placement_file})})},
    # moesim sweep's, sweep --grid's and serving's default folders lie inside the run's
    keep={"sweep": rebalance_report.SWEEP_OUTPUTS, "grid": GRID_OUTPUTS, "serving": serving_report.SERVING_OUTPUTS})
# dense_layers_ms: the dense transformer layers run before this MoE layer; dense_ms: the MoE layer's attention;
# route_ms: the pipeline's steps before the dispatch; shared_expert_ms: the shared experts (docs/formats.md)
CSV_FIELDS = ("cluster", "placement", "batch", "layer", "gpu", "ep_rank", "tokens", "recv_copies", "dense_layers_ms",
              "dense_ms", "route_ms", "shared_expert_ms", "dispatch_ms", "compute_ms", "combine_ms", "reduce_ms",
              "sync_wait_ms", "bytes_out_intra", "bytes_out_inter")


def _round(x: Any, digits: int = 6) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def results_json(result: StudyResult) -> dict[str, Any]:
    sc = result.scenario
    runs = []
    for run in result.runs:
        rec = run.records
        entry = run.metrics.to_json()
        entry["simulation"] = {"events": rec.events, "flows": rec.flows, "rate_recomputations": rec.recomputations,
                               "simulated_ms": rec.sim_time * 1e3}
        if run.placement.info:  # what the policy reports: e.g. the ILP's objective, bound, gap, solve time
            entry["placement_info"] = dict(run.placement.info)
        runs.append(entry)
    clusters = [{"name": c.name, "tp": c.tp, "ep": c.ep, "spec": c.spec.model_dump(mode="json")} for c in sc.clusters]
    return _round({
        "format": RESULTS_FORMAT,
        "scenario": sc.name,
        "baseline": sc.baseline,
        "model": sc.model.model_dump(mode="json"),
        "engine": sc.engine.model_dump(mode="json", exclude={"progress"}),
        "gpu_clock": "sustained" if sc.sustained else "boost",  # engine.clock resolved (auto by kernels and phase)
        "clusters": clusters,
        "workload": result.workloads,
        "runs": runs,
        **({"rebalance": rebalance_report.results_json(result.rebalance, rebalance_infos(result))}
           if result.rebalance else {}),
    })


def rebalance_infos(result: StudyResult) -> dict[str, dict[str, Any]]:
    """Per cluster, the info of the re-planned placement (its redundant-expert count, for the verdict)."""
    cfg = result.scenario.rebalance
    return {r.cluster.name: r.placement.info for r in result.runs if cfg is not None and r.name == cfg.policy}


def placement_files(result: StudyResult) -> dict[tuple[str, str], Path]:
    """(cluster name, placement name) -> where its placement JSON goes in the output folder:
    ``placements/CLUSTER/PLACEMENT.json``, each name made a safe, distinct file name (:func:`safe_names`)."""
    clusters = safe_names(r.cluster.name for r in result.runs)
    per_cluster: dict[str, list[str]] = {}
    for r in result.runs:
        per_cluster.setdefault(r.cluster.name, []).append(r.name)
    return {(c, n): Path("placements") / clusters[c] / f"{f}.json"
            for c, names in per_cluster.items() for n, f in safe_names(names).items()}


def write_csv(result: StudyResult, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for run in result.runs:
            g = run.records.gpu
            B, L, G = g["tokens"].shape
            b, l, gpu = (a.ravel() for a in np.meshgrid(np.arange(B), np.arange(L), np.arange(G), indexing="ij"))
            ms = lambda x: (x.ravel() * 1e3).round(6)  # noqa: E731
            cols = [
                b, l, gpu, gpu // run.records.tp, g["tokens"].ravel().astype(np.int64),
                g["recv_copies"].ravel().astype(np.int64),
                ms(g["t_attn_start"] - g["t_layer_start"]),
                ms(g["t_dense_end"] - g["t_attn_start"]),
                ms(g["t_shared_start"] - g["t_dense_end"]),
                ms(g["t_dispatch_join"] - g["t_shared_start"]),
                ms(g["t_dispatch_done"] - g["t_dispatch_start"]),
                ms(g["t_compute_end"] - g["t_compute_start"]),
                ms(g["t_combine_done"] - g["t_combine_start"]),
                ms(g["t_layer_end"] - g["t_combine_done"]),
                ms((g["t_dispatch_start"] - g["t_dispatch_join"]) + (g["t_combine_start"] - g["t_combine_join"])),
                g["bytes_out_intra"].ravel().astype(np.int64), g["bytes_out_inter"].ravel().astype(np.int64),
            ]
            for row in zip(*cols):
                w.writerow((run.cluster.name, run.name, *(x.item() for x in row)))


def write_outputs(result: StudyResult, out_dir: str | os.PathLike[str], *, plots_on: bool = True) -> list[Path]:
    """Write every result file into ``out_dir``, replacing an older run's outputs there as a whole; returns the
    paths written. A path that cannot take them (a file, under a file, not writable, a folder holding files
    moesim did not write) is an InputError, raised before anything is written."""
    out = Path(out_dir)
    with output_folder(out, RUN_OUTPUTS) as tmp:
        (tmp / "results.json").write_text(json.dumps(results_json(result), indent=1, sort_keys=True) + "\n")
        write_csv(result, tmp / "per_gpu_layer.csv")
        files = placement_files(result)
        for run in result.runs:
            save_placement(run.placement, tmp / files[(run.cluster.name, run.name)])
        timeline.write(result, tmp / "timeline.json")
        if result.rebalance:  # per-batch series with rebalance points (moesim.study.rebalance)
            rebalance_report.write_series_csv(result.rebalance, tmp / "rebalance.csv")
            if plots_on:
                rebalance_report.plot_series(
                    result.rebalance, tmp / "rebalance.png",
                    f"scenario {result.scenario.name}: end-to-end time and imbalance per batch")
        if plots_on:
            plots.write_all(result, tmp)
        written = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    return [out / rel for rel in written]
