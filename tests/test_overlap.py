"""Two-batch overlap (moesim.sim.overlap) against its bounds: an overlapped step is never shorter than its busiest
stream and never longer than its two micro-batches run back to back; the micro-batches conserve tokens; SM
contention slows the overlapped compute by the closed-form factor; receive hooks hold the stream for the kernels'
send and receive phases."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.hardware import ClusterSpec, build_topology, preset
from moesim.placement.format import Placement
from moesim.sim.engine import EngineOptions, Simulation
from moesim.sim.network import kernel_cost
from moesim.sim.overlap import slowdown, split_two
from moesim.traces.format import Layout
from moesim.traces.model import ModelSpec
from moesim.traces.synthetic import SyntheticParams, generate_trace

MODEL = ModelSpec(name="small", num_layers=3, num_experts=32, top_k=4, d_model=2048, d_ff=1024, shared_experts=1,
                  shared_d_ff=1024)


def setup(nodes: int = 2, tokens: int = 256, seed: int = 0):
    spec = ClusterSpec(**{**preset("hgx-h200"), "nodes": nodes, "gpus_per_node": 4})
    G = spec.num_gpus
    trace = generate_trace(num_layers=3, num_experts=32, top_k=4, num_gpus=G, tokens_per_gpu=tokens, batches=2,
                           params=SyntheticParams(), rng=np.random.default_rng(seed))
    placement = Placement.from_assignment(np.tile(np.arange(32) * G // 32, (3, 1)), G, "contiguous")
    return build_topology(spec), trace, trace.layout(G, tokens), placement


def test_micro_batches_conserve_tokens():
    rng = np.random.default_rng(1)
    home = rng.integers(0, 8, size=1000)
    idx = np.sort(rng.choice(1000, size=701, replace=False))
    a, b = split_two(idx, home, 8)
    assert np.array_equal(np.sort(np.concatenate([a, b])), idx)
    na, nb = np.bincount(home[a], minlength=8), np.bincount(home[b], minlength=8)
    assert ((na - nb >= 0) & (na - nb <= 1)).all()  # each GPU's tokens halved, the odd one to micro-batch 0
    assert (np.diff(a) > 0).all() and (np.diff(b) > 0).all()  # batch order kept


@pytest.mark.parametrize("a2a", ["direct", "hierarchical", "low_latency"])
def test_overlapped_step_between_its_busiest_stream_and_back_to_back(a2a):
    topo, trace, layout, placement = setup()
    opts = EngineOptions(a2a=a2a, moe_kernels="fused", overlap="two_batch", comm_sms=0, rate_tolerance=0.0)
    rec = Simulation(topo, MODEL, options=opts).run(trace, layout, placement)
    batch = rec.batch_end - rec.batch_start
    picks = [layout.home[i].size * 3 * 4 for i in layout.batch_indices()]  # token-expert rows over 3 layers
    assert rec.gpu["tokens"].sum(axis=(1, 2)).tolist() == picks
    # the busiest stream: every compute phase of both micro-batches on one GPU, back to back
    busy = sum((m["t_dense_end"] - m["t_layer_start"]) + (m["t_dispatch_join"] - m["t_dense_end"])
               + (m["t_compute_end"] - m["t_compute_start"]) for m in rec.micro).sum(axis=1)  # [B, G]
    assert (batch[:, None] >= busy - 1e-12).all()
    # the two micro-batches run one after the other, each alone with no overlap
    for b, idx in enumerate(layout.batch_indices()):
        first, second = split_two(idx, layout.home, topo.num_gpus)
        tags = np.zeros(layout.home.size, dtype=np.int32)
        tags[second] = 1
        keep = np.zeros(layout.home.size, dtype=bool)
        keep[idx] = True
        alone = Layout(home=layout.home, batch=np.where(keep, tags, 2).astype(np.int32), num_batches=2)
        none = Simulation(topo, MODEL, options=EngineOptions(a2a=a2a, moe_kernels="fused", rate_tolerance=0.0))
        r = none.run(trace, alone, placement)
        assert batch[b] <= (r.batch_end - r.batch_start).sum() * (1 + 1e-9)
        assert batch[b] < (r.batch_end - r.batch_start).sum()  # something overlapped


@pytest.mark.parametrize("tol", [0.0, 0.01, 0.1])
def test_overlapped_step_never_shorter_than_its_busiest_stream(tol):
    """At any rate tolerance: a GPU's compute phases of both micro-batches share one stream, so the step is at least
    their sum on the busiest GPU (the network's grouping of departures moves communication, never compute)."""
    topo, trace, layout, placement = setup(nodes=3, tokens=128, seed=2)
    opts = EngineOptions(a2a="low_latency", moe_kernels="fused", overlap="two_batch", rate_tolerance=tol)
    rec = Simulation(topo, MODEL, options=opts).run(trace, layout, placement)
    busy = sum((m["t_dense_end"] - m["t_layer_start"]) + (m["t_dispatch_join"] - m["t_dense_end"])
               + (m["t_compute_end"] - m["t_compute_start"]) for m in rec.micro).sum(axis=1)  # [B, G]
    assert ((rec.batch_end - rec.batch_start)[:, None] >= busy * (1 - 1e-12)).all()


def test_comm_sms_slow_the_compute_they_overlap():
    topo, trace, layout, placement = setup(tokens=1024)
    free = EngineOptions(moe_kernels="fused", overlap="two_batch", comm_sms=0)
    busy = EngineOptions(moe_kernels="fused", overlap="two_batch", comm_sms=33)
    assert slowdown(Simulation(topo, MODEL, options=busy)) == pytest.approx(132 / 99)
    t_free = Simulation(topo, MODEL, options=free).run(trace, layout, placement)
    t_busy = Simulation(topo, MODEL, options=busy).run(trace, layout, placement)
    assert (t_busy.batch_end - t_busy.batch_start > t_free.batch_end - t_free.batch_start).all()
    g0, g1 = t_free.micro[1], t_busy.micro[1]
    # micro-batch 1's first experts start while micro-batch 0's combine is in flight: slowed by 132 / 99
    e_free = (g0["t_compute_end"] - g0["t_compute_start"])[0, 0]
    e_busy = (g1["t_compute_end"] - g1["t_compute_start"])[0, 0]
    assert np.isclose(e_busy, e_free * 132 / 99).any()


def test_overlap_refuses_what_it_does_not_model():
    with pytest.raises(ValueError, match="standard dataflow"):
        EngineOptions(overlap="two_batch", dataflow="coherent")
    topo, trace, layout, placement = setup()
    with pytest.raises(ValueError, match="tp 1"):
        Simulation(topo, MODEL, tp=2, options=EngineOptions(overlap="two_batch")).run(trace, layout, placement)
    with pytest.raises(ValueError, match="comm_sms"):
        slowdown(Simulation(topo, MODEL, options=EngineOptions(overlap="two_batch", comm_sms=132)))


def test_receive_hooks_hold_the_stream_for_send_and_receive():
    """DeepEP low-latency with receive hooks: each call's send and receive phases (hook_sm_us) run on the compute
    stream, so the step is at least the busiest stream plus four phases per layer and micro-batch; the receive
    phase leaves the call's fixed cost, so a call alone costs what it costs without hooks."""
    topo, trace, layout, placement = setup(nodes=3, tokens=128, seed=2)
    spec = topo.cluster
    ll = spec.a2a_kernels.family("low_latency")
    assert ll.hook_sm_us == 15.0 and ll.launch_us == 30.0
    assert kernel_cost(topo, "low_latency", hooks=True).launch_s == pytest.approx((30.0 - 15.0) * 1e-6)
    assert kernel_cost(topo, "low_latency").launch_s == pytest.approx(30.0e-6)
    assert kernel_cost(topo, "hierarchical", hooks=True).launch_s == kernel_cost(topo, "hierarchical").launch_s
    opts = EngineOptions(a2a="low_latency", moe_kernels="fused", overlap="two_batch", rate_tolerance=0.0)
    rec = Simulation(topo, MODEL, options=opts).run(trace, layout, placement)
    free_spec = spec.model_copy(update={"a2a_kernels": spec.a2a_kernels.model_copy(
        update={"deepep_low_latency": ll.model_copy(update={"hook_sm_us": 0.0})})})
    free = Simulation(build_topology(free_spec), MODEL, options=opts).run(trace, layout, placement)
    step, step_free = rec.batch_end - rec.batch_start, free.batch_end - free.batch_start
    assert (step > step_free).all()
    busy = sum((m["t_dense_end"] - m["t_layer_start"]) + (m["t_dispatch_join"] - m["t_dense_end"])
               + (m["t_compute_end"] - m["t_compute_start"]) for m in rec.micro).sum(axis=1)  # [B, G]
    phases = 2 * MODEL.num_layers * 4 * 15e-6  # two micro-batches, four phases a layer
    assert (step[:, None] >= (busy + phases) * (1 - 1e-12)).all()
    # the receive phase sits between the dispatch's landing and the experts on every GPU
    m0 = rec.micro[0]
    assert ((m0["t_compute_start"] - m0["t_dispatch_done"]) >= 15e-6 * (1 - 1e-9)).all()
