"""Engine speed at wide expert parallelism: one DeepSeek-V3 decode step (58 MoE + 3 dense layers, 128 requests
per GPU over a 4096-token KV cache, DeepEP low-latency all-to-alls, fused FP8 experts replayed from CUDA graphs)
on 144 H800 GPUs (18 nodes, DeepSeek's decode deployment), without and with two-batch overlap. Prints the wall
time of each run and the simulated step; the target is under 10 s per placement on a 2-core machine.

    python benchmarks/bench_wide_ep.py [--nodes 18] [--tokens 128] [--rate-tolerance 0.01]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moesim.hardware import ClusterSpec, build_topology, preset
from moesim.placement import Placement
from moesim.sim.compute import Attention
from moesim.sim.engine import EngineOptions, Simulation
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_preset
from moesim.traces.synthetic import SyntheticParams, generate_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rate-tolerance", type=float, default=0.01)
    a = ap.parse_args()
    spec = ClusterSpec(**{**preset("h800"), "nodes": a.nodes})
    t0 = time.perf_counter()
    topo = build_topology(spec)
    model = ModelSpec(**model_preset("deepseek-v3").fields)
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
        sim = Simulation(topo, model, options=opts, attention=Attention("decode", 4096))
        t0 = time.perf_counter()
        rec = sim.run(trace, layout, placement)
        step = float((rec.batch_end - rec.batch_start)[0])
        print(f"overlap {overlap:9s}: {time.perf_counter() - t0:6.1f} s wall, step {step * 1e3:.2f} ms simulated, "
              f"{rec.recomputations} rate recomputations", flush=True)


if __name__ == "__main__":
    main()
