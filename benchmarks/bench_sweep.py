"""Sweeps: 100 points of scenarios/multinode.yaml one after another, in 2 local worker processes, and on Ray.

    python benchmarks/bench_sweep.py [--points 100] [--layers 2] [--jobs 2] [--no-ray]

The grid is the multinode scenario as shipped (both clusters, all five placements, the ILP included), shrunk to
``--layers`` MoE layers so that a point takes about a second, over ``workload.synthetic.seed`` x
``workload.synthetic.zipf_alpha`` (4 skews, as many seeds as make ``--points``). Printed: the wall time of the
sweep run one point after another in this process (:func:`moesim.study.sweep.run_points` with ``jobs=1``), in
``--jobs`` spawned worker processes (their start-up included), and as tasks on a local Ray instance of ``--jobs``
CPUs (its start-up included); the speedup of the processes over one after another; and whether the merged tables
(every point, every metric) are identical. On a machine whose cores other programs also use, the ratio is what
they leave: run it on an idle machine for the figure the code allows.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from moesim.study.grid import load_grid
from moesim.study.sweep import merge, run_points

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "multinode.yaml"
ALPHAS = (0.4, 0.8, 1.2, 1.6)


def timed(points, **kwargs):
    t0 = time.perf_counter()
    outcomes = run_points(points, **kwargs)
    wall = time.perf_counter() - t0
    rows, failures = merge(points, {o.digest: o for o in outcomes})
    assert not failures, failures
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    seeds = ",".join(str(s) for s in range(1, -(-args.points // len(ALPHAS)) + 1))
    axes, points = load_grid(SCENARIO, [f"model.num_layers={args.layers}", f"workload.synthetic.seed={seeds}",
                                        f"workload.synthetic.zipf_alpha={','.join(map(str, ALPHAS))}"])
    points = points[:args.points]
    print(f"{len(points)} points of {SCENARIO.name} ({args.layers} MoE layers, 2 clusters x 5 placements each); "
          f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}")
    serial_s, serial = timed(points, jobs=1)
    print(f"  one after another:        {serial_s:7.1f} s  ({serial_s / len(points):.2f} s per point)")
    par_s, par = timed(points, jobs=args.jobs)
    print(f"  {args.jobs} worker processes:       {par_s:7.1f} s  -> {serial_s / par_s:.2f}x faster; "
          f"merged table identical: {par == serial}")
    if not args.no_ray:
        ray_s, on_ray = timed(points, jobs=args.jobs, backend="ray")
        print(f"  Ray, local, {args.jobs} CPUs:         {ray_s:7.1f} s  -> {serial_s / ray_s:.2f}x faster; "
              f"merged table identical: {on_ray == serial}")
    print(f"  load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
