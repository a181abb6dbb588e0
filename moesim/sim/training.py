"""A training step of an MoE model: forward and backward through the MoE layers of one pipeline stage, the
gradient synchronisation of the non-expert parameters, and the optimizer step.

Per MoE layer and GPU the forward is the serving engine's layer (:mod:`moesim.sim.engine`), kernel by kernel
with the same cost models (:mod:`moesim.sim.compute`, :mod:`moesim.sim.kernels`): the dense layers before it,
the attention (projections and core), the pipeline's steps before the dispatch, the shared experts, the
dispatch all-to-all, the experts' side, the combine all-to-all and the top-k reduction. The backward runs
the layers in reverse, each kernel at a closed-form multiple of its forward time (:data:`BACKWARD`):

- every GEMM (routed experts' gate-up and down, shared experts, attention projections, dense MLPs, router)
  runs twice, a data-gradient and a weight-gradient GEMM of the forward's FLOPs and bytes: 2x;
- the attention core (FlashAttention's backward recomputes the scores: five matmuls of the forward's size
  against two): 2.5x;
- the SwiGLU activation's backward reads gate, up and the output gradient and writes two gradients (5 rows
  of f against the forward's 3): 5/3;
- gathers, scatters and the top-k reduction move their bytes back once: 1x;
- the all-to-alls run reversed: the combine's gradient goes to the experts' GPUs (the dispatch's byte matrix,
  at the combine's bf16 bytes per copy, or the dispatch's fp8 ones with ``training.fp8_gradient_dispatch``, as
  DeepSeek-V3 quantises the activation gradient before the down-projections), the dispatch's gradient comes home
  (the combine's matrix, bf16).

A collective starts when its last GPU joins and releases each GPU when its own bytes are moved (the engine's
rule); its durations come from the cluster's max-min fair flow model (:class:`moesim.sim.network.Fabric`), so
stragglers - GPUs with more expert rows - hold every all-to-all back. Fully sharded sparse data parallelism
adds, per layer, a SparseAllGather of the materialised experts before the forward (and, with
re-materialisation, again before the backward) and a SparseReduceScatter of their gradients after the
backward (:mod:`moesim.placement.fssdp` gives their byte matrices); with prefetching (FSDP-style) each is
hidden behind the compute of the neighbouring layer, up to that compute's length.

Overlap (``TrainOptions.overlap``): ``none`` runs each micro-batch's forward then backward; ``dualpipe``
overlaps the forward chunk of one micro-batch with the backward chunk of another, layer by layer, as
DeepSeek's DualPipe (and Megatron's 1F1B all-to-all overlap) do: a layer pair takes the longer of its compute
(both chunks, slowed by the SMs the communication kernels occupy) and its four all-to-alls. The step
(:func:`step_seconds`): ``m`` micro-batches, a pipeline bubble of ``pp - 1`` micro-batch times (1F1B) or
``pp / 2 - 1`` (DualPipe), the exposed part of the gradient all-reduce (hidden behind the last backward when
``overlap_grad_sync``), and Adam over the GPU's local parameters, memory-bound (:data:`ADAM_BYTES_PER_PARAM`).

Deliberately ignored: the embedding, the LM head and the loss; pipeline point-to-point transfers; tensor
parallelism's collectives (``tp`` divides each GPU's work; its all-gathers and reduce-scatters are not charged);
activation recomputation's kernel-level details (``recompute`` charges the layer's forward compute again); link
contention between an overlapped all-gather and the all-to-alls (prefetches overlap compute only); routing
that changes between the micro-batches of one step (each step's routing is its trace batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import simpy

from moesim.hardware.topology import Topology
from moesim.sim.compute import Attention, attention_time, dense_layers_time, dense_time, expert_time, shared_expert_time
from moesim.sim.engine import EngineOptions
from moesim.sim.kernels import AFTER_COMBINE, BEFORE_DISPATCH, LayerWork, step_times
from moesim.sim.network import Fabric, Routing
from moesim.traces.model import ModelSpec

# Backward time as a multiple of the forward's, per kernel (module docstring); kernels not listed: 1x.
BACKWARD = {"attn_proj": 2.0, "attn_core": 2.5, "shared": 2.0, "dense_layers": 2.0, "router": 2.0,
            "gemm_gate_up": 2.0, "gemm_down": 2.0, "experts_ffn": 2.0, "activation": 5.0 / 3.0}
# Adam, per parameter: read the gradient (fp32), read and write the fp32 master weight and both moments, write
# the bf16 weight: 4 + 8 + 8 + 8 + 2 bytes.
ADAM_BYTES_PER_PARAM = 30.0
A2A = ("dispatch", "combine", "combine_bwd", "dispatch_bwd")


@dataclass(frozen=True)
class TrainOptions:
    """How the step is run (module docstring)."""

    pp: int = 1  # pipeline stages; the simulated stage holds ceil(layers / pp) MoE layers
    micro_batches: int = 1  # per step (gradient accumulation); each is the workload's tokens_per_gpu per GPU
    overlap: Literal["none", "dualpipe"] = "none"
    overlap_grad_sync: bool = True  # the gradient all-reduce runs beside the last micro-batch's backward
    prefetch: bool = True  # FSSDP all-gathers / reduce-scatters hidden behind a neighbouring layer's compute
    recompute: bool = False  # activation recomputation: the forward's compute again in the backward
    grad_bytes: float = 4.0  # bytes per gradient element (fp32 main gradients, as Megatron keeps them)
    optimizer_bytes: float = 12.0  # fp32 master weight, Adam's two moments
    param_bytes: float = 2.0  # bf16 weights
    gemm_backward: float = 2.0  # backward / forward time of every GEMM (BACKWARD; 2: the FLOPs' ratio)

    def __post_init__(self) -> None:
        if self.pp < 1 or self.micro_batches < 1:
            raise ValueError(f"pp and micro_batches must be >= 1, got {self.pp} and {self.micro_batches}")
        if self.overlap not in ("none", "dualpipe"):
            raise ValueError(f"overlap must be none or dualpipe, got {self.overlap!r}")
        if self.overlap == "dualpipe" and self.pp > 1 and self.pp % 2:
            raise ValueError(f"dualpipe needs an even number of pipeline stages, got pp={self.pp}")


def layer_kernels(home: np.ndarray, rows: np.ndarray, model: ModelSpec, topo: Topology, *, layer: int, tp: int,
                  options: EngineOptions, attention: Attention | None) -> dict[str, np.ndarray]:
    """Forward seconds per GPU of every kernel of MoE layer ``layer`` (its dense layers before it included):
    ``home`` [G] tokens at home, ``rows`` [G, E] expert rows each GPU runs."""
    gpu = topo.cluster.gpu
    home = np.asarray(home, dtype=float)
    t = model.moe_layer_index(layer)
    core = attention_time(home, model, gpu, attention, layer=t) if attention is not None else np.zeros_like(home)
    attn = dense_time(home, model, gpu, tp=tp, attention=attention, layer=t, dtype=options.dense_dtype,
                      pipeline=options.glue)
    out = {"dense_layers": dense_layers_time(home, model, gpu, model.dense_layers_before(layer), attention=attention,
                                             launch=options.launch, dtype=options.dense_dtype,
                                             pipeline=options.glue),
           "attn_proj": attn - core, "attn_core": core,
           "shared": shared_expert_time(home, model, gpu, launch=options.launch, dtype=options.dense_dtype)}
    if options.moe_kernels == "ffn":
        out["experts_ffn"] = expert_time(rows, model, gpu, tp=tp, grouped=options.grouped)
        return out
    work = LayerWork(home=home, sent=home * model.top_k, rows=rows)
    out.update(step_times(work, model, gpu, pipeline=options.moe_kernels, tp=tp, dtype=options.expert_dtype,
                          launch=options.launch, expert_major=options.a2a == "low_latency"))
    return out


GEMMS = ("attn_proj", "shared", "dense_layers", "router", "gemm_gate_up", "gemm_down", "experts_ffn")


def backward_kernels(fwd: dict[str, np.ndarray], gemm_factor: float = 2.0,
                     own: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Backward seconds per GPU of each kernel, from its forward time (:data:`BACKWARD`); ``gemm_factor``
    replaces the GEMMs' 2 (``GPUSpec.gemm_backward``, measured on an H200, benchmarks/validation/train_h200);
    ``own`` gives kernels their own backward times (the attention core's, from its kernel family's measured
    backward: :func:`moesim.sim.compute.attention_backward_time`)."""
    out = {k: v * (gemm_factor if k in GEMMS else BACKWARD.get(k, 1.0)) for k, v in fwd.items()}
    out.update({k: v for k, v in (own or {}).items() if k in fwd})
    return out


def _phase(kernels: dict[str, np.ndarray], which: str) -> np.ndarray:
    """Sum of the kernels of one phase: ``pre`` (before the dispatch), ``experts``, ``post`` (after the combine)."""
    pre = {"dense_layers", "attn_proj", "attn_core", "shared", *BEFORE_DISPATCH}
    post = set(AFTER_COMBINE)
    names = {"pre": [k for k in kernels if k in pre], "post": [k for k in kernels if k in post],
             "experts": [k for k in kernels if k not in pre and k not in post]}[which]
    zero = np.zeros_like(next(iter(kernels.values())))
    return sum((kernels[k] for k in names), zero)


@dataclass
class LayerStep:
    """One MoE layer of one micro-batch, ready to time: per-GPU kernel seconds both ways, and the byte matrices
    of its collectives ([G, G]; FSSDP's ``gather`` and ``reduce`` are None under expert parallelism)."""

    fwd: dict[str, np.ndarray]
    bwd: dict[str, np.ndarray]
    mats: dict[str, np.ndarray]
    gather: np.ndarray | None = None
    reduce: np.ndarray | None = None


class CollectiveTimer:
    """Durations of collectives on one topology: each runs alone on a fresh SimPy clock from the fabric's max-min
    fair flows; per GPU, the seconds from the start until its own sends and receives are done (launch
    included). The fabric reuses the fluid phase of a collective that scales, or mirrors, a recent one."""

    def __init__(self, topo: Topology, *, rate_tolerance: float = 0.01, routing: Routing | None = None,
                 a2a: str = "nccl") -> None:
        self.topo, self.a2a = topo, a2a  # the all-to-alls' kernel family (the engine's a2a); the rest run as NCCL
        self.env = simpy.Environment()
        self.fabric = Fabric(self.env, topo, rate_tolerance=rate_tolerance, routing=routing or Routing.of(topo))
        self.calls = 0

    def durations(self, nbytes: np.ndarray, name: str = "collective", *, a2a: bool = False,
                  notify: bool = False) -> np.ndarray:
        """[G] seconds per GPU; zeros when nothing moves. ``a2a``: an all-to-all of the layer, run by the
        timer's kernel family (its launch, bandwidth shares and, with ``notify``, its layout step); else NCCL."""
        nbytes = np.asarray(nbytes, dtype=float)
        if not (nbytes > 0).any():
            return np.zeros(nbytes.shape[0])
        self.calls += 1
        proc = self.env.process(self.fabric.collective(name, nbytes, kernel=self.a2a if a2a else "nccl",
                                                       notify=notify))
        self.env.run(until=proc)
        res = proc.value
        assert res is not None
        return np.asarray(res.gpu_done - res.start)


@dataclass
class MicroBatch:
    """One micro-batch's pass through the stage's layers (seconds): forward, backward, their overlapped pair
    time under DualPipe, and where the time went (``terms``: per kernel or collective, mean over GPUs, summed
    over layers; ``wait`` is the time GPUs spent waiting for the slowest to join a collective)."""

    forward_s: float
    backward_s: float
    pair_s: float  # one forward chunk beside one backward chunk (DualPipe); forward + backward without overlap
    terms: dict[str, float] = field(default_factory=dict)
    comm_s: float = 0.0  # the four all-to-alls of the DualPipe pairs
    hidden_s: float = 0.0  # of which overlapped with compute (0 without overlap)
    gather_s: float = 0.0  # FSSDP, exposed: SparseAllGathers before the step's first forward
    regather_s: float = 0.0  # again before each backward (re-materialisation)
    reduce_s: float = 0.0  # SparseReduceScatters after the step's last backward

    @property
    def overlap_share(self) -> float:
        return self.hidden_s / self.comm_s if self.comm_s > 0 else 0.0


def _add(terms: dict[str, float], key: str, value: np.ndarray | float) -> None:
    terms[key] = terms.get(key, 0.0) + float(np.mean(value))


def _join(ready: np.ndarray, dur: np.ndarray, terms: dict[str, float], name: str) -> np.ndarray:
    """The engine's rendezvous: start when the last GPU joins, release each when its bytes are moved."""
    start = float(ready.max())
    _add(terms, "wait", start - ready)
    _add(terms, name, dur)
    return start + dur


def _compute(ready: np.ndarray, seconds: np.ndarray, kernels: dict[str, np.ndarray], terms: dict[str, float],
             prefix: str, names: list[str]) -> np.ndarray:
    for k in names:
        _add(terms, f"{prefix}{k}", kernels[k])
    return ready + seconds


def _chunk(ready: np.ndarray, lp: LayerStep, durs: dict[str, np.ndarray], terms: dict[str, float],
           backward: bool, recompute: bool) -> np.ndarray:
    """One layer's forward (or backward) on every GPU from ``ready`` (module docstring's order)."""
    k = lp.bwd if backward else lp.fwd
    pre = [n for n in k if n in ("dense_layers", "attn_proj", "attn_core", "shared", *BEFORE_DISPATCH)]
    post = [n for n in k if n in AFTER_COMBINE]
    mid = [n for n in k if n not in pre and n not in post]
    tag = "bwd." if backward else "fwd."
    first, second = ("combine_bwd", "dispatch_bwd") if backward else ("dispatch", "combine")
    before, after = (post, pre) if backward else (pre, post)
    ready = _compute(ready, sum((k[n] for n in before), np.zeros_like(ready)), k, terms, tag, before)
    ready = _join(ready, durs[first], terms, first)
    extra = _phase(lp.fwd, "experts") if backward and recompute else 0.0
    ready = _compute(ready, _phase(k, "experts") + extra, k, terms, tag, mid)
    ready = _join(ready, durs[second], terms, second)
    extra = _phase(lp.fwd, "pre") if backward and recompute else 0.0
    return _compute(ready, sum((k[n] for n in after), np.zeros_like(ready)) + extra, k, terms, tag, after)


def _fssdp_exposed(lp_durs: list[float], neighbour_compute: list[float], prefetch: bool) -> list[float]:
    """Exposed seconds of per-layer FSSDP collectives: hidden behind the neighbouring layer's compute with
    prefetching (the first one of the pass has none), fully exposed otherwise."""
    if not prefetch:
        return list(lp_durs)
    return [d if i == 0 else max(0.0, d - neighbour_compute[i - 1]) for i, d in enumerate(lp_durs)]


def run_micro_batch(layers: list[LayerStep], timer: CollectiveTimer, options: TrainOptions, *,
                    slowdown: float = 1.0, rematerialize: bool = False) -> MicroBatch:
    """Time one micro-batch through ``layers`` (forward in order, backward in reverse) and its DualPipe pair.
    FSSDP's collectives are timed here but charged per step (:attr:`MicroBatch.gather_s`, ``reduce_s``): the
    experts are materialised once per step and their gradients accumulate over its micro-batches."""
    G = timer.topo.num_gpus
    terms: dict[str, float] = {}
    # the forward dispatch computes its layout (notify); the backward's reuses it (DeepEP's cached handle)
    durs = [{n: timer.durations(lp.mats[n], n, a2a=True, notify=n == "dispatch") for n in A2A} for lp in layers]
    ready = np.zeros(G)
    for lp, d in zip(layers, durs):
        ready = _chunk(ready, lp, d, terms, backward=False, recompute=False)
    forward = float(ready.max())
    for lp, d in zip(layers[::-1], durs[::-1]):
        ready = _chunk(ready, lp, d, terms, backward=True, recompute=options.recompute)
    backward = float(ready.max()) - forward
    gathers = [float(timer.durations(lp.gather, "sparse_allgather").max()) if lp.gather is not None else 0.0
               for lp in layers]
    reduces = [float(timer.durations(lp.reduce, "sparse_reduce_scatter").max()) if lp.reduce is not None else 0.0
               for lp in layers]
    fwd_c = [float(sum(v.max() for v in lp.fwd.values())) for lp in layers]
    bwd_c = [float(sum(v.max() for v in lp.bwd.values())) for lp in layers][::-1]
    gather = sum(_fssdp_exposed(gathers, fwd_c, options.prefetch))
    regather = sum(_fssdp_exposed(gathers[::-1], bwd_c, options.prefetch)) if rematerialize else 0.0
    reduce = sum(_fssdp_exposed(reduces[::-1], bwd_c, options.prefetch))
    terms.update({"fssdp_gather": gather, "fssdp_regather": regather, "fssdp_reduce": reduce})
    pair, comm, hidden = _pairs(layers, durs, slowdown, options.recompute)
    if options.overlap == "none":
        pair, hidden = forward + backward, 0.0
    return MicroBatch(forward, backward, pair, terms, comm, hidden, gather_s=gather, regather_s=regather,
                      reduce_s=reduce)


def _pairs(layers: list[LayerStep], durs: list[dict[str, np.ndarray]], slowdown: float,
           recompute: bool) -> tuple[float, float, float]:
    """DualPipe: per layer, a forward chunk beside a backward chunk takes the longer of their compute on the
    slowest GPU (slowed by the communication kernels' SMs) and their four all-to-alls on the comm stream."""
    total = comm = hidden = 0.0
    for lp, d in zip(layers, durs):
        compute = sum(lp.fwd.values()) + sum(lp.bwd.values())
        if recompute:
            compute = compute + sum(lp.fwd.values())
        c = float(np.max(compute)) * slowdown
        a = sum(float(d[n].max()) for n in A2A)
        total += max(c, a)
        comm += a
        hidden += min(c, a)
    return total, comm, hidden


def comm_slowdown(topo: Topology, options: EngineOptions) -> float:
    """How much longer compute takes while communication kernels hold ``comm_sms`` SMs (moesim.sim.overlap)."""
    sms = topo.cluster.gpu.sms
    comm = topo.cluster.a2a_kernels.family(options.a2a).sms if options.comm_sms is None else options.comm_sms
    if comm >= sms:
        raise ValueError(f"comm_sms ({comm}) must leave the GPU some of its {sms} SMs")
    return sms / (sms - comm)


def allreduce_bytes(num_gpus: int, gpus_per_node: int, stride: int, nbytes: float) -> np.ndarray:
    """[G, G] bytes of ring all-reduces of ``nbytes`` per GPU among GPUs ``lane, lane + stride, ...`` (one
    all-reduce per lane; ``stride`` = tp for data parallelism, ep x tp for expert data parallelism). Each of the
    ``n`` members moves ``P = 2 (n - 1) / n x nbytes`` (reduce-scatter then all-gather): to the next member on its
    node (a ring over NVLink), and, between nodes, ``P / k`` to the member at its own position on the next node
    (``k`` members per node): NCCL's rings spread the inter-node hops over every NIC of the node."""
    out = np.zeros((num_gpus, num_gpus))
    if nbytes <= 0:
        return out
    for lane in range(stride):
        members = np.arange(lane, num_gpus, stride)
        n = members.size
        if n < 2:
            continue
        P = 2.0 * (n - 1) / n * nbytes
        node = members // gpus_per_node
        nodes = np.unique(node)
        per_node = [members[node == i] for i in nodes]
        for i, here in enumerate(per_node):
            if here.size > 1:
                out[here, np.roll(here, -1)] += P
            if nodes.size > 1:
                there = per_node[(i + 1) % nodes.size]
                k = min(here.size, there.size)
                out[here[:k], there[:k]] += P / here.size
    return out


def adam_seconds(params: float, topo: Topology) -> float:
    """Memory-bound Adam over ``params`` local parameters (:data:`ADAM_BYTES_PER_PARAM` each at HBM rate)."""
    return params * ADAM_BYTES_PER_PARAM / topo.cluster.gpu.hbm_bytes_per_s


def pipeline_bubble(options: TrainOptions) -> float:
    """Idle micro-batch times of a step: 1F1B ``pp - 1``; DualPipe ``pp / 2 - 1`` (its bidirectional schedule
    halves the bubble)."""
    if options.pp == 1:
        return 0.0
    return options.pp / 2 - 1 if options.overlap == "dualpipe" else float(options.pp - 1)


def step_seconds(mb: MicroBatch, options: TrainOptions, *, grad_sync_s: float, optimizer_s: float,
                 stall_s: float = 0.0) -> dict[str, float]:
    """A step's time and its parts (module docstring), from one micro-batch's times; FSSDP's gathers once per
    step (and before every backward with re-materialisation), its reduce-scatters once."""
    m, one = options.micro_batches, mb.forward_s + mb.backward_s
    if options.overlap == "dualpipe":
        compute = one + (m - 1) * mb.pair_s
    else:
        compute = m * one
    bubble = pipeline_bubble(options) * one
    hide = mb.backward_s if options.overlap_grad_sync else 0.0
    exposed = max(0.0, grad_sync_s - hide)
    fssdp = mb.gather_s + m * mb.regather_s + mb.reduce_s
    total = compute + bubble + fssdp + exposed + optimizer_s + stall_s
    return {"step": total, "compute": compute, "bubble": bubble, "fssdp": fssdp, "grad_sync": exposed,
            "grad_sync_total": grad_sync_s, "optimizer": optimizer_s, "migration": stall_s}
