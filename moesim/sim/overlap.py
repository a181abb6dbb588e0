"""Two-batch overlap (``EngineOptions.overlap: two_batch``): DeepSeek's dual micro-batch overlap, SGLang's TBO,
vLLM's DBO.

Every batch is split into two micro-batches: each GPU's home tokens, the first half (rounded up) in batch order
to micro-batch 0, the rest to micro-batch 1. Each micro-batch runs the standard layer (:mod:`moesim.sim.engine`)
with its own all-to-alls; on every GPU the two share one compute stream (a SimPy resource, first come first
served) and the network. A micro-batch holds the compute stream from the end of one all-to-all to the start of
the next - a stage: the reduction of layer l, the dense layers and attention of layer l+1, its router steps -
and gives it up while its all-to-all is in flight, so the other micro-batch computes meanwhile. The shared
experts run right after their own dispatch is issued, beside it (as DeepSeek and SGLang overlap them).

Communication kernels occupy SMs: while any all-to-all of a GPU is in flight (from its launch on that GPU until
its own sends and receives are done, waiting for the slowest GPU included, as DeepEP's kernels spin), a compute
step that starts on that GPU runs at ``(sms - comm_sms) / sms`` of its speed for its whole length.
``comm_sms`` is ``EngineOptions.comm_sms``, by default the kernel family's ``sms`` (``cluster.a2a_kernels``):
24 for ``nccl`` and ``deepep_normal`` (DeepEP's normal kernels as DeepSeek ran prefill, ``Buffer.set_num_sms(24)``:
108 compute + 24 communication SMs of 132, deepseek-ai/profile-data), 0 for ``deepep_low_latency`` (DeepEP's
low-latency kernels with receive hooks occupy no SM while the data moves), 16 for ``nvlink_one_sided`` (estimate).
With receive hooks a kernel's send and receive phases still hold the whole GPU: a family's ``hook_sm_us``
(DeepEP low-latency: 15 us each) runs on the compute stream right after the GPU joins the all-to-all (the send,
within the call's fixed cost) and again once its data landed, before the experts or the reduction (the receive,
taken out of the fixed cost: :func:`moesim.sim.network.kernel_cost`); a call alone costs what it costs without
hooks. In the step breakdown the send phases fall in the all-to-alls' ``wait``, ``dispatch`` and ``combine`` time
(they follow the GPU's join), the receives in ``stream_wait`` (the dispatch's) and ``reduce`` (the combine's).

Records: each micro-batch's own arrays are ``SimRecords.micro``; ``SimRecords.gpu`` merges them - counts summed,
``t_layer_start`` the earlier and ``t_layer_end`` the later of the two, every other time micro-batch 0's - so
the batch-level metrics (end to end, tokens, bytes) are the whole batch's and the per-phase ones micro-batch 0's.
Deliberately ignored: the exact order of kernels inside a stage beyond first come first served, slowdown that
changes while a step runs, expert tensor parallelism and attention TP (``tp`` must be 1: DP attention), and the
coherent dataflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generator

import numpy as np
import simpy

from moesim.placement.format import Placement
from moesim.sim.network import CollectiveResult, Fabric
from moesim.sim.replicas import ReplicaChooser
from moesim.traces.format import Layout, Trace

if TYPE_CHECKING:
    from moesim.sim.engine import CountingEnvironment, LayerPlan, SimRecords, Simulation

COUNTS = ("tokens", "recv_copies", "bytes_out_intra", "bytes_out_inter")


def split_two(idx: np.ndarray, home: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's tokens ``idx`` in two micro-batches: on each GPU the first half (rounded up) of its home
    tokens, in batch order, and the rest."""
    h = home[idx]
    counts = np.bincount(h, minlength=num_gpus)
    order = np.argsort(h, kind="stable")
    rank = np.empty(idx.size, dtype=np.int64)
    rank[order] = np.arange(idx.size) - np.repeat(np.cumsum(counts) - counts, counts)
    first = rank < (counts[h] + 1) // 2
    return idx[first], idx[~first]


def slowdown(sim: "Simulation") -> float:
    """How much longer a compute step takes while an all-to-all occupies ``comm_sms`` of the GPU's SMs."""
    opt, sms = sim.options, sim.topo.cluster.gpu.sms
    comm = sim.topo.cluster.a2a_kernels.family(opt.a2a).sms if opt.comm_sms is None else opt.comm_sms
    if comm >= sms:
        raise ValueError(f"comm_sms ({comm}) must leave the GPU some of its {sms} SMs")
    return sms / (sms - comm)


class _Stream:
    """One GPU's compute stream, shared by the micro-batches, and its all-to-alls in flight."""

    def __init__(self, env: "CountingEnvironment", slow: float) -> None:
        self.env, self.slow = env, slow
        self.compute = simpy.Resource(env, capacity=1)
        self.inflight = 0

    def run(self, seconds: float) -> simpy.Event:
        """A compute step of ``seconds`` (the caller holds the stream), slowed while an all-to-all is in flight."""
        return self.env.timeout(seconds * (self.slow if self.inflight else 1.0))

    def hook(self, seconds: float) -> Generator[simpy.Event, None, None]:
        """An all-to-all kernel's send or receive phase of ``seconds`` on the stream (the caller holds it)."""
        if seconds > 0:
            yield self.env.timeout(seconds)

    def comm(self, event: simpy.Event) -> Generator[simpy.Event, None, None]:
        """Wait for this GPU's part of an all-to-all already joined (counted in flight until then)."""
        try:
            yield event
        finally:
            self.inflight -= 1


def _micro_gpu(env: "CountingEnvironment", b: int, g: int, plan: list["LayerPlan"], rec: dict[str, np.ndarray],
               stream: _Stream, progress: Callable[[int], object] | None, hook: float = 0.0
               ) -> Generator[simpy.Event, None, None]:
    """One micro-batch on GPU ``g`` through the layers of batch ``b`` (see the module docstring); ``hook``: the
    seconds of each send and receive phase of its all-to-alls on the stream."""
    req = stream.compute.request()
    yield req
    for l, lp in enumerate(plan):
        coll = lp.collectives
        rec["t_layer_start"][b, l, g] = env.now
        yield stream.run(lp.dense_layers[g])
        rec["t_attn_start"][b, l, g] = env.now
        yield stream.run(lp.dense[g])
        rec["t_dense_end"][b, l, g] = env.now
        yield stream.run(lp.before[g])
        rec["t_shared_start"][b, l, g] = rec["t_dispatch_join"][b, l, g] = env.now
        dispatch = coll["dispatch"].join(g)
        stream.inflight += 1
        yield from stream.hook(hook)  # its send phase
        yield stream.run(lp.shared[g])  # beside its own dispatch
        stream.compute.release(req)
        yield from stream.comm(dispatch)
        rec["t_dispatch_start"][b, l, g] = lp.start("dispatch")
        rec["t_dispatch_done"][b, l, g] = env.now
        req = stream.compute.request()
        yield req
        yield from stream.hook(hook)  # its receive phase
        rec["t_compute_start"][b, l, g] = env.now
        yield stream.run(lp.experts[g])
        rec["t_compute_end"][b, l, g] = rec["t_combine_join"][b, l, g] = env.now
        combine = coll["combine"].join(g)
        stream.inflight += 1
        yield from stream.hook(hook)
        stream.compute.release(req)
        yield from stream.comm(combine)
        rec["t_combine_start"][b, l, g] = lp.start("combine")
        rec["t_combine_done"][b, l, g] = env.now
        req = stream.compute.request()
        yield req
        yield from stream.hook(hook)
        yield stream.run(lp.after[g])
        rec["t_layer_end"][b, l, g] = env.now
        if g == 0 and progress is not None and plan is not None:
            progress(1)
    stream.compute.release(req)


def merged(micro: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    """The batch's records from its micro-batches' (module docstring)."""
    out = {k: v.copy() for k, v in micro[0].items()}
    for f in COUNTS:
        out[f] = sum((m[f] for m in micro), np.zeros_like(out[f]))
    out["t_layer_start"] = np.minimum.reduce([m["t_layer_start"] for m in micro])
    out["t_layer_end"] = np.maximum.reduce([m["t_layer_end"] for m in micro])
    return out


def run_two_batch(sim: "Simulation", trace: Trace, layout: Layout, placement: Placement, *, name: str | None,
                  progress: Callable[[int], object] | None, keep_collectives: bool) -> "SimRecords":
    """:meth:`Simulation.run` with two-batch overlap (module docstring)."""
    from moesim.sim.engine import GPU_FIELDS, CountingEnvironment, SimRecords

    if sim.tp != 1:
        raise ValueError("overlap two_batch runs data-parallel attention (tp 1)")
    topo, G, L = sim.topo, sim.num_gpus, sim.model.num_layers
    batches = layout.batch_indices()
    B = len(batches)
    micro = tuple({f: np.zeros((B, L, G)) for f in GPU_FIELDS} for _ in range(2))
    env = CountingEnvironment()
    fabric = Fabric(env, topo, rate_tolerance=sim.options.rate_tolerance, routing=sim.routing, hooks=True)
    hook = topo.cluster.a2a_kernels.family(sim.options.a2a).hook_sm_us * 1e-6
    batch_start, batch_end = np.zeros(B), np.zeros(B)
    kept: list[CollectiveResult] = []
    flows = 0
    chooser = ReplicaChooser(sim.options.replica_rule, placement, topo.cluster.gpus_per_node)
    slow = slowdown(sim)
    for b, idx in enumerate(batches):
        sink = kept if (keep_collectives and b == 0) else None
        plans = []
        for m, part in enumerate(split_two(idx, layout.home, G)):
            plan, n = sim._plan_batch(b, trace, layout, part, placement, chooser, fabric, micro[m], sink,
                                      tag=f".m{m}")
            plans.append(plan)
            flows += n
        batch_start[b] = env.now
        streams = [_Stream(env, slow) for _ in range(G)]
        procs = [env.process(_micro_gpu(env, b, g, plans[m], micro[m], streams[g], progress if m == 1 else None,
                                        hook)) for g in range(G) for m in range(2)]
        env.run(until=env.all_of(procs))
        batch_end[b] = env.now
    return SimRecords(
        cluster=topo.cluster.name, placement=placement.policy if name is None else name, num_gpus=G, tp=sim.tp,
        gpus_per_node=topo.cluster.gpus_per_node, gpu=merged(micro), batch_start=batch_start, batch_end=batch_end,
        link_names=topo.link_names, link_kind=topo.link_kind, link_capacity=topo.capacity,
        link_bytes=fabric.link_bytes, sim_time=env.now, events=env.scheduled, flows=flows,
        recomputations=fabric.recomputations, collectives=kept, micro=micro)
