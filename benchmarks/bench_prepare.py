"""Preparation speed and memory at wide expert parallelism (trace generation, profile trace, placement problem): the
DeepSeek-V3-shaped scenario (scenarios/deepseek_v3_64gpu.yaml), contiguous placement, as ``moesim run`` builds it,
each point in a fresh process (its peak resident memory is its own).

    python benchmarks/bench_prepare.py [--baseline a907453] [--compare-gpus 64,256] [--compare-layers 8]
                                       [--gpus 16,64,256,1024] [--layers 2,4]
    python benchmarks/bench_prepare.py --whole-run 256 [--run-layers 58] [--baseline main] [--repeat 2]
    python benchmarks/bench_prepare.py --generate 256,1024 [--gen-layers 8]

First before/after on the same scenario and seed, the baseline revision's moesim (``git archive``) against this
tree's, at ``--compare-gpus`` and ``--compare-layers``; then this tree's growth with GPUs and layers (extrapolated
linearly to 58 layers, labelled ``x58``). Wall times depend on the machine's load (2 cores shared): compare ratios
from one run. (Until 2026-12-03 this was ``bench_scale.py --prepare-only``.) ``--generate``: the synthetic trace
alone (``generate_trace`` as a run calls it, without gate weights) with the numpy sampler and the compiled one
(``MOESIM_SAMPLER_JIT``), each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "deepseek_v3_64gpu.yaml"


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


_GENERATE = """
import json, resource, sys, time
import numpy as np
import yaml
from moesim.traces.synthetic import SyntheticParams, generate_trace
data, gpus, layers = yaml.safe_load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
m, syn = data["model"], data["workload"]["synthetic"]
params = SyntheticParams(**{k: syn[k] for k in ("zipf_alpha", "gpu_mix_sigma", "affinity", "affinity_fanout", "groups",
                                                "topk_groups")})
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
start, cpu0 = time.perf_counter(), cpu()
generate_trace(num_layers=layers, num_experts=m["num_experts"], top_k=m["top_k"], num_gpus=gpus,
               tokens_per_gpu=syn["tokens_per_gpu"], batches=1, params=params, rng=np.random.default_rng(syn["seed"]),
               weights=False)
print(json.dumps({"s": time.perf_counter() - start, "cpu": cpu() - cpu0, "tokens": gpus * syn["tokens_per_gpu"]}))
"""


def generate(gpu_list: list[int], layers: int) -> None:
    """The synthetic trace alone, numpy sampler then compiled one, each in a fresh process (the compiled one loads
    its kernels from numba's cache: ~0.3 s, included)."""
    print(f"== synthetic trace generation, {layers} layers, no gate weights; each in a fresh process ==")
    print(f"{'GPUs':>5s} {'sampler':>8s} {'wall s':>7s} {'cpu s':>7s} {'cpu ns/token-layer':>19s} {'load 1m':>8s}")
    for gpus in gpu_list:
        for name, flag in (("numpy", "0"), ("compiled", "1")):
            load = os.getloadavg()[0]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "MOESIM_SAMPLER_JIT": flag}
            out = subprocess.run([sys.executable, "-c", _GENERATE, str(SCENARIO), str(gpus), str(layers)], env=env,
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            got = json.loads(out.strip().splitlines()[-1])
            per = got["cpu"] / (got["tokens"] * layers) * 1e9
            print(f"{gpus:5d} {name:>8s} {got['s']:7.2f} {got['cpu']:7.2f} {per:19.0f} {load:8.2f}", flush=True)


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



def whole_run(rev: str, gpus: int, layers: int, repeat: int) -> None:
    """The whole ``moesim run`` (generation, placement, simulation, writing results and plots), before / after."""
    import yaml

    data = yaml.safe_load(SCENARIO.read_text())
    data["clusters"][0]["nodes"] = max(gpus // 8, 1)
    data["clusters"][0]["gpus_per_node"] = min(gpus, 8)
    data["model"]["num_layers"] = layers
    data["placements"] = ["contiguous"]
    work = Path(tempfile.mkdtemp(prefix="moesim-run-"))
    path = work / f"ds{gpus}.yaml"
    path.write_text(yaml.safe_dump(data))
    trees = [(f"before ({rev})", baseline_tree(rev)), ("after (this tree)", ROOT)]
    print(f"== whole moesim run, {gpus} GPUs x {layers} layers, contiguous: {path} (/usr/bin/time -v) ==")
    print(f"{'tree':<22s} {'wall s':>7s} {'cpu s':>7s} {'peak GB':>8s} {'load 1m':>8s}  e2e ms")
    for _ in range(repeat):
        for name, tree in trees:
            load = os.getloadavg()[0]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            run = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "moesim.cli", "run", str(path), "-o",
                                  str(work / "out")], env=env, capture_output=True, text=True, cwd=work)
            if run.returncode:
                raise SystemExit(run.stderr[-2000:])
            got = {}
            for line in run.stderr.splitlines():
                key, _, value = line.strip().partition(": ")
                got[key] = value
            wall = sum(float(x) * 60**i for i, x in enumerate(reversed(
                got["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":"))))
            cpu = float(got["User time (seconds)"]) + float(got["System time (seconds)"])
            peak = int(got["Maximum resident set size (kbytes)"]) * 1024 / 1e9
            e2e = next((line.split()[1] for line in run.stdout.splitlines() if line.startswith("contiguous ")), "?")
            print(f"{name:<22s} {wall:7.1f} {cpu:7.1f} {peak:8.2f} {load:8.2f}  {e2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git revision whose moesim is the baseline")
    ap.add_argument("--compare-gpus", default="64,256", help="cluster sizes of the before/after")
    ap.add_argument("--compare-layers", type=int, default=8, help="MoE layers of the before/after runs")
    ap.add_argument("--gpus", default="16,64,256,1024", help="cluster sizes of the growth table")
    ap.add_argument("--layers", default="2,4", help="MoE layers of the growth table")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 GPUs, 2 layers")
    ap.add_argument("--whole-run", type=int, default=0, help="GPUs of a whole moesim run, before / after")
    ap.add_argument("--run-layers", type=int, default=58, help="MoE layers of --whole-run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tree in --whole-run, alternating")
    ap.add_argument("--generate", default="", help="GPU counts of the generation-only timing, numpy vs compiled")
    ap.add_argument("--gen-layers", type=int, default=8, help="MoE layers of --generate")
    a = ap.parse_args()
    if a.generate:
        generate([int(g) for g in a.generate.split(",")], a.gen_layers)
        return
    if a.whole_run:
        whole_run(a.baseline, a.whole_run, a.run_layers, a.repeat)
        return
    if a.quick:
        prepare_only(a.baseline, [16], 2, [16], [2])
        return
    prepare_only(a.baseline, [int(g) for g in a.compare_gpus.split(",")], a.compare_layers,
                 [int(g) for g in a.gpus.split(",")], [int(x) for x in a.layers.split(",")])


if __name__ == "__main__":
    main()
