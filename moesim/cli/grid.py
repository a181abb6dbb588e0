"""``moesim sweep SCENARIO --grid KEY=V1,V2 ...`` (or the scenario's ``sweep:`` section): any scenario field.

    moesim sweep SCENARIO [--grid KEY=V1,V2,...]... [--jobs N] [--backend local|ray] [--address ADDR]
                          [--heatmap KEY1,KEY2] [-o DIR]

Every point of the grid is validated before the first simulation (:mod:`moesim.study.grid`); points already
finished in the output folder by an earlier, interrupted run are skipped; the others run in ``--jobs`` local
worker processes or as Ray tasks (:mod:`moesim.study.sweep`), each written as it finishes; then the merged
table and plots (:mod:`moesim.report.grid`). A point that fails is reported with its error, the others go on,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from moesim.cli.common import at_least_one, check_scenario_output, progress_bar
from moesim.errors import InputError


def default_jobs() -> int:
    """CPUs this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def _pair(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    keys = [k.strip() for k in text.split(",")]
    if len(keys) != 2 or not all(keys):
        raise InputError(f"needs two swept keys, KEY1,KEY2, got {text!r}", field="--heatmap")
    return keys[0], keys[1]


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """One line per row: the swept values, the cluster, the placement, time per batch and speedup."""
    widths = {k: max(len(k), *(len(json.dumps(r.get(k))) for r in rows)) for k in keys}
    head = " ".join(f"{k:>{widths[k]}s}" for k in keys) + f" {'cluster':12s} {'GPUs':>5s} {'placement':14s} " \
        f"{'e2e ms':>10s} {'speedup':>8s}"
    lines = [head]
    for r in rows:
        speed = r.get("speedup_vs_baseline")
        lines.append(" ".join(f"{json.dumps(r.get(k)):>{widths[k]}s}" for k in keys)
                     + f" {r['cluster'][:12]:12s} {r['gpus']:5d} {r['placement'][:14]:14s} {r['e2e_ms_mean']:10.3f} "
                     + (f"{speed:7.3f}x" if speed is not None else f"{'-':>8s}"))
    return "\n".join(lines)


def cmd_grid(args: argparse.Namespace) -> int:
    """Run a grid sweep from parsed ``moesim sweep`` arguments; exit status 1 when a point failed."""
    from moesim.report.grid import GRID_OUTPUTS, finished_points, write_merged, write_plots, write_point
    from moesim.study.grid import load_grid
    from moesim.study.sweep import PointOutcome, merge, run_points

    at_least_one(args.jobs, "--jobs", 4096)
    pair = _pair(args.heatmap)
    t0 = time.perf_counter()
    with ExitStack() as stack:  # a bar while the points are checked, shown when that takes over 2 s
        axes, points = load_grid(args.scenario, args.grid, progress=lambda n: stack.enter_context(
            progress_bar(n, "checking the sweep's points", "point", quiet=args.quiet)).update)
    first = points[0].scenario
    keys = [a.key for a in axes]
    if pair is not None and not set(pair) <= set(keys):
        raise InputError(f"{pair!r} are not both swept keys; swept: {', '.join(keys)}", field="--heatmap")
    out = Path(args.output) if args.output else Path(str(first.output)) / "grid"
    check_scenario_output(out, GRID_OUTPUTS, first, flag=args.output)  # before simulating: costs nothing
    outcomes = finished_points(out, points)
    todo = [p for p in points if p.digest not in outcomes]
    jobs = args.jobs or min(default_jobs(), max(len(todo), 1))
    if outcomes:
        print(f"resuming in {out}: {len(outcomes)} of {len(points)} points already done", file=sys.stderr)
    by_index = {p.index: p for p in points}
    with progress_bar(len(todo), f"sweep ({args.backend}, {jobs} jobs)", "point", quiet=args.quiet) as bar:
        def done(outcome: PointOutcome) -> None:
            point = by_index[outcome.index]
            write_point(out, point, outcome)
            outcomes[outcome.digest] = outcome
            if outcome.error is not None:
                bar.write(f"point {point.index} ({point.label()}) failed: {outcome.error}", file=sys.stderr)
            bar.update()

        run_points(todo, jobs=jobs, backend=args.backend, address=args.address, on_done=done)
    rows, failures = merge(points, outcomes)
    written = write_merged(out, first.name, axes, points, rows, failures, first.baseline)
    if not args.no_plots:
        written += write_plots(out, rows, keys, first.baseline, first.name, pair)
    if rows:
        print(_table(rows, keys))
    for f in failures:
        print(f"point {f['point']} failed: {f['error']}")
    ran = len(todo)
    print(f"\n{len(points)} points ({len(points) - ran} done before, {ran} run here, {len(failures)} failed) in "
          f"{time.perf_counter() - t0:.1f} s; results in {out}/ ({', '.join(written)}, points/)")
    return 1 if failures else 0
