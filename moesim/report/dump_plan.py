"""``moesim plan``'s report and files: the comparison table, the verdict, ``plan.json``, the winning map.

The folder holds ``report.txt`` (what the command printed), ``plan.json`` (format ``moesim.plan/1``: every
candidate's scores, the split, the staleness curve and the verdict), ``placements/NAME.json`` (every candidate
in moesim's format, for ``moesim export`` or a scenario) and the winner in the engine's format
(the writer's ``file_name``). Ignored: plots (the table carries the few numbers there are).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moesim.fileio import FolderKind, contains, output_folder, safe_name, starts_with
from moesim.placement.export import WRITERS, LayerLayout, export_placement, get_writer
from moesim.placement.format import is_placement_file, save_placement
from moesim.study.dump_plan import GAIN_ERROR, DumpPlan, Verdict, expressible

FORMAT = "moesim.plan/1"
MAP_FILES = {w.name: w.file_name for w in WRITERS}  # the winning map's file, by engine
PLAN_OUTPUTS = FolderKind(
    "moesim plan's outputs",
    files={"plan.json": contains(f'"format": "{FORMAT}"'.encode()), "report.txt": starts_with(b"moesim plan"),
           **{name: get_writer(engine).owned for engine, name in MAP_FILES.items()}},
    folders={"placements": FolderKind("placements", files={"*.json": is_placement_file})})


def plan_table(plan: DumpPlan, engine: str) -> str:
    """One row per candidate: redundant experts, imbalance in and out of sample, simulated time, gain."""
    cur = plan.get("current").e2e_ms or 0.0
    head = (f"{'placement':<14}{'redundant':>10}{'max/mean in':>13}{'max/mean out':>14}{'(max-mean)/mean':>17}"
            f"{'e2e ms':>10}{'vs current':>12}")
    rows = [head]
    for c in plan.candidates:
        gain = f"{cur / c.e2e_ms:.3f}x" if c.e2e_ms and cur else "-"
        e2e = f"{c.e2e_ms:.3f}" if c.e2e_ms is not None else "-"
        why = expressible(c, engine)
        note = f"  ({engine} cannot load it: {why.split(':')[0]})" if why else ""
        rows.append(f"{c.name:<14}{c.redundant:>10}{c.imbalance_in:>13.3f}{c.imbalance_out:>14.3f}"
                    f"{c.trtllm_imbalance:>17.3f}{e2e:>10}{gain:>12}{note}")
    return "\n".join(rows)


def plan_report(plan: DumpPlan, v: Verdict, engine: str, dump: str, cluster: str, model: str) -> str:
    lines = [f"moesim plan {dump}: {model} on {cluster}, for {engine}",
             f"  {plan.split}",
             f"  max/mean: the busiest EP rank's token-expert pairs over the mean, per layer and window, averaged "
             f"(TensorRT-LLM's imbalance ratio is (max-mean)/mean); e2e: one simulated batch of "
             f"{plan.batch_tokens} held-out tokens"]
    if plan.synthetic:
        lines.append(f"  simulated on a {plan.synthetic} (count dump: per-token paths are not in it)")
    lines += ["", plan_table(plan, engine), "", "Verdict:", *(f"  {line}" for line in v.lines),
              f"  winning map: {v.winner} (the fastest simulated; among maps within 0.5% of it, the best balanced)"]
    return "\n".join(lines) + "\n"


def plan_json(plan: DumpPlan, v: Verdict, engine: str) -> dict[str, Any]:
    return {"format": FORMAT, "engine": engine, "split": plan.split, "out_of_sample": plan.out_of_sample,
            "synthetic_simulation": plan.synthetic, "batch_tokens": plan.batch_tokens,
            "candidates": [{"name": c.name, "redundant": c.redundant, "imbalance_in": c.imbalance_in,
                            "imbalance_out": c.imbalance_out, "trtllm_imbalance_out": c.trtllm_imbalance,
                            "e2e_ms": c.e2e_ms, "engine_refuses": expressible(c, engine)} for c in plan.candidates],
            "staleness_max_over_mean": plan.staleness, "window_group_tokens": plan.window_tokens,
            "verdict": {"winner": v.winner, "eplb": v.eplb, "eplb_worth_enabling": v.worth, "eplb_gain": v.gain,
                        "gain_error": GAIN_ERROR, "rebalance_every_window_groups": v.rebalance_every,
                        "lines": list(v.lines)},
            "info": plan.info}


def write_plan_outputs(plan: DumpPlan, v: Verdict, engine: str, layout: LayerLayout, report: str,
                       out: str | Path) -> Path:
    """Write the folder (atomically, replacing an older plan's); returns the winning map's path in it."""
    name = MAP_FILES[engine]
    with output_folder(out, PLAN_OUTPUTS) as tmp:
        (tmp / "report.txt").write_text(report)
        (tmp / "plan.json").write_text(json.dumps(plan_json(plan, v, engine), indent=1, sort_keys=True) + "\n")
        for c in plan.candidates:
            save_placement(c.placement, tmp / "placements" / f"{safe_name(c.name)}.json")
        export_placement(plan.get(v.winner).placement, engine, tmp / name, layout)
    return Path(out) / name
