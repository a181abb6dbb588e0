"""DeepEP's published expert-parallel measurements, reproduced through moesim's ordinary simulation path.

DeepEP (github deepseek-ai/DeepEP, README as of mid-2025) publishes, for H800 nodes (NVLink about 160 GB/s,
one ConnectX-7 400 Gb/s NIC per GPU), the bandwidth of its normal (training / prefill) kernels and the
latency of its low-latency (decode) kernels. This module rebuilds each benchmark as its test scripts run it
and simulates it with :class:`moesim.sim.engine.Simulation` on the ``h800`` preset, unchanged:

- normal kernels (``tests/test_intranode.py``, ``tests/test_internode.py``): 4096 tokens per GPU, hidden
  7168, top-8 of 256 experts with flat random scores; internode runs limit each token to its top
  ``min(nodes, 4)`` groups, one group per node. FP8 dispatch (hidden + hidden/128 x 4 + 16 bytes per copy)
  and BF16 combine (hidden x 2). Intranode EP8 moves copies directly over NVLink; internode uses the
  hierarchical all-to-all (one RDMA copy per destination node, NVLink forwarding).
- low-latency kernels (``tests/test_low_latency.py``): 128 tokens per GPU, top-8 of 288 experts (256 where
  288 does not divide EP), one message per (token, expert), NVLink inside a node and RDMA between nodes.

Bandwidth is computed exactly as those scripts compute it, from rank 0's traffic and rank 0's kernel time:
intranode "NVL" bandwidth = copies rank 0 receives x hidden x (1 + 4/128) (FP8) or x 2 (BF16); internode
"RDMA" bandwidth = rank 0's (token, destination node) pairs, its own node included, x the same bytes;
low-latency bandwidth = rank 0's valid top-k selections x (hidden + hidden/128 x 4 + 16) (dispatch) or
x hidden x 2 (combine). These are "logical" bandwidths: they count copies that never leave the GPU or node.

Deliberately not modelled: the kernels' SM budget and chunk sizes (DeepEP's tuning sweeps them and
reports the best), the notify/layout kernels, and the ten masked top-k positions of the low-latency test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.hardware.presets import preset
from moesim.hardware.spec import ClusterSpec
from moesim.hardware.topology import build_topology
from moesim.placement.format import Placement
from moesim.sim.engine import EngineOptions, Simulation
from moesim.traces.model import ModelSpec
from moesim.traces.synthetic import SyntheticParams, generate_trace

HIDDEN = 7168
FP8_COPY_BYTES = HIDDEN + HIDDEN / 128 * 4 + 16  # values, per-128 scales, top-k metadata
BF16_COPY_BYTES = HIDDEN * 2
_FP8_FACTOR = (1 + 4 / 128) / 2  # DeepEP's normal-kernel tests: FP8 bytes = BF16 bytes x this

# (kind, EP, dispatch GB/s, combine GB/s): DeepEP README, normal kernels, H800.
NORMAL_TABLE = (("intranode", 8, 153.0, 158.0), ("internode", 16, 43.0, 43.0),
                ("internode", 32, 58.0, 57.0), ("internode", 64, 51.0, 50.0))
# (EP, dispatch us, dispatch GB/s, combine us, combine GB/s): DeepEP README, low-latency kernels with
# NVLink inside nodes, H800.
LOW_LATENCY_TABLE = ((8, 77.0, 98.0, 114.0, 127.0), (16, 118.0, 63.0, 195.0, 74.0), (32, 155.0, 48.0, 273.0, 53.0),
                     (64, 173.0, 43.0, 314.0, 46.0), (128, 192.0, 39.0, 369.0, 39.0), (256, 194.0, 39.0, 360.0, 40.0))


@dataclass(frozen=True)
class Point:
    """One published figure next to moesim's prediction of it."""

    kernel: str  # "normal" or "low_latency"
    ep: int
    phase: str  # "dispatch" or "combine"
    quantity: str  # "bandwidth_GBps" or "latency_us"
    published: float
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1.0


def _cluster(ep: int, cluster: dict | None) -> ClusterSpec:
    base = dict(cluster if cluster is not None else preset("h800"))
    gpn = int(base.get("gpus_per_node", 8))
    if ep % gpn:
        raise ValueError(f"EP {ep} is not a whole number of {gpn}-GPU nodes")
    return ClusterSpec(**{**base, "nodes": ep // gpn, "name": f"{base.get('name', 'cluster')}-ep{ep}"})


def _run(ep: int, *, tokens: int, experts: int, groups: int, topk_groups: int | None,
         a2a: Literal["deepep_normal", "deepep_low_latency"],
         cluster: dict | None, seed: int) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """Simulate one MoE layer; returns rank 0's top-k choices, its dispatch/combine times (s) and the
    expert-to-GPU map."""
    spec = _cluster(ep, cluster)
    if a2a == "deepep_normal":  # the tests time dispatches on a cached layout (an earlier dispatch's handle): no notify
        kernels = spec.a2a_kernels
        spec = spec.model_copy(update={"a2a_kernels": kernels.model_copy(
            update={"deepep_normal": kernels.deepep_normal.model_copy(update={"notify_us": 0.0})})})
    model = ModelSpec(name="deepep-bench", num_layers=1, num_experts=experts, top_k=8, d_model=HIDDEN, d_ff=2048,
                      dtype_bytes=2, dispatch_bytes_per_token=FP8_COPY_BYTES, combine_bytes_per_token=BF16_COPY_BYTES)
    params = SyntheticParams(zipf_alpha=0.0, gpu_mix_sigma=0.0, affinity=0.0, groups=groups, topk_groups=topk_groups)
    trace = generate_trace(num_layers=1, num_experts=experts, top_k=8, num_gpus=ep, tokens_per_gpu=tokens,
                           batches=1, params=params, rng=np.random.default_rng(seed))
    owner = np.arange(experts) * ep // experts  # DeepEP: expert e on rank e // (experts / ranks)
    placement = Placement.from_assignment(owner[None, :], ep, "contiguous")
    sim = Simulation(build_topology(spec), model, options=EngineOptions(a2a=a2a))
    rec = sim.run(trace, trace.layout(ep, tokens), placement, keep_collectives=False)
    g = rec.gpu
    times = {"dispatch": float(g["t_dispatch_done"][0, 0, 0] - g["t_dispatch_start"][0, 0, 0]),
             "combine": float(g["t_combine_done"][0, 0, 0] - g["t_combine_start"][0, 0, 0])}
    rank0 = trace.experts[trace.home == 0, 0, :].astype(np.int64)
    return rank0, times, owner


def normal_points(cluster: dict | None = None, seed: int = 0) -> list[Point]:
    """The normal-kernel table: predicted vs published bottleneck bandwidth, dispatch and combine."""
    out = []
    for kind, ep, pub_dispatch, pub_combine in NORMAL_TABLE:
        gpn = 8
        nodes = ep // gpn
        intranode = kind == "intranode"
        choices, times, owner = _run(ep, tokens=4096, experts=256, groups=1 if intranode else nodes,
                                     topk_groups=None if intranode else min(nodes, 4),
                                     a2a="deepep_normal", cluster=cluster, seed=seed)
        if intranode:  # rank 0's received copies: one per (token, rank) over all ranks' tokens; symmetric
            # traffic, so count rank 0's own (token, destination rank) pairs
            units = _distinct_per_row(owner[choices])
        else:
            units = _distinct_per_row(owner[choices] // gpn)
        bf16 = units * HIDDEN * 2
        out.append(Point("normal", ep, "dispatch", "bandwidth_GBps", pub_dispatch,
                         bf16 * _FP8_FACTOR / times["dispatch"] / 1e9))
        out.append(Point("normal", ep, "combine", "bandwidth_GBps", pub_combine, bf16 / times["combine"] / 1e9))
    return out


def low_latency_points(cluster: dict | None = None, seed: int = 0) -> list[Point]:
    """The low-latency table: predicted vs published latency and bandwidth, dispatch and combine."""
    out = []
    for ep, d_us, d_bw, c_us, c_bw in LOW_LATENCY_TABLE:
        experts = 288 if 288 % ep == 0 else 256
        choices, times, _ = _run(ep, tokens=128, experts=experts, groups=1, topk_groups=None, a2a="deepep_low_latency",
                                 cluster=cluster, seed=seed)
        selections = int((choices >= 0).sum())
        d_t, c_t = times["dispatch"], times["combine"]
        out += [Point("low_latency", ep, "dispatch", "latency_us", d_us, d_t * 1e6),
                Point("low_latency", ep, "dispatch", "bandwidth_GBps", d_bw, selections * FP8_COPY_BYTES / d_t / 1e9),
                Point("low_latency", ep, "combine", "latency_us", c_us, c_t * 1e6),
                Point("low_latency", ep, "combine", "bandwidth_GBps", c_bw, selections * BF16_COPY_BYTES / c_t / 1e9)]
    return out


def _distinct_per_row(ids: np.ndarray) -> int:
    """Sum over rows of the number of distinct values (DeepEP's ``inplace_unique`` then count)."""
    s = np.sort(ids, axis=1)
    return int(s.shape[0] + (s[:, 1:] != s[:, :-1]).sum())
