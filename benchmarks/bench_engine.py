"""How fast is the engine? A DeepSeek-V3-shaped run, timed per placement, and how the time grows.

    python benchmarks/bench_engine.py [--layers 58] [--tolerance 0.01] [--quick]

The shape: 64 H200 GPUs (preset hgx-h200, 8 nodes of 8, one 400 Gb/s NIC per GPU), 256 routed experts,
top-8, d_model 7168, d_ff 2048, 58 MoE layers, 4096 tokens per GPU, one batch, a synthetic trace (printed:
its generation time). Per placement (contiguous, round_robin, random, greedy; the profile load is the
trace's own per-layer expert counts): wall seconds of ``Simulation.run``, SimPy events per second, flows,
max-min rate recomputations and the simulated end-to-end time. Then the wall time of one placement as the
cluster grows (1, 2, 4, 8 nodes) and as the layers grow. Wall times depend on the machine and its load:
compare runs taken on one machine, back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from moesim.hardware import ClusterSpec, build_topology, deep_merge, preset
from moesim.placement import PlacementProblem, make_placement
from moesim.sim import EngineOptions, Simulation
from moesim.traces import SyntheticParams, Trace, generate_trace
from moesim.traces.model import ModelSpec

EXPERTS, TOP_K, D_MODEL, D_FF, TOKENS_PER_GPU, GPUS_PER_NODE = 256, 8, 7168, 2048, 4096, 8
PLACEMENTS = ("contiguous", "round_robin", "random", "greedy")


def model(layers: int) -> ModelSpec:
    return ModelSpec(name="deepseek-v3-shape", num_layers=layers, num_experts=EXPERTS, top_k=TOP_K,
                     d_model=D_MODEL, d_ff=D_FF)


def trace_for(nodes: int, layers: int, seed: int) -> tuple[Trace, float]:
    """The synthetic trace for ``nodes`` nodes, and the seconds it took to generate."""
    start = time.perf_counter()
    trace = generate_trace(num_layers=layers, num_experts=EXPERTS, top_k=TOP_K, num_gpus=nodes * GPUS_PER_NODE,
                           tokens_per_gpu=TOKENS_PER_GPU, batches=1, params=SyntheticParams(),
                           rng=np.random.default_rng(seed), model="deepseek-v3-shape")
    return trace, time.perf_counter() - start


def first_layers(trace: Trace, layers: int) -> Trace:
    return Trace(experts=trace.experts[:, :layers], meta=dataclasses.replace(trace.meta, num_layers=layers),
                 home=trace.home, batch=trace.batch)


def timed_run(nodes: int, trace: Trace, policy: str, tolerance: float) -> dict[str, float]:
    """Simulate ``trace`` under ``policy`` on ``nodes`` nodes; the wall time covers ``Simulation.run`` only."""
    cluster = ClusterSpec(**deep_merge(preset("hgx-h200"), {"nodes": nodes, "gpus_per_node": GPUS_PER_NODE}))
    G, L = cluster.num_gpus, trace.meta.num_layers
    load = np.stack([np.bincount(trace.experts[:, l].ravel(), minlength=EXPERTS) for l in range(L)]).astype(float)
    problem = PlacementProblem(num_layers=L, num_experts=EXPERTS, num_ranks=G, gpus_per_node=GPUS_PER_NODE,
                               slots_per_gpu=-(-EXPERTS // G), load=load)
    placement = make_placement(policy, problem)
    sim = Simulation(build_topology(cluster), model(L), options=EngineOptions(rate_tolerance=tolerance))
    layout = trace.layout(G, TOKENS_PER_GPU)
    start = time.perf_counter()
    rec = sim.run(trace, layout, placement)
    wall = time.perf_counter() - start
    return {"wall": wall, "events": rec.events, "flows": rec.flows, "recomputations": rec.recomputations,
            "e2e_ms": float((rec.batch_end - rec.batch_start).sum() * 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=58, help="MoE layers of the main run (default 58)")
    ap.add_argument("--tolerance", type=float, default=EngineOptions().rate_tolerance,
                    help="rate_tolerance of the max-min network (0 = exact)")
    ap.add_argument("--scale-placement", default="contiguous", choices=PLACEMENTS,
                    help="placement of the scaling runs")
    ap.add_argument("--scale-layers", type=int, default=8, help="MoE layers of the GPU-scaling runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small smoke run: 4 layers, 1-2 nodes")
    args = ap.parse_args()
    layers, scale_layers, node_counts = args.layers, args.scale_layers, (1, 2, 4, 8)
    if args.quick:
        layers, scale_layers, node_counts = min(layers, 4), min(scale_layers, 2), (1, 2)

    print(f"== DeepSeek-V3 shape: {8 * GPUS_PER_NODE} GPUs, {EXPERTS} experts, top-{TOP_K}, {layers} layers, "
          f"{TOKENS_PER_GPU} tokens/GPU, rate_tolerance {args.tolerance} ==")
    trace, gen_s = trace_for(8, layers, args.seed)
    print(f"trace: {trace.num_tokens} tokens x {layers} layers x top-{TOP_K} generated in {gen_s:.2f} s\n")
    print(f"{'placement':12s} {'wall s':>7s} {'events/s':>9s} {'flows':>8s} {'recomputations':>14s} {'e2e ms':>9s}")
    for policy in PLACEMENTS:
        r = timed_run(8, trace, policy, args.tolerance)
        print(f"{policy:12s} {r['wall']:7.2f} {r['events'] / r['wall']:9.0f} {r['flows']:8.0f} "
              f"{r['recomputations']:14.0f} {r['e2e_ms']:9.2f}")

    print(f"\n== wall time vs GPUs ({args.scale_placement}, {scale_layers} layers) ==")
    print(f"{'GPUs':>5s} {'wall s':>7s} {'s/layer':>8s} {'generate s':>10s}")
    for nodes in node_counts:
        scaled, gen_s = trace_for(nodes, scale_layers, args.seed)
        r = timed_run(nodes, scaled, args.scale_placement, args.tolerance)
        print(f"{nodes * GPUS_PER_NODE:5d} {r['wall']:7.2f} {r['wall'] / scale_layers:8.3f} {gen_s:10.2f}")

    print(f"\n== wall time vs layers ({args.scale_placement}, {8 * GPUS_PER_NODE} GPUs) ==")
    print(f"{'layers':>6s} {'wall s':>7s} {'s/layer':>8s}")
    for n in sorted({n for n in (8, 16, 32, layers) if n <= layers} | ({2, 4} if args.quick else set())):
        r = timed_run(8, first_layers(trace, n), args.scale_placement, args.tolerance)
        print(f"{n:6d} {r['wall']:7.2f} {r['wall'] / n:8.3f}")


if __name__ == "__main__":
    main()
