"""``moesim run`` on a training scenario (``workload.phase: train``): simulate its layouts step by step, print
the table and the verdict, write ``training.json``, ``training_steps.csv`` and ``training.png``
(:mod:`moesim.report.training`). Progress on stderr, one tick per simulated step."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moesim.cli.common import check_scenario_output, progress_bar
from moesim.study.config import Scenario


def run_training_scenario(scenario: Scenario, args: argparse.Namespace) -> int:
    from moesim.report.training import TRAIN_OUTPUTS, format_report, write_training_outputs
    from moesim.study.training import run_training, stage_scenario
    from moesim.study.workload import load_workload_trace

    assert scenario.training is not None
    out = Path(args.output) if args.output else scenario.output
    check_scenario_output(out, TRAIN_OUTPUTS, scenario, flag=args.output)  # before simulating: costs nothing
    syn = scenario.workload.synthetic
    steps = syn.batches if syn is not None else None
    if steps is None:
        trace = load_workload_trace(stage_scenario(scenario))
        steps = trace.num_batches(scenario.clusters[0].spec.num_gpus, scenario.workload.trace.tokens_per_gpu) \
            if trace is not None and scenario.workload.trace is not None else 1
    total = steps * len(scenario.training.layouts) * len(scenario.clusters)
    t0 = time.perf_counter()
    with progress_bar(total, "training steps", "step", quiet=args.quiet) as bar:
        result = run_training(scenario, progress=lambda name: bar.update(1))
    wall = time.perf_counter() - t0
    print(format_report(result))
    written = write_training_outputs(result, out, plots_on=not args.no_plots)
    print(f"\n{len(result.runs)} layouts simulated in {wall:.1f} s; results in {out}/ "
          f"({', '.join(p.name for p in written)})")
    return 0
