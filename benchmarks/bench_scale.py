"""Engine speed and memory at wide expert parallelism, generation and simulation apart: the DeepSeek-V3-shaped
scenario (scenarios/deepseek_v3_64gpu.yaml: 58 MoE layers, 256 experts, top-8, 4096 tokens per GPU, contention on,
hierarchical all-to-alls), contiguous placement, as ``moesim run`` builds it.

    python benchmarks/bench_scale.py [--baseline main] [--gpus 16,32,64,128,256] [--layers 4,8] [--no-compare]
    python benchmarks/bench_scale.py --no-compare --gpus 512,1024 --layers 2,4   # the large clusters (minutes)
    python benchmarks/bench_scale.py --prepare-only [--baseline main] [--compare-gpus 64,256] [--gpus ...]

1. before/after on the same inputs in one run: the simulation of one placement with the baseline revision's
   token bookkeeping (``layer_traffic``, read with ``git show REV:moesim/sim/traffic.py``) and with this tree's,
   on 64 GPUs and 58 layers (direct NCCL all-to-alls too); their wall times, ratio and the largest relative
   difference of any GPU's recorded times (0: the counts are integers and equal);
2. growth with GPUs and layers: wall seconds and peak resident memory of the process (Linux's VmHWM, reset
   before each phase through /proc/self/clear_refs; it includes what earlier phases left resident) of building
   the workload (trace generation, profile trace, placement problem: ``prepare``) and of simulating one
   placement (``run_study``), each measured at ``--layers`` and extrapolated linearly to 58 layers (labelled
   ``x58``; fixed costs included, so rows of few layers overstate).

``--prepare-only``: the preparation alone, each point in a fresh process (its peak resident memory is its own):
first before/after on the same scenario and seed, the baseline revision's moesim (``git archive``) against this
tree's, at ``--compare-gpus`` and ``--compare-layers``; then this tree's growth with GPUs and layers.

Wall times depend on the machine's load (2 cores shared): compare ratios from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import moesim.sim.engine as engine
from moesim.study.config import parse_scenario
from moesim.study.plan import prepare
from moesim.study.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "deepseek_v3_64gpu.yaml"


def baseline_traffic(rev: str) -> Any:
    """``layer_traffic`` of revision ``rev``'s moesim/sim/traffic.py, loaded under another name."""
    text = subprocess.run(["git", "show", f"{rev}:moesim/sim/traffic.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="moesim-bench-")) / "baseline_traffic.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_traffic", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_traffic"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.layer_traffic


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


def simulate(plan: Any, traffic: Any) -> tuple[float, Any]:
    own = engine.layer_traffic
    engine.layer_traffic = traffic
    try:
        start = time.perf_counter()
        result = run_study(plan, progress=False)
        return time.perf_counter() - start, result.runs[0].records
    finally:
        engine.layer_traffic = own


def before_after(base: Any, layers: int, gpus: int) -> None:
    print(f"== before / after: one placement, {gpus} GPUs, {layers} layers (same prepared inputs) ==")
    print(f"{'a2a':14s} {'before s':>8s} {'after s':>8s} {'ratio':>7s} {'max diff':>9s}")
    for a2a in ("hierarchical", "nccl"):
        plan = prepare(scenario(gpus, layers, a2a))
        t_old, old = simulate(plan, base)
        t_new, new = simulate(plan, engine.layer_traffic)
        diff = max(float(np.max(np.abs(new.gpu[k] - old.gpu[k]) / np.maximum(np.abs(old.gpu[k]), 1e-30)))
                   for k in new.gpu if k.startswith("t_"))
        print(f"{a2a:14s} {t_old:8.2f} {t_new:8.2f} {t_old / t_new:6.2f}x {diff:9.1e}", flush=True)


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


_PREPARE = """
import json, resource, sys, time
from pathlib import Path
import yaml
from moesim.study.config import parse_scenario
from moesim.study.plan import prepare
path, gpus, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = yaml.safe_load(path.read_text())
data["clusters"][0]["nodes"] = max(gpus // 8, 1)
data["clusters"][0]["gpus_per_node"] = min(gpus, 8)
data["model"]["num_layers"] = layers
data["placements"] = ["contiguous"]
data["engine"] = {"a2a": "hierarchical", "progress": False}
scenario = parse_scenario(data, str(path), path.parent)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
start, cpu0 = time.perf_counter(), cpu()
prepare(scenario)
wall, used = time.perf_counter() - start, cpu() - cpu0
hwm = [int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:")]
print(json.dumps({"s": wall, "cpu": used, "gb": hwm[0] * 1024 / 1e9}))
"""


def prepare_in(tree: Path, gpus: int, layers: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak resident GB of the process) of ``prepare`` of the scenario with contiguous
    placement, run in a fresh process on the moesim of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", _PREPARE, str(SCENARIO), str(gpus), str(layers)], env=env,
                         check=True, capture_output=True, text=True, cwd=tree).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return got["s"], got["cpu"], got["gb"]


def baseline_tree(rev: str) -> Path:
    """Revision ``rev``'s moesim package, exported to a temporary folder."""
    dest = Path(tempfile.mkdtemp(prefix="moesim-base-"))
    archive = subprocess.run(["git", "archive", rev, "moesim"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def prepare_only(rev: str, compare_gpus: list[int], compare_layers: int, gpu_list: list[int],
                 layer_list: list[int]) -> None:
    base = baseline_tree(rev)
    print(f"== prepare before ({rev}) / after (this tree), contiguous placement, {compare_layers} layers, same seed; "
          "each in a fresh process ==")
    print(f"{'GPUs':>5s} {'before s':>8s} {'after s':>8s} {'ratio':>7s} {'bef cpu':>8s} {'aft cpu':>8s} {'ratio':>7s} "
          f"{'before GB':>9s} {'after GB':>8s}")
    for gpus in compare_gpus:
        t_old, c_old, m_old = prepare_in(base, gpus, compare_layers)
        t_new, c_new, m_new = prepare_in(ROOT, gpus, compare_layers)
        print(f"{gpus:5d} {t_old:8.2f} {t_new:8.2f} {t_old / t_new:6.2f}x {c_old:8.2f} {c_new:8.2f} "
              f"{c_old / c_new:6.2f}x {m_old:9.2f} {m_new:8.2f}", flush=True)
    print("\n== prepare growth (this tree), contiguous placement ==")
    print(f"{'GPUs':>5s} {'layers':>6s} {'prep s':>7s} {'cpu s':>7s} {'prep GB':>7s} {'prep s/l':>8s} {'prep x58':>8s}")
    for gpus in gpu_list:
        for layers in layer_list:
            t, c, m = prepare_in(ROOT, gpus, layers)
            print(f"{gpus:5d} {layers:6d} {t:7.2f} {c:7.2f} {m:7.2f} {t / layers:8.3f} {t * 58 / layers:8.1f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git revision whose layer_traffic is the baseline")
    ap.add_argument("--gpus", default="16,32,64,128,256", help="cluster sizes of the growth table")
    ap.add_argument("--layers", default="4,8", help="MoE layers of the growth table")
    ap.add_argument("--compare-layers", type=int, default=58, help="MoE layers of the before/after runs")
    ap.add_argument("--no-compare", action="store_true", help="the growth table only")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 layers, small clusters")
    ap.add_argument("--prepare-only", action="store_true", help="the preparation alone: before/after, then growth")
    ap.add_argument("--compare-gpus", default="64,256", help="cluster sizes of --prepare-only's before/after")
    a = ap.parse_args()
    gpu_list = [16, 32] if a.quick else [int(g) for g in a.gpus.split(",")]
    layer_list = [2] if a.quick else [int(x) for x in a.layers.split(",")]
    if a.prepare_only:
        compare = [16] if a.quick else [int(g) for g in a.compare_gpus.split(",")]
        prepare_only(a.baseline, compare, 2 if a.quick else a.compare_layers, gpu_list, layer_list)
        return
    if not a.no_compare:
        before_after(baseline_traffic(a.baseline), 2 if a.quick else a.compare_layers, 16 if a.quick else 64)
    growth(gpu_list, layer_list)


if __name__ == "__main__":
    main()
