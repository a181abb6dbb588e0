"""Hardware costs the placement optimisers plan with, taken from the models the engine simulates with.

The optimisers (``greedy``, ``ilp``, ``ilp_moetuner``, ``eplb``'s replica count) need a few numbers, not a
simulation: seconds of expert compute per token-expert pair on an EP rank, seconds per byte between EP
ranks, the bytes one token copy moves, and how the engine's all-to-all copies a token (per destination
node, rank or expert). :func:`hardware_costs` derives each from the engine's own compute model
(:mod:`moesim.sim.compute`) and from the cluster's :class:`~moesim.hardware.topology.Topology`, so a better
model of the hardware improves the plans as well as the predictions; ``tests/test_costs.py`` fails if the
optimiser's numbers and the engine's diverge.

Deliberately ignored here (the simulation has them): contention between concurrent flows beyond the
static sharing of a link, and the time-varying overlap of compute with communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.hardware.spec import GPUSpec
from moesim.hardware.topology import Topology
from moesim.placement.registry import PlanningCosts
from moesim.sim.compute import Attention, dense_layers_time, dense_time, expert_time, shared_expert_time
from moesim.sim.engine import EngineOptions
from moesim.sim.kernels import LayerWork, phase_times
from moesim.traces.model import ModelSpec


@dataclass(frozen=True, eq=False)
class HardwareCosts(PlanningCosts):
    """The numbers a placement policy plans with (:class:`~moesim.placement.registry.PlanningCosts`: expert
    compute per token-expert pair, seconds per byte between EP ranks, bytes per copy, how the all-to-all
    copies a token, the dataflow), and what the study adds to the optimiser's objective to predict a batch."""

    layer_fixed_s: float = 0.0  # per layer, what no placement changes (see layer_fixed_seconds)
    a2a_uniform_s: tuple[float, float] = (0.0, 0.0)  # per layer, dispatch + combine spread evenly: (intra, inter)

    def predicted_batch_s(self, objective_s: float, profile_batches: float, num_layers: int, *,
                          dispatch_counted: bool) -> float:
        """A batch's time as the optimiser's model sees it: its objective (compute tails, and the inter-node
        dispatch when ``dispatch_counted``, over the profile window, per batch) plus every layer's
        placement-independent time and its all-to-alls spread evenly (the intra-node part only when the
        objective counted the inter-node one)."""
        intra, inter = self.a2a_uniform_s
        a2a = intra + (0.0 if dispatch_counted else inter)
        return objective_s / max(profile_batches, 1e-12) + num_layers * (self.layer_fixed_s + a2a)


def a2a_copies(options: EngineOptions) -> str:
    """How the engine's dispatch copies a token: per destination node (DeepEP normal, hierarchical), per
    destination rank (NCCL or NVLink one-sided, deduplicated) or per expert pick."""
    if options.a2a == "deepep_normal":
        return "node"
    return "gpu" if options.a2a in ("nccl", "nvlink_one_sided") and options.dedup else "expert"


def expert_seconds(rows_per_rank: np.ndarray, model: ModelSpec, gpu: GPUSpec, tp: int, options: EngineOptions,
                   experts_per_rank: int) -> np.ndarray:
    """Seconds of an EP rank's expert side (what the engine times between dispatch and combine) for
    ``rows_per_rank`` token-expert pairs spread evenly over its ``experts_per_rank`` experts."""
    rows = np.asarray(rows_per_rank, dtype=float)
    per_expert = np.repeat((rows / experts_per_rank)[..., None], experts_per_rank, axis=-1)
    if options.moe_kernels == "ffn":
        return expert_time(per_expert, model, gpu, tp=tp, grouped=options.grouped)
    work = LayerWork(home=np.zeros_like(rows), sent=np.zeros_like(rows), rows=per_expert)
    return phase_times(work, model, gpu, pipeline=options.moe_kernels, tp=tp, dtype=options.expert_dtype,
                       launch=options.launch, expert_major=options.a2a == "deepep_low_latency")[1]


def compute_s_per_pair(topo: Topology, model: ModelSpec, tp: int, options: EngineOptions,
                       tokens_per_gpu: float) -> float:
    """Marginal seconds of expert work per token-expert pair on an EP rank at the workload's operating point
    (``tokens_per_gpu`` x top-k x tp pairs per rank): the secant of :func:`expert_seconds` over +-25% of it,
    so tile padding, waves and weight reads count as the engine counts them."""
    ep = topo.cluster.num_gpus // tp
    experts = -(-model.num_experts // ep)
    r0 = max(float(tokens_per_gpu) * model.top_k * tp, 1.0)
    lo, hi = expert_seconds(np.array([0.75 * r0, 1.25 * r0]), model, topo.cluster.gpu, tp, options, experts)
    return float(hi - lo) / (0.5 * r0)


def rank_seconds_per_byte(topo: Topology, tp: int) -> np.ndarray:
    """[EP, EP] seconds per byte between EP ranks under a uniform all-to-all, from the topology's own links.

    Every GPU sends to every other, flows sharing a link equally. A link crossed by ``L`` flows, ``m`` of
    them from the pair's sender and ``n`` to its receiver, costs the pair ``L / (max(m, n) x capacity)`` per
    byte: summed over the sender's (or receiver's) flows that is the time the link needs for all of them, so
    NVLink ports (one GPU's flows), NICs shared by several GPUs, PCIe and a leaf's oversubscribed uplinks
    each count as they load. A pair pays its path's tightest link; a rank's ``tp`` GPUs each carry 1/tp of
    its traffic on their own paths.
    """
    G, nl = topo.num_gpus, topo.num_links
    ep = G // tp
    lengths = np.diff(topo.path_ptr)
    link = topo.path_idx
    # each path entry's (sender, link) and (receiver, link) keys, built without dividing the pair index
    src_key = np.repeat(np.arange(G) * nl, lengths.reshape(G, G).sum(axis=1)) + link
    dst_key = np.repeat(np.tile(np.arange(G) * nl, G), lengths) + link
    flows = np.bincount(link, minlength=nl).astype(float)
    busiest = np.maximum(np.bincount(src_key, minlength=G * nl)[src_key],
                         np.bincount(dst_key, minlength=G * nl)[dst_key])
    cost = flows[link] / (busiest * topo.capacity[link])
    worst = np.zeros(G * G)
    starts = topo.path_ptr[:-1][lengths > 0]
    worst[lengths > 0] = np.maximum.reduceat(cost, starts)
    first = np.arange(ep) * tp
    out = worst.reshape(G, G)[np.ix_(first, first)] / tp
    np.fill_diagonal(out, 0.0)
    return out


def layer_fixed_seconds(topo: Topology, model: ModelSpec, tp: int, options: EngineOptions, tokens_per_gpu: float,
                        attention: Attention | None) -> float:
    """Seconds of a layer that no placement changes, at the workload's mean tokens per GPU: the attention
    (:func:`~moesim.sim.compute.dense_time`), the pipeline's steps before the dispatch and after the combine,
    the expert side's intercept (its time at the operating point less the marginal cost the optimiser counts),
    the two all-to-all launches, and the model's shared experts and dense layers (these spread over its MoE
    layers)."""
    gpu, T = topo.cluster.gpu, float(tokens_per_gpu)
    ep = topo.cluster.num_gpus // tp
    experts = -(-model.num_experts // ep)
    r0 = max(T * model.top_k * tp, 1.0)
    dense = float(dense_time(np.array([T]), model, gpu, tp=tp, attention=attention, dtype=options.dense_dtype,
                             pipeline=options.glue)[0])
    around = 0.0
    if options.moe_kernels != "ffn":
        work = LayerWork(home=np.array(T), sent=np.array(T * model.top_k), rows=np.zeros(model.num_experts))
        before, _, after = phase_times(work, model, gpu, pipeline=options.moe_kernels, tp=tp,
                                       dtype=options.expert_dtype, launch=options.launch,
                                       expert_major=options.a2a == "deepep_low_latency")
        around = float(before + after)
    at = float(expert_seconds(np.array([r0]), model, gpu, tp, options, experts)[0])
    slope = compute_s_per_pair(topo, model, tp, options, tokens_per_gpu)
    kernel = topo.cluster.a2a_kernels.family(options.a2a)  # its fixed costs: two calls, one count exchange
    launch_us = kernel.launch_us if kernel.launch_us is not None else topo.cluster.a2a_launch_us
    fixed = dense + around + max(at - slope * r0, 0.0) + (2 * launch_us + kernel.notify_us) * 1e-6
    if model.shared_experts or model.dense_layers:
        dense_layers = sum(float(dense_layers_time(np.array([T]), model, gpu, model.dense_layers_before(l),
                                                   attention=attention, launch=options.launch,
                                                   dtype=options.dense_dtype, pipeline=options.glue)[0])
                           for l in range(model.num_layers))
        fixed += float(shared_expert_time(np.array([T]), model, gpu, launch=options.launch,
                                          dtype=options.dense_dtype)[0])
        fixed += dense_layers / model.num_layers
    return fixed


def a2a_uniform_seconds(topo: Topology, model: ModelSpec, tp: int, options: EngineOptions, tokens_per_gpu: float,
                        s: np.ndarray) -> tuple[float, float]:
    """A layer's dispatch and combine with every token's picks spread evenly over the EP ranks, from rank 0's
    row of ``s`` (seconds per byte): (inside its node, to other nodes). A token sends a copy to a rank with
    probability ``k / EP`` (one copy per pick) or ``1 - (1 - 1/EP)^k`` (one per destination rank)."""
    ep = s.shape[0]
    T = float(tokens_per_gpu) * tp
    q = (1.0 - (1.0 - 1.0 / ep) ** model.top_k) if a2a_copies(options) != "expert" else model.top_k / ep
    per_byte = T * q * (model.dispatch_bytes + model.combine_bytes)
    node = np.arange(ep) * tp // topo.cluster.gpus_per_node
    same = node == node[0]
    return float(per_byte * s[0][same].sum()), float(per_byte * s[0][~same].sum())


def hardware_costs(topo: Topology, model: ModelSpec, *, tp: int, options: EngineOptions,
                   tokens_per_gpu: float, attention: Attention | None = None) -> HardwareCosts:
    """The placement cost terms of ``model`` on ``topo`` under the engine ``options``, at ``tokens_per_gpu``."""
    s = rank_seconds_per_byte(topo, tp)
    return HardwareCosts(compute_s_per_pair=compute_s_per_pair(topo, model, tp, options, tokens_per_gpu),
                         rank_s_per_byte=s,
                         dispatch_bytes=float(model.dispatch_bytes), combine_bytes=float(model.combine_bytes),
                         a2a_copies=a2a_copies(options), coherent=options.dataflow == "coherent",
                         layer_fixed_s=layer_fixed_seconds(topo, model, tp, options, tokens_per_gpu, attention),
                         a2a_uniform_s=a2a_uniform_seconds(topo, model, tp, options, tokens_per_gpu, s))
