"""Engine speed and memory at wide expert parallelism, generation and simulation apart: the DeepSeek-V3-shaped
scenario (scenarios/deepseek_v3_64gpu.yaml: 58 MoE layers, 256 experts, top-8, 4096 tokens per GPU, contention on,
hierarchical all-to-alls), contiguous placement, as ``moesim run`` builds it.

    python benchmarks/bench_scale.py [--baseline fork] [--compare 64x58,256x16] [--gpus 16,32,64,128,256]
                                     [--layers 4,8] [--no-growth] [--repeat 1] [--numpy]
    python benchmarks/bench_scale.py --compare 1024x2,1024x4 --no-growth   # the largest cluster (minutes)
    python benchmarks/bench_scale.py --no-compare --gpus 512,1024 --layers 2,4   # growth of the large clusters

1. before/after on the same inputs in one run: the simulation of one placement (engine construction included)
   with the baseline revision's whole simulation engine (moesim/sim, read with ``git show REV:...`` by
   benchmarks/baseline_sim.py) and with this tree's, for each ``GPUSxLAYERS`` of ``--compare`` (hierarchical
   all-to-alls; direct NCCL ones too on 64 GPUs): CPU seconds of the process (other jobs on the machine stretch
   wall times, not these), ratio, whether the rate recomputations agree and
   the largest relative difference of any GPU's recorded times (``--repeat N``: each engine's fastest of N
   alternating runs). Rows of fewer than 58 layers are extrapolated to
   58 (labelled ``x58``): from two rows of one cluster by their slope and fixed part, else linearly;
2. growth with GPUs and layers (this tree): wall seconds and peak resident memory of the process (Linux's VmHWM,
   reset before each phase through /proc/self/clear_refs; it includes what earlier phases left resident) of
   building the workload (trace generation, profile trace, placement problem: ``prepare``) and of simulating one
   placement (``run_study``), each measured at ``--layers`` and extrapolated linearly to 58 layers (labelled
   ``x58``; fixed costs included, so rows of few layers overstate).

Wall times depend on the machine's load (2 cores shared): compare ratios from one run. This tree runs its compiled
fluid loop where numba (the extra ``fast``) is installed; ``--numpy`` runs its numpy one.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml

import moesim.sim as sim_package
from moesim.sim import fluid_jit
from moesim.study.config import parse_scenario
from moesim.study.plan import prepare
from moesim.study.runner import run_study

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline_sim  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "deepseek_v3_64gpu.yaml"


def scenario(gpus: int, layers: int, a2a: str = "hierarchical") -> Any:
    data = yaml.safe_load(SCENARIO.read_text())
    data["clusters"][0]["nodes"] = max(gpus // 8, 1)
    data["clusters"][0]["gpus_per_node"] = min(gpus, 8)
    data["model"]["num_layers"] = layers
    data["placements"] = ["contiguous"]
    data["engine"] = {"a2a": a2a, "progress": False}
    return parse_scenario(data, str(SCENARIO), SCENARIO.parent)


def peak_rss_gb(reset: bool = False) -> float:
    """The process's peak resident memory since the last reset (GB); ``reset`` starts a new peak."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def measured(fn: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, peak resident GB) of ``fn()``."""
    peak_rss_gb(reset=True)
    start = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    return out, wall, peak_rss_gb()


def one_placement(package: Any, plan: Any) -> tuple[float, Any]:
    """CPU seconds and records of the plan's first placement through ``package``'s engine."""
    cp = plan.clusters[0]
    assert cp.workload is not None
    return baseline_sim.simulate(package, cp.topology, plan.scenario.model, plan.options, cp.workload.trace,
                                 cp.workload.layout, cp.placements[0][1], tp=cp.cluster.tp,
                                 attention=plan.scenario.workload.attention)


def before_after(base: Any, points: list[tuple[int, int]], repeat: int) -> None:
    print("== before / after: one placement, baseline engine vs this tree's (same prepared inputs) ==")
    print(f"{'GPUs':>5s} {'layers':>6s} {'a2a':14s} {'before s':>8s} {'after s':>8s} {'ratio':>7s} {'recomp.':>9s} "
          f"{'same':>5s} {'max diff':>9s}")
    rows: dict[int, list[tuple[int, float, float]]] = {}
    for gpus, layers in points:
        for a2a in ("hierarchical", "nccl") if gpus == 64 else ("hierarchical",):
            plan = prepare(scenario(gpus, layers, a2a))
            t_old = t_new = float("inf")
            for _ in range(repeat):  # alternating; each engine's fastest run
                t, old = one_placement(base, plan)
                t_old = min(t_old, t)
                t, new = one_placement(sim_package, plan)
                t_new = min(t_new, t)
            plan = None
            same = old.recomputations == new.recomputations
            diff = baseline_sim.max_relative_difference(old, new)
            print(f"{gpus:5d} {layers:6d} {a2a:14s} {t_old:8.2f} {t_new:8.2f} {t_old / t_new:6.2f}x "
                  f"{new.recomputations:9d} {str(same):>5s} {diff:9.1e}", flush=True)
            if a2a == "hierarchical":
                rows.setdefault(gpus, []).append((layers, t_old, t_new))
    for gpus, got in rows.items():
        if all(layers >= 58 for layers, _, _ in got):
            continue
        print(f"# EXTRAPOLATED to 58 layers, not measured ({gpus} GPUs, hierarchical): ", end="")
        if len(got) >= 2:
            (l1, o1, n1), (l2, o2, n2) = got[0], got[-1]
            est = [t1 + (t2 - t1) / (l2 - l1) * (58 - l1) for t1, t2 in ((o1, o2), (n1, n2))]
            print(f"slope and fixed part of the {l1}- and {l2}-layer rows: before ~{est[0]:.0f} s, after "
                  f"~{est[1]:.0f} s per placement ({est[0] / est[1]:.2f}x)")
        else:
            layers, t_old, t_new = got[0]
            print(f"x 58/{layers} (fixed costs included: overstates): before ~{t_old * 58 / layers:.1f} s, after "
                  f"~{t_new * 58 / layers:.1f} s per placement")


def growth(gpu_list: list[int], layer_list: list[int]) -> None:
    print("\n== growth (this tree): prepare = trace generation + profile trace + placement problem; simulate = one "
          "placement ==")
    print(f"{'GPUs':>5s} {'layers':>6s} {'prep s':>7s} {'prep GB':>7s} {'sim s':>7s} {'sim GB':>7s} "
          f"{'prep s/l':>8s} {'sim s/l':>8s} {'prep x58':>8s} {'sim x58':>8s} {'run x58':>8s}")
    for gpus in gpu_list:
        for layers in layer_list:
            plan, t_prep, m_prep = measured(partial(prepare, scenario(gpus, layers)))
            _, t_sim, m_sim = measured(partial(run_study, plan, progress=False))
            plan = None  # the next point's peak memory is its own
            scale = 58 / layers
            print(f"{gpus:5d} {layers:6d} {t_prep:7.2f} {m_prep:7.2f} {t_sim:7.2f} {m_sim:7.2f} "
                  f"{t_prep / layers:8.3f} {t_sim / layers:8.3f} {t_prep * scale:8.1f} {t_sim * scale:8.1f} "
                  f"{(t_prep + t_sim) * scale:8.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="fork",
                    help="git revision whose moesim/sim is the baseline (fork: where this branch left main)")
    ap.add_argument("--compare", default="64x58,256x16", help="GPUSxLAYERS points of the before/after table")
    ap.add_argument("--gpus", default="16,32,64,128,256", help="cluster sizes of the growth table")
    ap.add_argument("--layers", default="4,8", help="MoE layers of the growth table")
    ap.add_argument("--repeat", type=int, default=1, help="before/after runs of each engine, alternating; the fastest "
                    "is kept")
    ap.add_argument("--no-compare", action="store_true", help="the growth table only")
    ap.add_argument("--numpy", action="store_true", help="this tree's numpy fluid loop even where numba (the extra "
                    "'fast') is installed")
    ap.add_argument("--no-growth", action="store_true", help="the before/after table only")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 layers, small clusters")
    a = ap.parse_args()
    if a.numpy:
        fluid_jit.AVAILABLE = False
    print(f"fluid loop: {'compiled (numba)' if fluid_jit.AVAILABLE else 'numpy'}", flush=True)
    gpu_list = [16, 32] if a.quick else [int(g) for g in a.gpus.split(",")]
    layer_list = [2] if a.quick else [int(x) for x in a.layers.split(",")]
    points = [(16, 2)] if a.quick else [(int(g), int(x)) for g, x in (p.split("x") for p in a.compare.split(","))]
    if not a.no_compare:
        before_after(baseline_sim.load(a.baseline), points, a.repeat)
    if not a.no_growth:
        growth(gpu_list, layer_list)


if __name__ == "__main__":
    main()
