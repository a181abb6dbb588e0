"""Engine speed at wide expert parallelism: one DeepSeek-V3 decode step (58 MoE + 3 dense layers, 128 requests
per GPU over a 4096-token KV cache, DeepEP low-latency all-to-alls, fused FP8 experts replayed from CUDA graphs)
on 144 H800 GPUs (18 nodes, DeepSeek's decode deployment), without and with two-batch overlap. Prints the CPU
seconds of each run (the process's: other jobs on a shared machine stretch wall time, not these) and the simulated
step; the target is under 10 s per placement on a 2-core machine.

    python benchmarks/bench_wide_ep.py [--nodes 18] [--tokens 128] [--rate-tolerance 0.01] [--layers 58]
                                       [--baseline fork] [--repeat 1] [--numpy]

With ``--baseline REV`` each run is made first with revision REV's simulation engine (benchmarks/baseline_sim.py;
``fork``: where this branch left main) on the same inputs: both CPU times, their ratio, and whether the
simulated steps and recomputation counts agree; ``--repeat N`` alternates the two N times and keeps each one's
fastest run (the machine's load moves single runs by tens of percent). ``--layers`` shortens the model. This tree
runs its compiled fluid loop where numba (the extra ``fast``) is installed; ``--numpy`` runs its numpy one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moesim.hardware import ClusterSpec, build_topology, preset
from moesim.placement import Placement
from moesim.sim.compute import Attention
from moesim.sim import fluid_jit
from moesim.sim.engine import EngineOptions, Simulation
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_preset
from moesim.traces.synthetic import SyntheticParams, generate_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline_sim  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rate-tolerance", type=float, default=0.01)
    ap.add_argument("--layers", type=int, default=None, help="MoE layers (default: the model's 58)")
    ap.add_argument("--baseline", default=None, help="git revision whose engine runs first (fork: the branch point)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each engine, alternating; the fastest is kept")
    ap.add_argument("--numpy", action="store_true", help="this tree's numpy fluid loop even where numba (the extra "
                    "'fast') is installed")
    a = ap.parse_args()
    if a.numpy:
        fluid_jit.AVAILABLE = False
    print(f"fluid loop: {'compiled (numba)' if fluid_jit.AVAILABLE else 'numpy'}", flush=True)
    base = None if a.baseline is None else baseline_sim.load(a.baseline)
    spec = ClusterSpec(**{**preset("h800"), "nodes": a.nodes})
    t0 = time.perf_counter()
    topo = build_topology(spec)
    fields = dict(model_preset("deepseek-v3").fields)
    if a.layers is not None:
        fields["num_layers"] = a.layers
    model = ModelSpec(**fields)
    G, L = spec.num_gpus, model.num_layers
    trace = generate_trace(num_layers=L, num_experts=model.num_experts, top_k=model.top_k, num_gpus=G,
                           tokens_per_gpu=a.tokens, batches=1, params=SyntheticParams(groups=8, topk_groups=4),
                           rng=np.random.default_rng(0))
    layout = trace.layout(G, a.tokens)
    placement = Placement.from_assignment(np.tile(np.arange(model.num_experts) * G // model.num_experts, (L, 1)), G,
                                          "contiguous")
    print(f"{G} GPUs, {L} MoE layers: topology and trace in {time.perf_counter() - t0:.1f} s", flush=True)
    for overlap in ("none", "two_batch"):
        opts = EngineOptions(a2a="low_latency", moe_kernels="fused", launch="cuda_graph", expert_dtype="fp8",
                             overlap=overlap, rate_tolerance=a.rate_tolerance)
        attention = Attention("decode", 4096)
        t_old, wall = np.inf, np.inf
        for _ in range(a.repeat):
            if base is not None:
                t, old = baseline_sim.simulate(base, topo, model, opts, trace, layout, placement, attention=attention)
                t_old = min(t_old, t)
            t0 = time.process_time()
            rec = Simulation(topo, model, options=opts, attention=attention).run(trace, layout, placement)
            wall = min(wall, time.process_time() - t0)
        step = float((rec.batch_end - rec.batch_start)[0])
        print(f"overlap {overlap:9s}: {wall:6.1f} s CPU, step {step * 1e3:.2f} ms simulated, "
              f"{rec.recomputations} rate recomputations", flush=True)
        if base is not None:
            same = old.recomputations == rec.recomputations and np.array_equal(old.batch_end, rec.batch_end)
            print(f"  baseline {a.baseline}: {t_old:6.1f} s CPU ({t_old / wall:.2f}x this tree's), step and "
                  f"recomputations equal: {same}, largest relative difference of GPU times "
                  f"{baseline_sim.max_relative_difference(old, rec):.1e}", flush=True)


if __name__ == "__main__":
    main()
