"""``moesim serving``: the latency-throughput curve of a scenario over a sweep of its batch size.

    moesim serving SCENARIO --batch 32,64,128,256 [--placement NAME] [--cluster NAME] [--pool NAME] [-o DIR]

``--batch`` (or ``--tokens``) lists tokens per GPU per forward in prefill, requests per GPU in decode. Every
point is checked before the first is simulated (:func:`moesim.study.serving.serving_sweep`); the table goes to
stdout, serving.csv, serving.json and serving.png into the folder (default: the scenario's output folder
/serving), all at once at the end (:func:`moesim.report.serving.write_serving`). A disaggregated scenario
(:mod:`moesim.study.disagg`) sweeps the pool ``--pool`` names, into its output folder /serving-POOL by default.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moesim.cli.common import check_scenario_output, progress_bar
from moesim.errors import InputError


def _cmd_serving(args: argparse.Namespace) -> int:
    from moesim.report.serving import SERVING_OUTPUTS, serving_table, write_serving
    from moesim.study.disagg import POOLS, DisaggScenario, load_any
    from moesim.study.serving import parse_batches, serving_sweep

    batches = parse_batches(args.batch, "--batch")
    loaded = load_any(args.scenario)
    if isinstance(loaded, DisaggScenario):
        if args.pool not in POOLS:
            raise InputError(f"a disaggregated scenario: name the pool to sweep, {' or '.join(POOLS)}", field="--pool")
        scenario, folder = loaded.pools[args.pool], Path(str(loaded.output)) / f"serving-{args.pool}"
    elif args.pool is not None:
        raise InputError("only a disaggregated scenario (with pools) has pools", field="--pool")
    else:
        scenario, folder = loaded, Path(str(loaded.output)) / "serving"
    out = Path(args.output) if args.output else folder
    check_scenario_output(out, SERVING_OUTPUTS, scenario, flag=args.output)  # before simulating: costs nothing
    t0 = time.perf_counter()
    with progress_bar(len(batches), "serving sweep", "batch", quiet=args.quiet) as bar:
        rows = serving_sweep(scenario, batches, placement=args.placement, cluster=args.cluster, progress=bar.update)
    print(serving_table(rows))
    written = write_serving(rows, scenario.name, out, plots_on=not args.no_plots)
    print(f"\n{len(batches)} batch sizes simulated in {time.perf_counter() - t0:.1f} s; results in {out}/ "
          f"({', '.join(written)})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim serving`` on the top-level subparsers."""
    s = sub.add_parser("serving", help="sweep a scenario's batch size: throughput per GPU vs latency")
    s.add_argument("scenario")
    s.add_argument("--batch", "--tokens", dest="batch", required=True,
                   help="batch sizes: tokens per GPU per forward (prefill) or requests per GPU (decode), "
                        "e.g. 32,64,128,256")
    s.add_argument("--placement", help="only this placement of the scenario (default: every one)")
    s.add_argument("--cluster", help="only this cluster of the scenario")
    s.add_argument("--pool", help="the pool to sweep in a disaggregated scenario: prefill or decode")
    s.add_argument("-o", "--output", help="output folder (default: the scenario's output folder /serving)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(func=_cmd_serving)
