"""How fast and how close to optimal are the ILP placements? Prints the issue's figures.

    python benchmarks/bench_ilp.py [--only mixtral,qwen,deepseek] [--solver auto] [--simulate]

Shapes (profiles are the scenarios' own synthetic profiling windows; Qwen3 has no shipped scenario, so
its window is generated here with the same generator, 94 layers x 128 experts, top-8, 8 H200):

- Mixtral-8x7B (32 layers x 8 experts, top-2): EP4 (scenarios/singlenode.yaml, 1 node, tp 2) and EP8
  (the same model on one 8-GPU node, tp 1) - the "proven optimal in under 10 s" figure - then all three
  policies on scenarios/moetuner_coherent.yaml (1 node EP4 and 2 nodes EP4);
- Qwen3-235B (94 x 128, 8 GPUs): ``ilp`` (standard dataflow: load term only), ``ilp+traffic``
  (``w_comm = w_affinity = 1``, the joint objective) and ``ilp_moetuner``;
- DeepSeek-V3 (58 x 256, 64 GPUs in 8 nodes, scenarios/deepseek_v3_64gpu.yaml): ``ilp`` (standard
  dataflow on 8 nodes: load + the hierarchical all-to-all's inter-node dispatch term, nodes first),
  ``ilp-load`` (``w_dispatch = 0``: the load term alone) and ``ilp+traffic``; with ``--simulate`` also
  the simulated end-to-end time of contiguous, greedy and ilp on that scenario.

Per run: wall seconds of the policy (the profiling statistics - transition counts - are timed apart),
objective, proven lower bound and gap of the joint objective, and the gap of the load term alone.
Wall times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moesim.placement import make_placement
from moesim.study import load_scenario
from moesim.study.config import parse_scenario
from moesim.study.plan import prepare

ROOT = Path(__file__).resolve().parent.parent / "scenarios"


def qwen_scenario() -> object:
    data = {
        "name": "qwen3_235b_8gpu",
        "clusters": [{"name": "1x8-h200", "preset": "hgx-h200"}],
        "model": {"name": "qwen3-235b-a22b", "num_layers": 94, "num_experts": 128, "top_k": 8,
                  "d_model": 4096, "d_ff": 1536},
        "workload": {"synthetic": {"tokens_per_gpu": 4096, "batches": 1, "profile_batches": 1,
                                   "zipf_alpha": 0.5, "gpu_mix_sigma": 0.3, "affinity": 0.4,
                                   "affinity_fanout": 8, "seed": 3}},
        "placements": ["greedy"],
    }
    return parse_scenario(data, "qwen3_235b_8gpu (bench_ilp.py)")


def mixtral_ep8() -> object:
    sc = load_scenario(ROOT / "singlenode.yaml")
    data = {"name": "mixtral_ep8", "clusters": [{"name": "1x8-h100-ep8", "preset": "dgx-h100"}],
            "model": sc.model.model_dump(), "workload": {"synthetic": sc.workload.synthetic.model_dump()},
            "placements": ["greedy"]}
    return parse_scenario(data, "mixtral_ep8 (bench_ilp.py)")


JOINT = {"w_comm": 1.0, "w_affinity": 1.0}  # the traffic terms on, as under the coherent dataflow
LOAD = {"w_dispatch": 0.0}  # the standard dataflow's inter-node dispatch term off: the load term alone


def run(label: str, scenario: object, policies: list, solver: str) -> dict[str, dict]:
    """``policies``: names, or (name, options) to run a policy with options."""
    out = {}
    for cp in prepare(scenario, placements=[]).clusters:  # type: ignore[arg-type]
        cluster, problem = cp.cluster, cp.problem
        assert problem is not None
        t0 = time.perf_counter()
        problem.transition_counts()
        stats_s = time.perf_counter() - t0
        for spec in policies:
            policy, extra = (spec, {}) if isinstance(spec, str) else spec
            opts = ({"solver": solver} if policy.startswith("ilp") else {}) | extra
            t0 = time.perf_counter()
            placement = make_placement(policy, problem, **opts)
            policy = policy + ("-load" if extra == LOAD else "+traffic" if extra else "")
            wall = time.perf_counter() - t0
            i = placement.info
            gap = (f"gap {i['gap'] * 100:6.3f}%" if "gap" in i else
                   f"stage-1 gap {i['stage1_gap'] * 100:6.3f}%" if "stage1_gap" in i else "")
            load_gap = f"load gap {i['load_gap'] * 100:6.3f}%" if "load_gap" in i else ""
            print(f"{label:8s} {cluster.name:12s} EP{cluster.ep:<3d} {policy:13s} {wall:6.2f} s "
                  f"(+{stats_s:4.1f} s stats)  objective {i['objective']:.5g} s  {gap}  "
                  f"{load_gap}  {i.get('status', '')} {i.get('method', '')}")
            out[f"{cluster.name}/{policy}"] = {"wall_s": wall, "stats_s": stats_s, **i}
    return out


def simulate_deepseek() -> None:
    from moesim.study.runner import run_study
    sc = load_scenario(ROOT / "deepseek_v3_64gpu.yaml")
    from moesim.study.config import PlacementEntry
    sc = sc.model_copy(update={"placements": (PlacementEntry(name="contiguous", policy="contiguous"),
                                              PlacementEntry(name="greedy", policy="greedy"),
                                              PlacementEntry(name="ilp", policy="ilp")), "baseline": "greedy"})
    t0 = time.perf_counter()
    res = run_study(sc, progress=False)
    for r in res.runs:
        print(f"deepseek   simulated e2e {r.name:10s} {r.metrics.e2e_ms['mean']:9.3f} ms  "
              f"speedup vs greedy {r.metrics.speedup_vs_baseline:.4f}x")
    print(f"deepseek   simulation took {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="mixtral,qwen,deepseek")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--simulate", action="store_true", help="also simulate greedy vs ilp on the DeepSeek scenario")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "mixtral" in only:
        t0 = time.perf_counter()
        res = run("mixtral", load_scenario(ROOT / "singlenode.yaml"), [("ilp", JOINT)], args.solver)
        res |= run("mixtral", mixtral_ep8(), [("ilp", JOINT)], args.solver)
        ilp_s = sum(v["wall_s"] for v in res.values())
        proven = all(v["gap"] <= 1e-9 for v in res.values())
        print(f"mixtral    EP4 + EP8: ilp {ilp_s:.2f} s in all, proven optimal: {proven}  (target < 10 s)")
        run("mixtral", load_scenario(ROOT / "moetuner_coherent.yaml"), ["ilp", "ilp_moetuner", "affinity"], args.solver)
        print(f"mixtral    all of the above: {time.perf_counter() - t0:.1f} s wall including trace generation")
    if "qwen" in only:
        res = run("qwen3", qwen_scenario(), ["ilp", ("ilp", JOINT), "ilp_moetuner"], args.solver)
        for k, v in res.items():
            print(f"qwen3      {k}: {v['wall_s'] + v['stats_s']:.1f} s total (target < 60 s), "
                  f"load gap {v['load_gap'] * 100:.3f}% (target < 2%)")
    if "deepseek" in only:
        res = run("deepseek", load_scenario(ROOT / "deepseek_v3_64gpu.yaml"), ["ilp", ("ilp", LOAD), ("ilp", JOINT)],
                  args.solver)
        for k, v in res.items():
            print(f"deepseek   {k}: {v['wall_s'] + v['stats_s']:.1f} s total (target < 120 s), "
                  f"load gap {v['load_gap'] * 100:.3f}% (target < 2%)")
        if args.simulate:
            simulate_deepseek()


if __name__ == "__main__":
    main()
