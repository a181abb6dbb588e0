"""A Chrome / Perfetto trace (``timeline.json``) of the first batch: one process per run, one track per GPU.

Open it at ui.perfetto.dev or chrome://tracing. Slices: dense_layers (the dense transformer layers before an MoE
layer, with their count), dense (the MoE layer's attention), route (the kernel pipeline's steps before the
dispatch), shared_expert, wait (for the slowest GPU to join a collective), dispatch, compute (experts), combine,
reduce. With many GPUs and runs only the baseline and the fastest placement of each cluster are kept, to stay
loadable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moesim.study.runner import Run, StudyResult

MAX_EVENTS = 400_000
SPANS = (  # (slice, from, to): the GPU record fields (moesim.sim.engine.GPU_FIELDS) bounding each slice
    ("dense_layers", "t_layer_start", "t_attn_start"),
    ("dense", "t_attn_start", "t_dense_end"),
    ("route", "t_dense_end", "t_shared_start"),
    ("shared_expert", "t_shared_start", "t_dispatch_join"),
    ("wait", "t_dispatch_join", "t_dispatch_start"),
    ("dispatch", "t_dispatch_start", "t_dispatch_done"),
    ("compute", "t_compute_start", "t_compute_end"),
    ("wait", "t_combine_join", "t_combine_start"),
    ("combine", "t_combine_start", "t_combine_done"),
    ("reduce", "t_combine_done", "t_layer_end"),
)


def _runs_to_show(result: StudyResult) -> list[Run]:
    runs = result.runs
    per_run = sum(r.records.gpu["tokens"].shape[1] * r.records.num_gpus * 6 for r in runs[:1])
    if per_run * len(runs) <= MAX_EVENTS:
        return runs
    keep = []
    for cluster in dict.fromkeys(r.cluster.name for r in runs):
        mine = [r for r in runs if r.cluster.name == cluster]
        best = min(mine, key=lambda r: r.metrics.e2e_ms["mean"])
        base = next((r for r in mine if r.name == result.scenario.baseline), best)
        keep += [base] if base is best else [base, best]
    return keep


def events(result: StudyResult) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pid, run in enumerate(_runs_to_show(result)):
        g = run.records.gpu
        out.append({"ph": "M", "pid": pid, "name": "process_name",
                    "args": {"name": f"{run.cluster.name} / {run.name}"}})
        L, G = g["tokens"].shape[1:]
        dense_before = result.scenario.model.dense_layers_before
        for gpu in range(G):
            out.append({"ph": "M", "pid": pid, "tid": gpu, "name": "thread_name", "args": {"name": f"GPU {gpu}"}})
            for layer in range(L):
                at = lambda k: float(g[k][0, layer, gpu]) * 1e6  # noqa: E731  (us)
                for name, a, b in SPANS:
                    dur = at(b) - at(a)
                    if dur > 0:
                        args = {"layer": layer}
                        if name == "compute":
                            args["tokens"] = int(g["tokens"][0, layer, gpu])
                        elif name == "dense_layers":
                            args["dense_layers"] = len(dense_before(layer))
                        out.append({"ph": "X", "pid": pid, "tid": gpu, "name": name, "cat": name,
                                    "ts": round(at(a), 3), "dur": round(dur, 3), "args": args})
    return out


def write(result: StudyResult, path: Path) -> None:
    path.write_text(json.dumps({"traceEvents": events(result), "displayTimeUnit": "ms"}, separators=(",", ":")))
