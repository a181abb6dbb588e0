"""The team's question: EP, EP with rearrangement and FSSDP across expert skew and cluster sizes.

:func:`sweep` runs a training scenario (given as plain data, what a YAML file loads to) once per (cluster size,
skew) - the first cluster's ``nodes`` and the synthetic workload's ``zipf_alpha`` replaced - and returns one
flat row per layout: step time, tokens/s, speedup over the scenario's baseline layout, the reasons (straggler
wait, all-to-all time, FSSDP's exposed collectives, imbalance) and memory (a layout that does not fit its
GPUs is kept, flagged ``fits: false``; a model whose every layout cannot even hold its weights, refused by the
study's memory check, gives rows with ``error``). :func:`crossovers` reads the rows: per model and size, the
lowest skew at which each layout beats the baseline. Rows are analysed afterwards (a notebook, a benchmark
script); nothing here writes files.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import numpy as np

from moesim.errors import InputError
from moesim.study.config import parse_scenario
from moesim.study.training import TrainingResult, run_training


def _rows(result: TrainingResult, gpus: int, alpha: float) -> list[dict[str, Any]]:
    out = []
    for r, s in zip(result.runs, result.summary()["runs"]):
        terms = r.terms_ms()
        out.append({"model": result.scenario.model.name, "gpus": gpus, "zipf_alpha": alpha, "layout": r.name,
                    "kind": r.kind, "step_ms": s["step_ms"]["step"], "tokens_per_s": s["tokens_per_s"],
                    "speedup": s["speedup_vs_baseline"], "fits": s["fits"], "memory_GB": s["memory_GB"]["total"],
                    "imbalance": s["imbalance"], "wait_ms": terms.get("wait", 0.0),
                    "a2a_ms": sum(terms.get(k, 0.0) for k in ("dispatch", "combine", "combine_bwd", "dispatch_bwd")),
                    "fssdp_ms": s["step_ms"]["fssdp"], "grad_sync_ms": s["step_ms"]["grad_sync"],
                    "migration_ms": s["step_ms"]["migration"], "error": ""})
    return out


def sweep(data: dict[str, Any], *, nodes: Iterable[int], alphas: Iterable[float], source: str = "sweep",
          progress: Callable[[str], object] | None = None) -> list[dict[str, Any]]:
    """One training study per (nodes, zipf_alpha) of scenario ``data`` (module docstring)."""
    rows: list[dict[str, Any]] = []
    for n in nodes:
        for alpha in alphas:
            d = copy.deepcopy(data)
            d["clusters"] = [{**d["clusters"][0], "nodes": int(n)}]
            d["workload"]["synthetic"]["zipf_alpha"] = float(alpha)
            scenario = parse_scenario(d, source)
            assert scenario.training is not None
            gpus = scenario.clusters[0].spec.num_gpus
            try:
                result = run_training(scenario)
            except InputError as exc:  # e.g. the experts' weights alone exceed the GPUs' memory
                rows += [{"model": scenario.model.name, "gpus": gpus, "zipf_alpha": float(alpha), "layout": lay.name,
                          "kind": lay.kind, "fits": False, "error": exc.detail} for lay in scenario.training.layouts]
                continue
            rows += _rows(result, gpus, float(alpha))
            if progress is not None:
                progress(f"{scenario.model.name} {gpus} GPUs alpha {alpha:g}")
    return rows


def crossovers(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """Per model and GPU count: the fastest layout that fits at each skew, and the lowest skew at which each
    other layout that fits beats ``baseline`` (or that it never does in the grid)."""
    lines = []
    keys = sorted({(r["model"], r["gpus"]) for r in rows})
    for model, gpus in keys:
        here = [r for r in rows if r["model"] == model and r["gpus"] == gpus and not r.get("error")]
        if not here:
            why = next(r["error"] for r in rows if r["model"] == model and r["gpus"] == gpus)
            lines.append(f"{model} on {gpus} GPUs: not run ({why})")
            continue
        alphas = sorted({r["zipf_alpha"] for r in here})
        best = []
        for a in alphas:
            fit = [r for r in here if r["zipf_alpha"] == a and r["fits"]]
            top = max(fit, key=lambda r: r["speedup"]) if fit else None
            best.append(f"{a:g}: {top['layout']} {top['speedup']:.2f}x" if top else f"{a:g}: nothing fits")
        wins = []
        for name in dict.fromkeys(r["layout"] for r in here if r["layout"] != baseline):
            won = [r["zipf_alpha"] for r in here if r["layout"] == name and r["speedup"] > 1.0]
            top = max(r["speedup"] for r in here if r["layout"] == name)
            oom = sorted({r["zipf_alpha"] for r in here if r["layout"] == name and not r["fits"]})
            note = f" (out of memory at alpha {', '.join(f'{a:g}' for a in oom)})" if oom else ""
            wins.append((f"{name} wins from alpha {min(won):g}, up to {top:.2f}x" if won else f"{name} never wins")
                        + note)
        lines.append(f"{model} on {gpus} GPUs - fastest by skew ({'; '.join(best)}); {', '.join(wins)}")
    return lines


def best_speedup(rows: list[dict[str, Any]], kind: str) -> float:
    """The largest speedup over the baseline any layout of ``kind`` reaches (fitting in memory) in the rows."""
    got = [r["speedup"] for r in rows if r.get("kind") == kind and r.get("fits") and not r.get("error")]
    return float(np.max(got)) if got else float("nan")
