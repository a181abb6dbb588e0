"""Network solver speed, before and after: this tree's max-min fluid solver against a baseline revision's,
on the same simulations, in one run; then how the wall time grows with GPUs.

    python benchmarks/bench_network.py [--baseline main] [--layers 58] [--scale-layers 8] [--quick]

The baseline's solver (``fluid_ends``) is read from ``git show REV:moesim/sim/network.py`` and swapped into
:mod:`moesim.sim.network` for its runs; everything else is this tree's code. Shapes:

- wide-EP decode (benchmarks/bench_wide_ep.py): DeepSeek-V3, 128 tokens per GPU over a 4096-token KV cache, on
  144 H800 GPUs (18 nodes), DeepEP low-latency all-to-alls, fused FP8 experts from CUDA graphs; without and
  with two-batch overlap;
- prefill (benchmarks/bench_engine.py): DeepSeek-V3 shape, 256 experts, top-8, 4096 tokens per GPU, NCCL
  all-to-alls with contention, contiguous placement, on 64 GPUs.

Each run prints wall seconds per solver, their ratio and the largest relative difference of any GPU's
recorded times (the solvers agree to rounding: the new one is exact, at the same ``rate_tolerance``). Wall
times depend on the machine's load: the two solvers run back to back on the same inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

import moesim.sim.network as network
from moesim.hardware import ClusterSpec, build_topology, deep_merge, preset
from moesim.placement import Placement
from moesim.sim.compute import Attention
from moesim.sim.engine import EngineOptions, SimRecords, Simulation
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_preset
from moesim.traces.synthetic import SyntheticParams, generate_trace

ROOT = Path(__file__).resolve().parent.parent


def baseline_solver(rev: str) -> ModuleType:
    """The network module of revision ``rev``, loaded under another name (its ``fluid_ends`` is the baseline)."""
    text = subprocess.run(["git", "show", f"{rev}:moesim/sim/network.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="moesim-bench-")) / "baseline_network.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_network", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_network"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(sim: Simulation, trace, layout, placement, solver) -> tuple[float, SimRecords]:
    """Wall seconds of one ``Simulation.run`` with ``solver`` as the fluid solver."""
    own = network.fluid_ends
    network.fluid_ends = solver
    try:
        start = time.perf_counter()
        rec = sim.run(trace, layout, placement, keep_collectives=False)
        return time.perf_counter() - start, rec
    finally:
        network.fluid_ends = own


def compare(label: str, sim: Simulation, trace, layout, placement, base: ModuleType) -> float:
    """Run with the baseline's solver, then this tree's; print both, their ratio and the largest difference."""
    t_old, old = timed(sim, trace, layout, placement, base.fluid_ends)
    t_new, new = timed(sim, trace, layout, placement, network.fluid_ends)
    diff = max(float(np.max(np.abs(new.gpu[k] - old.gpu[k]) / np.maximum(np.abs(old.gpu[k]), 1e-30)))
               for k in new.gpu if k.startswith("t_"))
    print(f"{label:34s} {t_old:8.2f} {t_new:8.2f} {t_old / t_new:6.2f}x {old.recomputations:9d} "
          f"{new.recomputations:9d} {diff:10.1e}", flush=True)
    return t_new


def wide_ep(nodes: int, layers: int | None) -> tuple:
    spec = ClusterSpec(**{**preset("h800"), "nodes": nodes})
    model = ModelSpec(**{**model_preset("deepseek-v3").fields, **({"num_layers": layers} if layers else {})})
    G, L, T = spec.num_gpus, model.num_layers, 128
    trace = generate_trace(num_layers=L, num_experts=model.num_experts, top_k=model.top_k, num_gpus=G,
                           tokens_per_gpu=T, batches=1, params=SyntheticParams(groups=8, topk_groups=4),
                           rng=np.random.default_rng(0))
    placement = Placement.from_assignment(np.tile(np.arange(model.num_experts) * G // model.num_experts, (L, 1)), G,
                                          "contiguous")
    return build_topology(spec), model, trace, trace.layout(G, T), placement


def prefill(nodes: int, layers: int) -> tuple:
    spec = ClusterSpec(**deep_merge(preset("hgx-h200"), {"nodes": nodes, "gpus_per_node": 8}))
    G, E, T = spec.num_gpus, 256, 4096
    model = ModelSpec(name="deepseek-v3-shape", num_layers=layers, num_experts=E, top_k=8, d_model=7168, d_ff=2048)
    trace = generate_trace(num_layers=layers, num_experts=E, top_k=8, num_gpus=G, tokens_per_gpu=T, batches=1,
                           params=SyntheticParams(), rng=np.random.default_rng(0))
    placement = Placement.from_assignment(np.tile(np.arange(E) * G // E, (layers, 1)), G, "contiguous")
    return build_topology(spec), model, trace, trace.layout(G, T), placement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git revision whose solver is the baseline (default main)")
    ap.add_argument("--layers", type=int, default=58, help="MoE layers of the before/after runs (default 58)")
    ap.add_argument("--scale-layers", type=int, default=8, help="MoE layers of the GPU-scaling runs (default 8)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 layers, small clusters")
    a = ap.parse_args()
    layers, scale_layers = (4, 2) if a.quick else (a.layers, a.scale_layers)
    base = baseline_solver(a.baseline)
    print(f"== before ({a.baseline}) / after, rate_tolerance {EngineOptions().rate_tolerance}, {layers} layers ==")
    print(f"{'run':34s} {'before s':>8s} {'after s':>8s} {'ratio':>7s} {'recomp.':>9s} {'recomp.':>9s} "
          f"{'max diff':>10s}")
    topo, model, trace, layout, placement = wide_ep(2 if a.quick else 18, layers)
    for overlap in ("none", "two_batch"):
        opts = EngineOptions(a2a="deepep_low_latency", moe_kernels="fused", launch="cuda_graph", expert_dtype="fp8",
                             overlap=overlap)
        sim = Simulation(topo, model, options=opts, attention=Attention("decode", 4096))
        compare(f"decode {topo.num_gpus} GPUs, overlap {overlap}", sim, trace, layout, placement, base)
    topo, model, trace, layout, placement = prefill(2 if a.quick else 8, layers)
    compare(f"prefill {topo.num_gpus} GPUs", Simulation(topo, model), trace, layout, placement, base)

    print(f"\n== after: wall time vs GPUs (prefill shape, {scale_layers} layers; x {layers / scale_layers:.2f} "
          f"for {layers}) ==")
    print(f"{'GPUs':>5s} {'wall s':>8s} {'s/layer':>8s} {'flows':>9s} {'recomp.':>8s}")
    for nodes in (1, 2) if a.quick else (2, 4, 8, 16, 32):
        topo, model, trace, layout, placement = prefill(nodes, scale_layers)
        wall, rec = timed(Simulation(topo, model), trace, layout, placement, network.fluid_ends)
        print(f"{topo.num_gpus:5d} {wall:8.2f} {wall / scale_layers:8.3f} {rec.flows:9d} {rec.recomputations:8d}",
              flush=True)


if __name__ == "__main__":
    main()
