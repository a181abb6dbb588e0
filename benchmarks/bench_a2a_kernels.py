"""The all-to-all kernel families side by side, and DeepEP's published H800 tables against moesim.

    python benchmarks/bench_a2a_kernels.py

First, one DeepSeek-V3 decode dispatch (128 tokens per GPU, top-8 of 256 experts, FP8 copies of 7,168 values)
on 8 GPUs of one node (h800 and gb200-nvl72 presets) and on 16 (two h800 nodes), under every family that
can run there: its fixed costs and the whole collective, in microseconds. Then every point of DeepEP's README
tables (moesim.calibration.deepep: normal-kernel bandwidths EP8-64, low-latency latency and bandwidth EP8-256,
the h800 preset unchanged) with its error, and the median and largest absolute error per kernel family.
"""

from __future__ import annotations

import numpy as np
import simpy

from moesim.calibration.deepep import FP8_COPY_BYTES, low_latency_points, normal_points
from moesim.hardware import ClusterSpec, build_topology, preset
from moesim.hardware.spec import A2A_FAMILIES
from moesim.sim.network import Fabric


def decode_dispatch(spec: ClusterSpec, family: str, rng: np.random.Generator) -> tuple[float, float]:
    """(fixed us, whole dispatch us) of one decode dispatch: every GPU's 128 tokens to the GPUs of 8 random
    experts of 256 (one copy per token and GPU, one per token and expert for DeepEP low-latency)."""
    G = spec.num_gpus
    owner = np.arange(256) * G // 256
    copies = np.zeros((G, G))
    for s in range(G):
        for _ in range(128):
            dest = owner[rng.choice(256, 8, replace=False)]
            np.add.at(copies[s], dest if family == "deepep_low_latency" else np.unique(dest), 1)
    env = simpy.Environment()
    fabric = Fabric(env, build_topology(spec))
    proc = env.process(fabric.collective("dispatch", copies * FP8_COPY_BYTES, kernel=family, notify=True))
    env.run()
    cost = fabric.kernels[family]
    return (cost.launch_s + cost.notify_s) * 1e6, float(proc.value.gpu_done.max()) * 1e6


def main() -> None:
    print("== one DeepSeek-V3 decode dispatch (128 tokens/GPU, FP8), per kernel family ==")
    print(f"{'cluster':16s} {'family':20s} {'fixed us':>9s} {'dispatch us':>12s}")
    clusters = (("h800 1x8", ClusterSpec(**preset("h800"))),
                ("gb200 1x8", ClusterSpec(**{**preset("gb200-nvl72"), "gpus_per_node": 8})),
                ("h800 2x8", ClusterSpec(**{**preset("h800"), "nodes": 2})))
    for label, spec in clusters:
        for family in A2A_FAMILIES:
            if family == "nvlink_one_sided" and spec.nodes > 1:
                print(f"{label:16s} {family:20s}   refused: one NVLink domain only")
                continue
            fixed, total = decode_dispatch(spec, family, np.random.default_rng(0))
            print(f"{label:16s} {family:20s} {fixed:9.1f} {total:12.1f}")

    print("\n== DeepEP's README tables (H800), h800 preset as shipped ==")
    points = normal_points() + low_latency_points()
    print(f"{'kernels':12s} {'EP':>4s} {'phase':9s} {'quantity':15s} {'published':>9s} {'moesim':>8s} {'error':>7s}")
    for p in points:
        print(f"{p.kernel:12s} {p.ep:4d} {p.phase:9s} {p.quantity:15s} {p.published:9.1f} {p.predicted:8.1f} "
              f"{p.error * 100:+6.1f}%")
    for kernel in ("normal", "low_latency"):
        e = np.abs([p.error for p in points if p.kernel == kernel])
        print(f"deepep_{kernel}: n={e.size}, median |error| {np.median(e) * 100:.1f}%, max {e.max() * 100:.1f}%")


if __name__ == "__main__":
    main()
