"""``moesim run | validate | place``: simulate a scenario, check it without running, or write one placement.

All three go through :func:`moesim.study.prepare`, so a scenario is checked the same way whichever runs it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moesim.cli.common import check_scenario_output, key_values
from moesim.cli.export import ENGINES
from moesim.errors import InputError

if TYPE_CHECKING:
    from moesim.study import StudyResult
    from moesim.study.disagg import DisaggScenario
    from moesim.study.runner import Run


def _cmd_run(args: argparse.Namespace) -> int:
    from moesim.report.files import RUN_OUTPUTS, write_outputs
    from moesim.report.text import format_report
    from moesim.study import run_study
    from moesim.study.disagg import DisaggScenario, load_any

    scenario = load_any(args.scenario)
    if isinstance(scenario, DisaggScenario):
        return _run_disaggregated(args, scenario)
    if scenario.training is not None:  # workload.phase: train (moesim.study.training)
        from moesim.cli.training import run_training_scenario

        return run_training_scenario(scenario, args)
    out = Path(args.output) if args.output else scenario.output
    check_scenario_output(out, RUN_OUTPUTS, scenario, flag=args.output)  # before simulating: costs nothing
    t0 = time.perf_counter()
    result = run_study(scenario, progress=False if args.quiet else None)
    wall = time.perf_counter() - t0
    print(format_report(result.metrics(), scenario.baseline))
    _print_serving(result)
    _print_terms(result)
    _print_solves(result)
    if result.rebalance:  # the scenario's rebalance section (moesim.study.rebalance)
        _print_rebalancing(result)
    written = write_outputs(result, out, plots_on=not args.no_plots)
    print(f"\n{len(result.runs)} runs simulated in {wall:.1f} s; results in {out}/ "
          f"({', '.join(p.name for p in written if p.parent == out)})")
    _print_renamed(result)
    return 0


def _run_disaggregated(args: argparse.Namespace, scenario: DisaggScenario) -> int:
    """A prefill pool and a decode pool (moesim.study.disagg): each pool's report, then the combined figures."""
    from moesim.cli.common import check_output_folder_of
    from moesim.report.disagg import DISAGG_OUTPUTS, disagg_lines, write_disaggregated
    from moesim.report.text import format_report
    from moesim.study.disagg import run_disaggregated

    out = Path(args.output) if args.output else scenario.output
    check_output_folder_of(out, DISAGG_OUTPUTS, scenario.source, scenario.name, scenario.output, flag=args.output)
    t0 = time.perf_counter()
    result = run_disaggregated(scenario, progress=False if args.quiet else None)
    wall = time.perf_counter() - t0
    for name, pool in result.pools.items():
        print(f"#### {name} pool\n{format_report(pool.metrics(), pool.scenario.baseline)}")
        _print_serving(pool)
        _print_terms(pool)
        print()
    print("Disaggregated prefill and decode (each pool's fastest placement; moesim.metrics.serving):\n"
          + "\n".join(f"  {line}" for line in disagg_lines(result)))
    written = write_disaggregated(result, out, plots_on=not args.no_plots)
    runs = sum(len(p.runs) for p in result.pools.values())
    print(f"\n{runs} runs simulated in {wall:.1f} s; results in {out}/ "
          f"({', '.join(sorted({p.relative_to(out).parts[0] for p in written}))})")
    return 0


def _print_serving(result: StudyResult) -> None:
    """Per run, the serving figures: tokens/s per GPU and per node, time per forward or per output token."""
    from moesim.report.text import serving_lines

    lines = serving_lines(result.metrics())
    if lines:
        print("\nServing (back-to-back forwards of the batch; moesim.metrics.serving):\n" + "\n".join(lines))


def _print_terms(result: StudyResult) -> None:
    """Per cluster, where a batch's time goes: each step of the layers, in ms (moesim.metrics.summary.term_ms)."""
    from moesim.metrics.summary import term_ms
    from moesim.report.text import term_table

    model = result.scenario.model
    layers = f"{model.num_layers} MoE layers" + (f" and {model.dense_layers} dense ones" if model.dense_layers else "")
    overlap = " (micro-batch 0's steps: the other micro-batch runs beside them)" \
        if result.scenario.engine.overlap == "two_batch" else ""
    print(f"\nTime per batch by step (ms; summed over the {layers}, mean over GPUs and batches){overlap}:")
    if result.scenario.sustained:
        clocks = ", ".join(sorted({f"x{c.spec.gpu.sustained_clock:g}" for c in result.scenario.clusters}))
        print(f"(GPUs at their sustained, power-capped tensor-core clock: FLOP-bound work at {clocks} of the rate "
              "isolated kernels are timed at; engine.clock)")
    for cluster in dict.fromkeys(r.cluster.name for r in result.runs):
        rows = [(r.name, term_ms(r.records)) for r in result.runs if r.cluster.name == cluster]
        print(f"== {cluster} ==\n{term_table(rows)}")


def _print_renamed(result: StudyResult) -> None:
    """Where a cluster or placement name could not be a file name as it is, the file it went to."""
    from moesim.report.files import placement_files

    renamed = [(c, n, f) for (c, n), f in placement_files(result).items()
               if f != Path("placements") / c / f"{n}.json"]
    for c, n, f in renamed:
        print(f"  {c!r} / {n!r}: placement written as {f.as_posix()} (names made safe for file names)")


def _print_solves(result: StudyResult) -> None:
    """One line per optimised placement: its solver's verdict (nothing when no placement was solved)."""
    from moesim.report.text import solve_summary

    solves = [(r, solve_summary(r.placement.info)) for r in result.runs]
    if any(line for _, line in solves):
        print("\nOptimising placements (gap: how far above the proven lower bound; see docs/ilp.md):")
        print("\n".join(f"  {r.cluster.name} / {r.name}: {line}{_predicted(r)}" for r, line in solves if line))
        print("  (an optimiser minimises its own model of the hardware, moesim/sim/costs.py: the simulation can rank "
              "its plan differently)")


def _predicted(run: Run) -> str:
    """The optimiser's own estimate of a batch beside the simulated time."""
    if run.predicted_ms is None:
        return ""
    sim = run.metrics.e2e_ms["mean"]
    change = (run.predicted_ms / sim - 1) * 100
    return f"; its model predicts {run.predicted_ms:.2f} ms per batch, simulated {sim:.2f} ({change:+.0f}%)"


def _print_rebalancing(result: StudyResult) -> None:
    from moesim.report.files import rebalance_infos
    from moesim.report.rebalance import verdict as rebalance_verdict

    infos = rebalance_infos(result)
    print("\nRebalancing:\n"
          + "\n".join(f"  {rebalance_verdict(r, infos.get(r.cluster))}" for r in result.rebalance))


def _cmd_validate(args: argparse.Namespace) -> int:
    from moesim.study import prepare
    from moesim.study.disagg import DisaggScenario, check_disaggregated, load_any

    scenario = load_any(args.scenario)
    if isinstance(scenario, DisaggScenario):
        check_disaggregated(scenario)
        pools = "; ".join(f"{name}: {p.clusters[0].name} ({p.clusters[0].spec.num_gpus} GPUs, EP{p.clusters[0].ep}), "
                          f"{len(p.placements)} placement(s)" for name, p in scenario.pools.items())
        print(f"{args.scenario}: ok - disaggregated, {pools}")
        return 0
    prepare(scenario, build=False)
    names = ", ".join(f"{c.name} ({c.spec.num_gpus} GPUs, EP{c.ep}" + (f" x TP{c.tp})" if c.tp > 1 else ")")
                      for c in scenario.clusters)
    print(f"{args.scenario}: ok - {len(scenario.clusters)} cluster(s): {names}; "
          f"{len(scenario.placements)} placement(s); baseline {scenario.baseline}")
    return 0


def _cmd_place(args: argparse.Namespace) -> int:
    from moesim.fileio import check_output_file
    from moesim.placement.format import is_placement_file, save_placement
    from moesim.placement.registry import policy_names
    from moesim.report.text import solve_summary
    from moesim.study import load_scenario, prepare
    from moesim.study.config import PlacementEntry, check_policy_options

    if args.list:
        print("\n".join(policy_names()))
        return 0
    if not args.scenario or not args.policy or not args.output:
        raise InputError("moesim place needs SCENARIO, --policy and -o (or --list)")
    if args.to:
        from moesim.placement.export import check_export_target

        check_export_target(args.output, args.to)
    else:
        check_output_file(args.output, owned=is_placement_file, what="a placement file moesim wrote")
    scenario = load_scenario(args.scenario)
    options = dict(key_values(args.set))
    if args.policy not in policy_names():
        raise InputError(f"unknown policy {args.policy!r}; valid: {', '.join(policy_names())}", field="--policy")
    check_policy_options(args.policy, options, args.scenario, "--set ")
    entry = PlacementEntry(name=args.policy, policy=args.policy, options=options)
    plan = prepare(scenario, placements=[entry], where={entry.name: f"--policy {args.policy}"},
                   clusters=[args.cluster or scenario.clusters[0].name], cluster_field="--cluster",
                   progress=False if args.quiet else scenario.engine.progress)  # as run shows it
    cp = plan.clusters[0]
    placement = cp.placement(entry.name)
    what = (f"{args.policy} for {cp.cluster.name} (EP{cp.cluster.ep}), {placement.num_layers} layers x "
            f"{placement.num_experts} experts")
    if args.to:
        from moesim.placement.export import LayerLayout, export_placement, get_writer

        done = export_placement(placement, args.to, args.output, LayerLayout.from_model(scenario.model),
                                source=f"--policy {args.policy}")
        print(f"{what}\n{done.summary(get_writer(args.to).title)}")
    else:
        save_placement(placement, args.output)
        print(f"wrote {args.output}: {what}")
    solved = solve_summary(placement.info)
    if solved:
        print(f"  {solved}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim run``, ``moesim validate`` and ``moesim place`` on the top-level subparsers."""
    r = sub.add_parser("run", help="simulate a scenario and write results")
    r.add_argument("scenario")
    r.add_argument("-o", "--output", help="output folder (default: the scenario's 'output', or results/NAME)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate", help="check a scenario without running it")
    v.add_argument("scenario")
    v.set_defaults(func=_cmd_validate)
    pl = sub.add_parser("place", help="compute a placement with a registered policy and write it as JSON")
    pl.add_argument("scenario", nargs="?")
    pl.add_argument("--policy")
    pl.add_argument("--cluster", help="cluster name in the scenario (default: the first)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="policy option")
    pl.add_argument("-o", "--output")
    pl.add_argument("--to", metavar="|".join(ENGINES),
                    help="write -o in this serving engine's format (moesim export's), not moesim's own")
    pl.add_argument("--list", action="store_true", help="list the registered policies")
    pl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pl.set_defaults(func=_cmd_place)
