"""``moesim sweep``: redundant-expert counts x rebalance intervals -> the trade-off plot, CSV and verdict; or, with
``--grid`` or a scenario's ``sweep:`` section, any scenario fields (:mod:`moesim.cli.grid`).

    moesim sweep SCENARIO --redundant 0,16,32 --every 2,4,8,16 [--window N] [--cluster NAME] [-o DIR]
    moesim sweep SCENARIO [--grid KEY=V1,V2,...]... [--jobs N] [--backend local|ray] [--address ADDR] [-o DIR]

The scenario's ``rebalance`` section names the placement to re-plan and its window, incremental and
migration settings; the sweep replaces that placement's ``redundant_experts`` and the section's
``every_batches`` by each listed value. For every combination the placement planned once (on the profile)
is compared with the same placement rebalanced, migration cost included (:mod:`moesim.study.rebalance`).
Everything is validated before the first simulation; files are written all at once at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moesim.cli.common import at_least_one, check_scenario_output
from moesim.errors import InputError
from moesim.study.config import check_rebalance_batches

if TYPE_CHECKING:
    from moesim.study.config import RebalanceConfig, Scenario
    from moesim.study.plan import ClusterPlan, StudyPlan


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"must be comma-separated integers, got {text!r}", field=flag) from None
    if not values or any(v < 0 for v in values):
        raise InputError(f"must be non-negative integers, got {text!r}", field=flag)
    return sorted(set(values))


def run_sweep(scenario: Scenario, redundant: list[int], every: list[int], *, window: int | None = None,
              cluster_name: str | None = None, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sweep rows (one per cluster, redundant count and interval) and, per cluster, the no-replica
    never-rebalanced total (when 0 is among ``redundant``)."""
    plan, cfg = _swept_plan(scenario, redundant, every, window=window, cluster_name=cluster_name)
    rows: list[dict[str, Any]] = []
    reference: dict[str, float] = {}
    for cp in plan.clusters:
        cluster_rows, static_ms = _sweep_cluster(scenario, plan, cp, cfg, redundant, every, progress=progress)
        rows += cluster_rows
        if static_ms is not None:
            reference[cp.cluster.name] = static_ms
    return rows, reference


def _swept_plan(scenario: Scenario, redundant: list[int], every: list[int], *, window: int | None,
                cluster_name: str | None) -> tuple[StudyPlan, RebalanceConfig]:
    """The study plan with one copy of the rebalanced placement per redundant count, and the rebalance
    settings with ``window`` applied; every interval is checked against every cluster's workload."""
    from moesim.budget import require_time
    from moesim.study.config import PlacementEntry
    from moesim.study.plan import prepare
    from moesim.study.sizes import simulation_seconds

    cfg = scenario.rebalance
    if cfg is None:
        raise InputError("moesim sweep needs a 'rebalance' section (policy, every_batches, window_batches)",
                         source=scenario.source, field="rebalance")
    at_least_one(window, "--window")
    if window is not None:
        cfg = cfg.model_copy(update={"window_batches": window})
    entry = next(p for p in scenario.placements if p.name == cfg.policy)
    entries = [PlacementEntry(name=f"{entry.name} R={red}", policy=entry.policy,
                              options={**entry.options, "redundant_experts": red}) for red in redundant]
    # the scenario checks its own rebalance section against the trace; here the swept one is checked
    checked = scenario.model_copy(update={"rebalance": None})
    plan = prepare(checked, placements=entries,
                   where={e.name: f"--redundant {red}" for e, red in zip(entries, redundant)},
                   clusters=None if cluster_name is None else [cluster_name], cluster_field="--cluster")
    window_field = "--window" if window is not None else "rebalance.window_batches"
    for cp in plan.clusters:  # validate every interval before simulating
        assert cp.workload is not None
        B = cp.workload.layout.num_batches
        require_time(simulation_seconds(cp.cluster, scenario.model.num_layers, B, 2 * len(redundant) * len(every)),
                     f"sweeping {len(redundant)} x {len(every)} settings of {B} batches on {cp.cluster.name}",
                     source=scenario.source, field="--every")
        if max(every) >= B or min(every) < 1:
            raise InputError(f"intervals must be between 1 and {B - 1} (the workload has {B} batches)",
                             source=scenario.source, field="--every")
        check_rebalance_batches(min(every), cfg.window_batches, B, scenario.source, window_field=window_field)
    return plan, cfg


def _sweep_cluster(scenario: Scenario, plan: StudyPlan, cp: ClusterPlan, cfg: RebalanceConfig, redundant: list[int],
                   every: list[int], *, progress: bool) -> tuple[list[dict[str, Any]], float | None]:
    """One cluster's sweep rows, every (redundant count, interval) simulated, and its never-rebalanced total
    without replicas (None unless 0 is among ``redundant``)."""
    from tqdm import tqdm

    from moesim.report.rebalance import sweep_row
    from moesim.study.rebalance import BatchRunner, simulate_rebalancing

    work = cp.workload
    assert work is not None and cp.problem is not None
    sim = plan.simulation(cp)
    runner = BatchRunner(sim, work.trace, work.layout, cp.cluster.tp)
    total = len(redundant) * len(every) * work.layout.num_batches
    rows: list[dict[str, Any]] = []
    static_ms: float | None = None
    with tqdm(total=total, desc=f"{cp.cluster.name} / sweep", unit="batch", disable=not progress,
              leave=False) as bar:
        for red, (e, static) in zip(redundant, cp.placements):
            for n in every:
                result = simulate_rebalancing(scenario, cp.cluster, cp.topology, sim, work.trace, work.layout,
                                              cp.problem, static, None, cfg.model_copy(update={"every_batches": n}),
                                              options=e.options, runner=runner, progress=bar.update)
                rows.append(sweep_row(result, red))
                if red == 0:
                    static_ms = float(result.batch_ms["static"].sum())
    return rows, static_ms


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The swept settings with a header; gains are against the same redundant count planned once (net: migration
    included) and, as the verdict states them, against the best plan made once over every redundant count."""
    best_once = {c: min(r["static_ms"] for r in rows if r["cluster"] == c) for c in {r["cluster"] for r in rows}}
    head = (f"{'cluster':12s} {'redundant':>9s} {'every':>5s} {'total ms':>10s} {'net':>7s} {'gross':>7s} "
            f"{'vs best once':>12s} {'migration ms':>12s} {'moved GB':>8s}")
    lines = [head, "  (net and gross: vs the same redundant count planned once; net includes the migration)"]
    for r in rows:
        vs = (1 - r["rebalanced_ms"] / best_once[r["cluster"]]) * 100
        lines.append(f"{r['cluster'][:12]:12s} {r['redundant_experts']:9d} {r['every_batches']:5d} "
                     f"{r['rebalanced_ms']:10.2f} {r['net_gain_pct']:+6.1f}% {r['gross_gain_pct']:+6.1f}% "
                     f"{vs:+11.1f}% {r['migration_ms']:12.2f} {r['GB_moved']:8.1f}")
    return "\n".join(lines)


_GRID_FLAGS = (("grid", "--grid"), ("jobs", "--jobs"), ("address", "--address"), ("heatmap", "--heatmap"))


def _cmd_sweep(args: argparse.Namespace) -> int:
    """The redundant x interval sweep when --redundant or --every is given, else the grid sweep."""
    if args.redundant is None and args.every is None:
        for key, flag in (("window", "--window"), ("cluster", "--cluster")):
            if getattr(args, key) is not None:
                raise InputError("only with --redundant and --every (a grid sweeps any field: --grid "
                                 f"{'rebalance.window_batches' if key == 'window' else 'clusters[0].nodes'}=...)",
                                 field=flag)
        from moesim.cli.grid import cmd_grid

        return cmd_grid(args)
    given = [flag for key, flag in _GRID_FLAGS if getattr(args, key)] + (["--backend"] if args.backend != "local"
                                                                          else [])
    if given:
        raise InputError("is for a grid sweep; --redundant and --every sweep the rebalance section alone: give "
                         "one kind of sweep", field=given[0])
    for value, flag in ((args.redundant, "--redundant"), (args.every, "--every")):
        if value is None:
            raise InputError("--redundant and --every go together (or sweep any field with --grid)", field=flag)
    return _cmd_rebalance_sweep(args)


def _cmd_rebalance_sweep(args: argparse.Namespace) -> int:
    from moesim.report.rebalance import SWEEP_OUTPUTS, sweep_verdict
    from moesim.study import load_scenario

    scenario = load_scenario(args.scenario)
    redundant = _ints(args.redundant, "--redundant")
    every = _ints(args.every, "--every")
    out = Path(args.output) if args.output else Path(str(scenario.output)) / "sweep"
    check_scenario_output(out, SWEEP_OUTPUTS, scenario, flag=args.output)  # before simulating: costs nothing
    t0 = time.perf_counter()
    rows, reference = run_sweep(scenario, redundant, every, window=args.window, cluster_name=args.cluster,
                                progress=not args.quiet)
    lines = sweep_verdict(rows, reference)
    print(sweep_table(rows))
    print("\nVerdict:  (vs the best plan made once, as the last column)\n" + "\n".join(f"  {line}" for line in lines))
    written = _write_sweep(rows, lines, scenario, out, plots_on=not args.no_plots)
    print(f"\n{len(rows)} settings simulated in {time.perf_counter() - t0:.1f} s; results in {out}/ "
          f"({', '.join(written)})")
    return 0


def _write_sweep(rows: list[dict[str, Any]], lines: list[str], scenario: Scenario, out: Path, *,
                 plots_on: bool) -> list[str]:
    """sweep.csv, sweep.json and (with ``plots_on``) tradeoff.png into ``out``, all or nothing: written into
    a temporary folder beside it, which then replaces it (:func:`moesim.fileio.output_folder`). Returns the
    names written."""
    from moesim.fileio import output_folder
    from moesim.report.rebalance import SWEEP_OUTPUTS, plot_tradeoff, sweep_break_even, write_sweep_csv

    with output_folder(out, SWEEP_OUTPUTS) as tmp:
        write_sweep_csv(rows, tmp / "sweep.csv")
        (tmp / "sweep.json").write_text(json.dumps({"format": "moesim.sweep/1", "scenario": scenario.name,
                                                    "rows": rows, "break_even": sweep_break_even(rows),
                                                    "verdict": lines}, indent=1) + "\n")
        if plots_on:
            plot_tradeoff(rows, tmp / "tradeoff.png", f"{scenario.name}: redundant experts x rebalance interval")
        return sorted(p.name for p in tmp.iterdir())


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim sweep`` on the top-level subparsers."""
    s = sub.add_parser("sweep", help="sweep any scenario fields (--grid, or the scenario's sweep: section), in "
                       "parallel and resumably; or redundant experts x rebalance intervals (--redundant, --every)")
    s.add_argument("scenario")
    s.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="a swept key and its values, e.g. cluster.nodes=1,2,4 or placement.redundant_experts=0,32 "
                        "(repeat for more keys; replaces the same key of the sweep: section)")
    s.add_argument("--jobs", type=int, help="points run at once (default: this machine's CPUs)")
    s.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes (default), or Ray tasks (pip install -e \".[ray]\")")
    s.add_argument("--address", help="with --backend ray: an existing Ray cluster (default: start one here)")
    s.add_argument("--heatmap", metavar="KEY1,KEY2", help="the two swept keys of heatmap.png (default: the first two "
                   "that vary)")
    s.add_argument("--redundant", help="redundant-expert counts, e.g. 0,8,16,32 (with --every)")
    s.add_argument("--every", help="rebalance intervals in batches, e.g. 2,4,8 (with --redundant)")
    s.add_argument("--window", type=int, help="window in batches (default: the scenario's)")
    s.add_argument("--cluster", help="only this cluster of the scenario")
    s.add_argument("-o", "--output", help="output folder (default: the scenario's output folder /sweep, or /grid "
                   "for a grid sweep)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(func=_cmd_sweep)
