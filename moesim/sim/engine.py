"""The SimPy engine: replays a routing trace through a placement on a cluster, one MoE layer at a time.

Per batch, every GPU runs one SimPy process. For each MoE layer a GPU:
0. runs the dense (non-MoE) transformer layers that come before this MoE layer, if the model has any
   (:func:`moesim.sim.compute.dense_layers_time`: attention and a dense SwiGLU MLP each, on its resident tokens,
   no all-to-all; the model's leading dense layers run before MoE layer 0);
1. runs the layer's non-expert work (attention projections, and the attention core when the workload gives
   sequence lengths; :func:`moesim.sim.compute.dense_time`) for its resident tokens; with tensor
   parallelism (tp > 1) the attention is tensor-parallel too, as in Megatron with sequence parallelism:
   an all-gather of the TP group's activations before it and a reduce-scatter after it;
2. runs the MoE kernel pipeline's steps before the dispatch (router, permutation; :mod:`moesim.sim.kernels`,
   ``EngineOptions.moe_kernels``), then the layer's shared experts on its resident tokens, if the model has
   any (:func:`moesim.sim.compute.shared_expert_time`; no overlap yet: they hold the GPU before the dispatch,
   see :meth:`Simulation._shared_expert`), then joins the dispatch all-to-all - token copies to the GPUs
   holding their experts;
3. with expert tensor parallelism (tp > 1), joins an all-gather inside its EP rank;
4. runs its experts: the pipeline's regroup, grouped GEMMs, activation and unregroup (``moe_kernels: ffn``: the
   expert FFNs alone, roofline, grouped or one kernel per expert);
5. with tp > 1, joins a reduce-scatter inside its EP rank;
6. joins the combine all-to-all that returns the expert outputs home, then runs the weighted top-k reduction.
A collective starts when its last GPU joins (so every GPU waits for the slowest, as with NCCL; a TP
collective waits only for its own TP group), moves its bytes as max-min fair flows over the links
(:mod:`moesim.sim.network`), and releases each GPU when that GPU's own sends and receives are done. A batch
ends when its last GPU finishes the last layer; batches run one after another.

How an all-to-all moves its bytes is its kernel family, ``EngineOptions.a2a`` (docs/a2a.md), each with its own
fixed costs (``cluster.a2a_kernels``, :func:`moesim.sim.network.kernel_cost`): ``nccl`` (alias ``direct``; NCCL
all_to_all: every copy straight from source to destination GPU), ``deepep_normal`` (alias ``hierarchical``;
DeepEP's normal kernels: a notify step before the dispatch, then on several nodes one network copy per
destination node to the sender's rail peer there and NVLink forwarding,
:func:`moesim.sim.traffic.hierarchical_bytes`; on one node direct), ``deepep_low_latency`` (alias
``low_latency``; DeepEP's low-latency kernels: direct, one message per (token, expert), no deduplication) or
``nvlink_one_sided`` (TensorRT-LLM's one-sided NVLink kernels: direct copies, one NVLink domain only).

``EngineOptions.dataflow``: ``standard`` (above: tokens live at home, two all-to-alls per layer) or
``coherent`` (ExFlow's context-coherent expert parallelism, where cross-layer expert affinity pays):
every GPU can run attention for any token (its context is replicated; that all-gather is not charged),
so after layer l a token stays on the GPUs of its layer-l experts, runs layer l+1's attention there and
goes straight to the GPUs of its layer-(l+1) experts (:func:`moesim.sim.traffic.coherent_traffic`,
recorded as that layer's dispatch). One all-to-all per layer: the first layer dispatches from home,
only the last combines home. Coherent transfers are direct (``a2a: direct``).

Which copy of a replicated expert serves a token is ``EngineOptions.replica_rule`` (vLLM's token index,
SGLang's static local choice, or an LPLB-like balanced split; :mod:`moesim.sim.replicas`).

Token bookkeeping is numpy (:mod:`moesim.sim.traffic`); SimPy owns time and events. Everything the run
did is recorded in flat arrays (:class:`SimRecords`); metrics are computed afterwards.
``EngineOptions.overlap: two_batch`` splits every batch into two micro-batches whose communication overlaps the
other's compute, and runs the shared experts beside their own dispatch (:mod:`moesim.sim.overlap`).
Deliberately ignored: norms, embeddings, the LM head and multi-token-prediction layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Generator, Literal

import numpy as np
import simpy
from simpy.events import NORMAL, EventPriority

from moesim.hardware.spec import A2A_ALIASES, A2A_FAMILIES
from moesim.hardware.topology import Topology
from moesim.placement.format import Placement
from moesim.sim.compute import Attention, dense_layers_time, dense_time, expert_time, shared_expert_time
from moesim.sim.kernels import LAUNCHES, PIPELINES, LayerWork, phase_times
from moesim.sim.network import CollectiveResult, Fabric, Routing
from moesim.sim.replicas import ReplicaChooser
from moesim.sim.traffic import coherent_traffic, hierarchical_bytes, layer_traffic
from moesim.traces.format import Layout, Trace
from moesim.traces.model import ModelSpec

GPU_FIELDS = (
    "t_layer_start", "t_attn_start", "t_dense_end", "t_shared_start", "t_dispatch_join", "t_dispatch_start",
    "t_dispatch_done", "t_compute_start", "t_compute_end", "t_combine_join", "t_combine_start", "t_combine_done",
    "t_layer_end",
    "tokens", "recv_copies", "bytes_out_intra", "bytes_out_inter",
)


TP_COLLECTIVES = ("attn_gather", "attn_scatter", "allgather", "reducescatter")  # inside each TP group


@dataclass(frozen=True)
class EngineOptions:
    dedup: bool = True  # one copy per (token, destination GPU); False: one per (token, expert)
    grouped: bool = True  # one grouped-GEMM launch per GPU and layer; False: one kernel per expert
    rate_tolerance: float = 0.01  # see moesim.sim.network; 0 = exact max-min
    a2a: str = "nccl"  # the all-to-all kernel family (A2A_FAMILIES or an alias); see the module docstring
    replica_rule: str = "token_index"  # token_index (vLLM), local (SGLang static), balanced_split (LPLB)
    dataflow: Literal["standard", "coherent"] = "standard"  # see the module docstring
    # the MoE layer's kernel pipeline (moesim.sim.kernels); ffn: the experts only
    moe_kernels: Literal["ffn", "torch_reference", "fused", "deepgemm"] = "torch_reference"
    expert_dtype: Literal["bf16", "fp8"] = "bf16"  # the expert GEMMs' dtype (fp8 only with a kernel pipeline)
    launch: Literal["eager", "cuda_graph"] = "eager"  # how the pipeline's kernels are launched (moesim.sim.kernels)
    overlap: Literal["none", "two_batch"] = "none"  # two micro-batches overlap (moesim.sim.overlap)
    comm_sms: int | None = None  # SMs an all-to-all kernel occupies while in flight; None: by a2a (overlap module)
    dense_dtype: Literal["bf16", "fp8"] = "bf16"  # projections, shared experts, dense MLPs (moesim.sim.compute)

    @property
    def glue(self) -> str | None:
        """The pipeline whose elementwise rate (and eager or fused kernels) the layers' glue runs at; none with
        ``moe_kernels: ffn`` (the expert FFNs alone: nothing around them is charged)."""
        return None if self.moe_kernels == "ffn" else self.moe_kernels

    def __post_init__(self) -> None:
        if self.a2a not in (*A2A_FAMILIES, *A2A_ALIASES):
            raise ValueError(f"a2a must be one of {', '.join((*A2A_FAMILIES, *A2A_ALIASES))}, got {self.a2a!r}")
        object.__setattr__(self, "a2a", A2A_ALIASES.get(self.a2a, self.a2a))  # the family's own name
        if self.dataflow not in ("standard", "coherent"):
            raise ValueError(f"dataflow must be standard or coherent, got {self.dataflow!r}")
        if self.dataflow == "coherent" and self.a2a == "deepep_normal":
            raise ValueError("dataflow coherent moves tokens directly between expert GPUs; use a2a nccl (direct)")
        if self.dataflow == "coherent" and self.replica_rule != "token_index":
            raise ValueError("dataflow coherent picks replicas by token index; use replica_rule token_index")
        if self.moe_kernels not in ("ffn", *PIPELINES):
            raise ValueError(f"moe_kernels must be ffn, {' or '.join(PIPELINES)}, got {self.moe_kernels!r}")
        if self.expert_dtype not in ("bf16", "fp8"):
            raise ValueError(f"expert_dtype must be bf16 or fp8, got {self.expert_dtype!r}")
        if self.expert_dtype == "fp8" and self.moe_kernels == "ffn":
            raise ValueError("expert_dtype fp8 needs a kernel pipeline (moe_kernels torch_reference, fused or "
                             "deepgemm)")
        if self.launch not in LAUNCHES:
            raise ValueError(f"launch must be {' or '.join(LAUNCHES)}, got {self.launch!r}")
        if self.launch == "cuda_graph" and self.moe_kernels not in ("fused", "deepgemm"):
            raise ValueError("launch cuda_graph needs moe_kernels fused or deepgemm (torch_reference's permute syncs "
                             "with the host for its split sizes, and ffn has no launch model)")
        if self.overlap not in ("none", "two_batch"):
            raise ValueError(f"overlap must be none or two_batch, got {self.overlap!r}")
        if self.overlap == "two_batch" and self.dataflow == "coherent":
            raise ValueError("overlap two_batch runs the standard dataflow (dispatch from home, combine home)")
        if self.dense_dtype not in ("bf16", "fp8"):
            raise ValueError(f"dense_dtype must be bf16 or fp8, got {self.dense_dtype!r}")
        if self.comm_sms is not None and self.comm_sms < 0:
            raise ValueError(f"comm_sms must be >= 0, got {self.comm_sms}")


@dataclass
class SimRecords:
    """Flat records of one run. ``gpu[name]`` arrays are [batches, layers, gpus] (times in seconds)."""

    cluster: str
    placement: str
    num_gpus: int
    tp: int
    gpus_per_node: int
    gpu: dict[str, np.ndarray]
    batch_start: np.ndarray
    batch_end: np.ndarray
    link_names: tuple[str, ...]
    link_kind: tuple[str, ...]
    link_capacity: np.ndarray
    link_bytes: np.ndarray
    sim_time: float
    events: int
    flows: int
    recomputations: int
    collectives: list[CollectiveResult] = field(default_factory=list)  # batch 0's, when run keeps them
    # overlap two_batch: each micro-batch's own records (``gpu`` then merges them: moesim.sim.overlap)
    micro: tuple[dict[str, np.ndarray], ...] = ()


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it schedules."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduled = 0

    def schedule(self, event: simpy.Event, priority: EventPriority = NORMAL, delay: float = 0) -> None:
        self.scheduled += 1
        super().schedule(event, priority, delay)


class _Rendezvous:
    """A collective among ``members`` GPUs (default all): starts when the last one joins; releases each GPU
    when it is done."""

    def __init__(self, fabric: Fabric, name: str, nbytes: np.ndarray, sink: list[CollectiveResult] | None,
                 members: int | None = None, *, kernel: str = "nccl", notify: bool = False):
        self.fabric, self.name, self.nbytes, self.sink = fabric, name, nbytes, sink
        self.kernel, self.notify = kernel, notify  # the all-to-all kernel family; a dispatch's count exchange
        G = nbytes.shape[0]
        self.events = [fabric.env.event() for _ in range(G)]
        self.members = G if members is None else members
        self.joined = 0
        self.start = np.nan

    def join(self, g: int) -> simpy.Event:
        self.joined += 1
        if self.joined == self.members:
            self.start = self.fabric.env.now
            self.fabric.env.process(self._run())
        return self.events[g]

    def _run(self) -> Generator[simpy.Event, None, None]:
        result = yield from self.fabric.collective(self.name, self.nbytes, self.events, kernel=self.kernel,
                                                   notify=self.notify)
        if self.sink is not None:
            self.sink.append(result)


class _GroupRendezvous:
    """One collective per TP group (``tp`` consecutive GPUs, an EP rank), each starting when its own GPUs
    have joined: a TP group does not wait for the rest of the cluster. Named ``NAME/tpI``."""

    def __init__(self, fabric: Fabric, name: str, nbytes: np.ndarray, sink: list[CollectiveResult] | None, tp: int):
        G = nbytes.shape[0]
        group = np.arange(G) // tp
        self.tp = tp
        self.parts = [_Rendezvous(fabric, f"{name}/tp{i}", nbytes * (group[:, None] == i) * (group[None, :] == i),
                                  sink, members=tp) for i in range(G // tp)]

    def join(self, g: int) -> simpy.Event:
        return self.parts[g // self.tp].join(g)


def _tp_matrices(recv: np.ndarray, tp: int, in_bytes: float, out_bytes: float) -> tuple[np.ndarray, np.ndarray]:
    """All-gather (token inputs, ``in_bytes`` each) and reduce-scatter (expert outputs, ``out_bytes`` each)
    byte matrices inside each EP rank (block diagonal)."""
    G = recv.size
    group = np.arange(G) // tp
    same = (group[:, None] == group[None, :]) & ~np.eye(G, dtype=bool)
    gather = same * (recv[:, None] * in_bytes)  # g sends what it received to every peer
    scatter = same * (recv[None, :] * out_bytes)  # g sends each peer the outputs of the peer's tokens
    return gather, scatter


@dataclass
class LayerPlan:
    """One layer of one batch, ready to run: its collectives and every GPU's compute phases (seconds)."""

    collectives: dict[str, "_Rendezvous | _GroupRendezvous"]
    dense_layers: np.ndarray  # the dense transformer layers before this MoE layer (none: zeros)
    dense: np.ndarray  # the MoE layer's attention
    before: np.ndarray  # the MoE pipeline's steps before the dispatch (router, permutation)
    shared: np.ndarray  # the shared experts (none: zeros)
    experts: np.ndarray
    after: np.ndarray  # the steps after the combine (top-k reduction)

    def start(self, name: str) -> float:
        """When the cluster-wide collective ``name`` (dispatch or combine) started."""
        coll = self.collectives[name]
        assert isinstance(coll, _Rendezvous)
        return float(coll.start)


class Simulation:
    """Replays traces through placements on one cluster. Reusable across placements."""

    def __init__(self, topo: Topology, model: ModelSpec, *, tp: int = 1,
                 options: EngineOptions = EngineOptions(), attention: Attention | None = None) -> None:
        cluster = topo.cluster
        if cluster.num_gpus % tp or cluster.gpus_per_node % tp:
            raise ValueError(f"tp={tp} must divide gpus_per_node={cluster.gpus_per_node}")
        self.topo, self.model, self.tp, self.options = topo, model, tp, options
        self.attention = attention  # sequence lengths for the attention core; None: projections only
        self.num_gpus = cluster.num_gpus
        self.num_ranks = cluster.num_gpus // tp
        if options.a2a == "nvlink_one_sided" and cluster.nodes > 1:
            raise ValueError(f"a2a nvlink_one_sided runs within one NVLink domain; this EP group spans {cluster.nodes} "
                             f"nodes of {cluster.gpus_per_node} GPUs (use deepep_normal, deepep_low_latency or nccl)")
        self.routing = Routing.of(topo)  # per topology: shared by every run's fabric

    def run(self, trace: Trace, layout: Layout, placement: Placement, *, name: str | None = None,
            progress: Callable[[int], object] | None = None, keep_collectives: bool = True) -> SimRecords:
        """Simulate every batch of ``trace`` under ``placement`` (recorded as ``name``, default its policy).
        ``progress(n)`` is told of finished layers."""
        if self.options.overlap == "two_batch":
            from moesim.sim.overlap import run_two_batch

            return run_two_batch(self, trace, layout, placement, name=name, progress=progress,
                                 keep_collectives=keep_collectives)
        topo, G = self.topo, self.num_gpus
        batches = layout.batch_indices()
        B, L = len(batches), self.model.num_layers
        rec = {f: np.zeros((B, L, G)) for f in GPU_FIELDS}
        env = CountingEnvironment()
        fabric = Fabric(env, topo, rate_tolerance=self.options.rate_tolerance, routing=self.routing)
        batch_start, batch_end = np.zeros(B), np.zeros(B)
        kept: list[CollectiveResult] = []
        flows = 0
        chooser = ReplicaChooser(self.options.replica_rule, placement, topo.cluster.gpus_per_node // self.tp)
        for b, idx in enumerate(batches):
            sink = kept if (keep_collectives and b == 0) else None
            plan, n = self._plan_batch(b, trace, layout, idx, placement, chooser, fabric, rec, sink)
            flows += n
            batch_start[b] = env.now
            procs = [env.process(self._gpu(env, b, g, plan, rec, progress)) for g in range(G)]
            env.run(until=env.all_of(procs))
            batch_end[b] = env.now

        return SimRecords(
            cluster=topo.cluster.name, placement=placement.policy if name is None else name, num_gpus=G,
            tp=self.tp, gpus_per_node=topo.cluster.gpus_per_node, gpu=rec, batch_start=batch_start,
            batch_end=batch_end, link_names=topo.link_names, link_kind=topo.link_kind, link_capacity=topo.capacity,
            link_bytes=fabric.link_bytes, sim_time=env.now, events=env.scheduled, flows=flows,
            recomputations=fabric.recomputations, collectives=kept,
        )

    def _compute(self, held: np.ndarray, sent: np.ndarray, tok: np.ndarray, *,
                 layer: int | None = None) -> tuple[np.ndarray, ...]:
        """Per GPU: non-expert work (attention, of transformer layer ``layer``), the pipeline's steps before the
        dispatch, the experts' side, the steps after the combine (:mod:`moesim.sim.kernels`; ``moe_kernels: ffn``
        is the expert FFNs alone)."""
        model, gpu, tp, opt = self.model, self.topo.cluster.gpu, self.tp, self.options
        dense = dense_time(held, model, gpu, tp=tp, attention=self.attention, layer=layer, dtype=opt.dense_dtype,
                           pipeline=opt.glue)
        if opt.moe_kernels == "ffn":
            zero = np.zeros_like(dense)
            return dense, zero, expert_time(tok, model, gpu, tp=tp, grouped=opt.grouped), zero
        before, experts, after = phase_times(LayerWork(home=held, sent=sent, rows=tok), model, gpu,
                                             pipeline=opt.moe_kernels, tp=tp, dtype=opt.expert_dtype,
                                             launch=opt.launch, expert_major=opt.a2a == "deepep_low_latency")
        return dense, before, experts, after

    def _phases(self, l: int, held: np.ndarray, sent: np.ndarray, tok: np.ndarray) -> dict[str, np.ndarray]:
        """Per GPU, the compute phases of MoE layer ``l`` (:class:`LayerPlan`'s fields): :meth:`_compute`'s, the
        dense layers before the MoE layer and its shared experts."""
        model, gpu = self.model, self.topo.cluster.gpu
        dense, before, experts, after = self._compute(held, sent, tok, layer=model.moe_layer_index(l))
        launch, dtype = self.options.launch, self.options.dense_dtype
        return {"dense_layers": dense_layers_time(held, model, gpu, model.dense_layers_before(l),
                                                  attention=self.attention, launch=launch, dtype=dtype,
                                                  pipeline=self.options.glue),
                "dense": dense, "before": before,
                "shared": shared_expert_time(held, model, gpu, launch=launch, dtype=dtype),
                "experts": experts, "after": after}

    def _plan_batch(self, b: int, trace: Trace, layout: Layout, idx: np.ndarray, placement: Placement,
                    chooser: ReplicaChooser, fabric: Fabric, rec: dict[str, np.ndarray],
                    sink: list[CollectiveResult] | None, tag: str = "") -> tuple[list[LayerPlan], int]:
        """Traffic, collectives and compute of every layer of batch ``b`` (the tokens ``idx``; ``tag`` names a
        micro-batch's collectives); records the per-GPU counts."""
        model, tp, G, opt = self.model, self.tp, self.num_gpus, self.options
        L, gpn = model.num_layers, self.topo.cluster.gpus_per_node
        dedup = opt.dedup and opt.a2a != "deepep_low_latency"
        hierarchical = opt.a2a == "deepep_normal" and self.topo.cluster.nodes > 1
        coherent = opt.dataflow == "coherent"
        same_node = self.topo.same_node()
        offdiag_mask = ~np.eye(G, dtype=bool)
        rank_of_gpu = np.arange(G) // tp
        # A batch's tokens are increasing indices; a contiguous run is sliced, not gathered.
        tokens = slice(idx[0], idx[-1] + 1) if idx.size and idx[-1] - idx[0] + 1 == idx.size else idx
        home = layout.home[idx]
        held = np.bincount(home, minlength=G)
        plan, flows = [], 0
        for l in range(L):
            picks = trace.experts[tokens, l, :]
            tr = layer_traffic(picks, home, idx, placement.gpus[l], num_gpus=G, tp=tp,
                               num_experts=model.num_experts, dedup=dedup, gpus_per_node=gpn if hierarchical else None,
                               replica_ranks=chooser.ranks(l, picks, home // tp))
            if hierarchical:
                assert tr.node_copies is not None  # counted when gpus_per_node is given
                disp = hierarchical_bytes(tr.copies, tr.node_copies, gpn, model.dispatch_bytes)
                comb = hierarchical_bytes(tr.copies, tr.node_copies, gpn, model.combine_bytes).T
            else:
                disp = tr.copies * model.dispatch_bytes
                comb = tr.copies.T * model.combine_bytes
            if coherent and l > 0:  # context-coherent: from layer l-1's experts straight to layer l's
                coh, held = coherent_traffic(trace.experts[tokens, l - 1, :], picks, home, idx, placement.gpus[l - 1],
                                             placement.gpus[l], num_gpus=G, tp=tp, dedup=dedup)
                disp = coh * model.dispatch_bytes
                tr = replace(tr, recv_copies=coh.sum(axis=0))
            tok = tr.expert_tokens[rank_of_gpu]  # [G, E]: each GPU of a rank runs all its tokens
            sent = held * model.top_k  # the pipeline's send buffer: one row per (token, pick)
            mats = {"dispatch": disp, "combine": comb}
            if coherent and l < L - 1:  # tokens go home only after the last layer
                del mats["combine"]
            if tp > 1:
                act = model.d_model * model.dtype_bytes
                mats["attn_gather"], mats["attn_scatter"] = _tp_matrices(held, tp, act, act)
                mats["allgather"], mats["reducescatter"] = _tp_matrices(tr.recv_copies, tp, model.dispatch_bytes,
                                                                            model.combine_bytes)
            offdiag = sum(mats.values()) * offdiag_mask
            rec["tokens"][b, l] = tok.sum(axis=1)
            rec["recv_copies"][b, l] = tr.recv_copies
            rec["bytes_out_intra"][b, l] = (offdiag * same_node).sum(axis=1)
            rec["bytes_out_inter"][b, l] = (offdiag * ~same_node).sum(axis=1)
            flows += sum(int(np.count_nonzero(m * offdiag_mask)) for m in mats.values())
            coll = {k: _GroupRendezvous(fabric, f"{k}[b{b}{tag}.l{l}]", m, sink, tp) if k in TP_COLLECTIVES
                    else _Rendezvous(fabric, f"{k}[b{b}{tag}.l{l}]", m, sink, kernel=opt.a2a, notify=k == "dispatch")
                    for k, m in mats.items()}
            plan.append(LayerPlan(coll, **self._phases(l, held, sent, tok)))
        return plan, flows

    def _gpu(self, env: CountingEnvironment, b: int, g: int, plan: list[LayerPlan], rec: dict[str, np.ndarray],
             progress: Callable[[int], object] | None) -> Generator[simpy.Event, None, None]:
        """One GPU's pass through the layers of batch ``b`` (see the module docstring for the steps)."""
        tp = self.tp
        for l, lp in enumerate(plan):
            coll = lp.collectives
            rec["t_layer_start"][b, l, g] = env.now
            if lp.dense_layers[g] > 0:
                yield env.timeout(lp.dense_layers[g])
            rec["t_attn_start"][b, l, g] = env.now
            if tp > 1:
                yield coll["attn_gather"].join(g)
            yield env.timeout(lp.dense[g])
            if tp > 1:
                yield coll["attn_scatter"].join(g)
            rec["t_dense_end"][b, l, g] = env.now
            if lp.before[g] > 0:
                yield env.timeout(lp.before[g])
            rec["t_shared_start"][b, l, g] = env.now
            yield from self._shared_expert(env, lp, g)
            rec["t_dispatch_join"][b, l, g] = env.now
            yield coll["dispatch"].join(g)
            rec["t_dispatch_start"][b, l, g] = lp.start("dispatch")
            rec["t_dispatch_done"][b, l, g] = env.now
            if tp > 1:
                yield coll["allgather"].join(g)
            rec["t_compute_start"][b, l, g] = env.now
            yield env.timeout(lp.experts[g])
            rec["t_compute_end"][b, l, g] = env.now
            if tp > 1:
                yield coll["reducescatter"].join(g)
            rec["t_combine_join"][b, l, g] = env.now
            if "combine" in coll:
                yield coll["combine"].join(g)
            rec["t_combine_start"][b, l, g] = lp.start("combine") if "combine" in coll else env.now
            rec["t_combine_done"][b, l, g] = env.now
            if lp.after[g] > 0:
                yield env.timeout(lp.after[g])
            rec["t_layer_end"][b, l, g] = env.now
            if g == 0 and progress is not None:
                progress(1)

    def _shared_expert(self, env: CountingEnvironment, lp: LayerPlan, g: int) -> Generator[simpy.Event, None, None]:
        """GPU ``g``'s shared experts in one layer. Today they hold the GPU between the router and the dispatch
        (no overlap); this is the seam where running them beside the dispatch all-to-all (on another stream, as
        DeepEP with two-batch overlap does) will go."""
        if lp.shared[g] > 0:
            yield env.timeout(lp.shared[g])
