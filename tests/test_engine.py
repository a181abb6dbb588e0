"""The SimPy engine and its token bookkeeping: conservation, a closed-form layer, TP collectives, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.hardware import build_topology
from moesim.metrics import skew, summarize, with_speedups
from moesim.placement import Placement
from moesim.sim import EngineOptions, Simulation, dense_time, expert_time, layer_traffic
from moesim.sim.engine import GPU_FIELDS
from moesim.traces import Trace, TraceMeta
from moesim.traces.model import ModelSpec

EXACT = EngineOptions(rate_tolerance=0.0, moe_kernels="ffn")  # the expert FFNs alone: their closed form below


def make_trace(experts: np.ndarray, num_experts: int) -> Trace:
    T, L, K = experts.shape
    return Trace(experts=experts, meta=TraceMeta(num_experts=num_experts, num_layers=L, top_k=K)).validate()


def collective_matrix(result, G: int) -> np.ndarray:
    m = np.diag(result.local_bytes).astype(float)
    m[result.src, result.dst] = result.nbytes
    return m


def by_name(records) -> dict:
    return {c.name: c for c in records.collectives}


def tp_matrix(names: dict, name: str, G: int) -> np.ndarray:
    """A TP collective's bytes over all its groups (they run as ``NAME/tpI``, one per TP group)."""
    parts = [c for n, c in names.items() if n.startswith(name + "/tp")]
    assert parts, name
    return sum(collective_matrix(c, G) for c in parts)


def expected_copies(experts_l, home, token_ids, gpus_l, G, tp, dedup) -> np.ndarray:
    """The documented routing rules, one token at a time: replica = token id mod replicas; the copy goes to
    the destination rank's GPU in the token's TP lane; dedup sends one copy per destination rank."""
    copies = np.zeros((G, G), dtype=np.int64)
    for t, h in enumerate(home):
        reps = [[g for g in gpus_l[e] if g >= 0] for e in experts_l[t] if e >= 0]
        ranks = [r[int(token_ids[t]) % len(r)] for r in reps]
        if dedup:
            ranks = sorted(set(ranks))
        for r in ranks:
            copies[h, r * tp + h % tp] += 1
    return copies


# ---------------------------------------------------------------- conservation (Hypothesis)

@st.composite
def workloads(draw):
    gpus = draw(st.sampled_from([2, 4]))
    tp = draw(st.sampled_from([t for t in (1, 2) if gpus % t == 0]))
    ranks = gpus // tp
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, min(3, E)))
    L = draw(st.integers(1, 2))
    T = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    experts[rng.random(experts.shape) < 0.1] = -1  # some "no expert" picks
    R = draw(st.integers(1, min(2, ranks)))
    gpus_arr = np.full((L, E, R), -1, dtype=np.int32)
    for layer in range(L):
        for e in range(E):
            n = rng.integers(1, R + 1)
            gpus_arr[layer, e, :n] = rng.choice(ranks, n, replace=False)
    tpg = draw(st.integers(1, 6))
    dedup = draw(st.booleans())
    return gpus, tp, E, experts, Placement(num_ranks=ranks, gpus=gpus_arr, policy="rand"), tpg, dedup


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_tokens_are_conserved(cluster, work):
    G, tp, E, experts, placement, tpg, dedup = work
    topo = build_topology(cluster(nodes=1, gpus_per_node=G))
    model = ModelSpec(num_layers=experts.shape[1], num_experts=E, top_k=experts.shape[2], d_model=64, d_ff=128,
                      dispatch_bytes_per_token=100, combine_bytes_per_token=300)
    trace = make_trace(experts, E)
    layout = trace.layout(G, tpg)
    rec = Simulation(topo, model, tp=tp, options=EngineOptions(dedup=dedup)).run(trace, layout, placement)
    colls = by_name(rec)
    batches = layout.batch_indices()
    assert rec.gpu["tokens"].shape == (len(batches), model.num_layers, G)
    for b, idx in enumerate(batches):
        for layer in range(model.num_layers):
            picks = experts[idx, layer]
            copies = expected_copies(picks, layout.home[idx], idx, placement.gpus[layer], G, tp, dedup)
            np.testing.assert_array_equal(rec.gpu["recv_copies"][b, layer], copies.sum(axis=0))
            # every valid (token, expert) pick is computed exactly once, by one EP rank (all its GPUs)
            per_rank = rec.gpu["tokens"][b, layer].reshape(-1, tp)
            assert (per_rank == per_rank[:, :1]).all()
            assert per_rank[:, 0].sum() == (picks >= 0).sum()
            if not dedup:
                assert copies.sum() == (picks >= 0).sum()
            if b == 0:
                disp = collective_matrix(colls[f"dispatch[b0.l{layer}]"], G)
                comb = collective_matrix(colls[f"combine[b0.l{layer}]"], G)
                np.testing.assert_allclose(disp, copies * 100.0)
                np.testing.assert_allclose(comb, copies.T * 300.0)  # combine is the transpose
                assert (f"allgather[b0.l{layer}]/tp0" in colls) == (tp > 1)
    # dispatch and combine, and with tp > 1 two expert and two attention collectives per TP group
    assert len(rec.collectives) == model.num_layers * (2 + (4 * G // tp if tp > 1 else 0))


@settings(max_examples=40, deadline=None)
@given(workloads())
def test_dedup_never_sends_more_than_per_expert(work):
    G, tp, E, experts, placement, tpg, _ = work
    home = (np.arange(experts.shape[0]) % G).astype(np.int32)
    ids = np.arange(experts.shape[0])
    for layer in range(experts.shape[1]):
        kw = dict(num_gpus=G, tp=tp, num_experts=E)
        per_gpu = layer_traffic(experts[:, layer], home, ids, placement.gpus[layer], dedup=True, **kw)
        per_expert = layer_traffic(experts[:, layer], home, ids, placement.gpus[layer], dedup=False, **kw)
        assert (per_gpu.copies <= per_expert.copies).all()
        assert per_expert.copies.sum() == (experts[:, layer] >= 0).sum()
        np.testing.assert_array_equal(per_gpu.expert_tokens, per_expert.expert_tokens)
        assert per_gpu.expert_tokens.sum() == (experts[:, layer] >= 0).sum()
        np.testing.assert_array_equal(per_gpu.recv_copies, per_gpu.copies.sum(axis=0))


def test_dedup_sends_one_copy_per_destination_gpu():
    experts = np.array([[0, 1], [0, 2], [1, -1]])  # experts 0 and 1 on GPU 1, expert 2 on GPU 0
    gpus = np.array([[1], [1], [0]])
    home = np.array([0, 0, 0])
    kw = dict(num_gpus=2, tp=1, num_experts=3)
    dedup = layer_traffic(experts, home, np.arange(3), gpus, dedup=True, **kw)
    naive = layer_traffic(experts, home, np.arange(3), gpus, dedup=False, **kw)
    assert dedup.copies.tolist() == [[1, 3], [0, 0]]
    assert naive.copies.tolist() == [[1, 4], [0, 0]]
    assert dedup.expert_tokens.tolist() == [[0, 0, 1], [2, 2, 0]]


def test_replicas_are_picked_by_token_id():
    experts = np.zeros((6, 1), dtype=np.int64)  # six tokens, all pick expert 0
    gpus = np.array([[0, 2, 1]])  # three replicas
    tr = layer_traffic(experts, np.zeros(6, dtype=np.int64), np.arange(10, 16), gpus, num_gpus=3, tp=1,
                       num_experts=1, dedup=True)
    # ids 10..15 mod 3 = 1, 2, 0, 1, 2, 0 -> GPUs 2, 1, 0, 2, 1, 0
    assert tr.copies[0].tolist() == [2, 2, 2]
    assert tr.expert_tokens[:, 0].tolist() == [2, 2, 2]


def test_tp_copies_stay_in_the_token_lane():
    experts = np.array([[0], [0], [1], [1]])
    home = np.array([0, 1, 2, 3])  # 4 GPUs, tp=2: ranks {0,1} and {2,3}; lanes 0,1,0,1
    gpus = np.array([[1], [0]])  # expert 0 on rank 1, expert 1 on rank 0
    tr = layer_traffic(experts, home, np.arange(4), gpus, num_gpus=4, tp=2, num_experts=2, dedup=True)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 2] = expected[1, 3] = expected[2, 0] = expected[3, 1] = 1
    np.testing.assert_array_equal(tr.copies, expected)
    assert tr.expert_tokens.tolist() == [[0, 2], [2, 0]]


# ---------------------------------------------------------------- a layer in closed form

TOKENS_PER_GPU = 4096  # enough for the expert FFN to be above its launch-bound floor


def balanced_two_gpu_case(cluster):
    spec = cluster(nodes=1, gpus_per_node=2)
    model = ModelSpec(num_layers=1, num_experts=2, top_k=1, d_model=1024, d_ff=2048, dense_flops_per_token=0)
    T = 2 * TOKENS_PER_GPU
    experts = (np.arange(T) % 2).reshape(T, 1, 1)  # half of each GPU's tokens pick each expert
    trace = make_trace(experts, 2)
    placement = Placement.from_assignment(np.array([[0, 1]]), 2, "contiguous")
    return spec, model, trace, placement


def test_single_layer_closed_form(cluster):
    spec, model, trace, placement = balanced_two_gpu_case(cluster)
    topo = build_topology(spec)
    layout = trace.layout(2, TOKENS_PER_GPU)
    rec = Simulation(topo, model, options=EXACT).run(trace, layout, placement)
    gpu, nv, d, f, w = spec.gpu, spec.nvlink, model.d_model, model.d_ff, model.dtype_bytes
    hbm = gpu.hbm_GBps * 1e9 * gpu.hbm_efficiency
    flops = gpu.bf16_tflops * 1e12 * gpu.compute_efficiency
    overhead = gpu.ffn_overhead_us * 1e-6
    n = TOKENS_PER_GPU
    # non-expert work: no FLOPs, so the weight and activation reads bound it
    dense = (4 * d * d * w + n * 2 * d * w) / hbm + overhead
    # dispatch/combine: n/2 copies of d x dtype bytes to the other GPU over NVLink, n/2 copied locally
    half = n / 2 * d * w
    a2a = spec.a2a_launch_us * 1e-6 + max(half / (nv.GBps * 1e9 * nv.efficiency) + nv.latency_us * 1e-6,
                                          half / (hbm / 2))
    # experts: n tokens on one SwiGLU expert per GPU: max(floor, roofline + launch overhead)
    roofline = max(n * 6 * d * f / flops, (3 * d * f * w + n * w * (2 * d + 3 * f)) / hbm)
    compute = max(roofline + overhead, gpu.ffn_floor_us * 1e-6)
    assert roofline + overhead > gpu.ffn_floor_us * 1e-6
    assert compute == pytest.approx(expert_time(np.array([[n, 0]]), model, gpu)[0], rel=1e-12)
    assert dense == pytest.approx(dense_time(np.array([n]), model, gpu)[0], rel=1e-12)
    expected = dense + a2a + compute + a2a
    g = rec.gpu
    assert rec.batch_end - rec.batch_start == pytest.approx([expected], rel=1e-9)
    assert g["t_dense_end"][0, 0] == pytest.approx([dense] * 2, rel=1e-9)
    assert (g["t_dispatch_done"] - g["t_dispatch_start"])[0, 0] == pytest.approx([a2a] * 2, rel=1e-9)
    assert (g["t_compute_end"] - g["t_compute_start"])[0, 0] == pytest.approx([compute] * 2, rel=1e-9)
    assert (g["t_combine_done"] - g["t_combine_start"])[0, 0] == pytest.approx([a2a] * 2, rel=1e-9)
    assert g["tokens"][0, 0].tolist() == [n, n]
    assert g["recv_copies"][0, 0].tolist() == [n, n]
    assert g["bytes_out_intra"][0, 0].tolist() == [2 * half, 2 * half]  # dispatch + combine
    assert g["bytes_out_inter"][0, 0].tolist() == [0, 0]
    # no skew: nobody waits at a rendezvous
    assert (g["t_dispatch_start"] == g["t_dispatch_join"]).all()
    metrics = summarize(rec)
    assert metrics.e2e_ms["mean"] == pytest.approx(expected * 1e3, rel=1e-9)
    assert metrics.compute_skew["max_over_mean"] == 1.0
    assert metrics.compute_skew["imbalance"] == 0.0
    assert metrics.sync_wait_ms == 0.0


def test_batches_run_back_to_back(cluster):
    spec, model, trace, placement = balanced_two_gpu_case(cluster)
    topo = build_topology(spec)
    one = Simulation(topo, model, options=EXACT).run(trace, trace.layout(2, TOKENS_PER_GPU), placement)
    half = TOKENS_PER_GPU // 2  # the same tokens as two batches of half the size
    two = Simulation(topo, model, options=EXACT).run(trace, trace.layout(2, half), placement)
    assert two.batch_start[0] == 0.0
    assert two.batch_start[1] == pytest.approx(two.batch_end[0])
    assert two.sim_time == pytest.approx(two.batch_end[1])
    assert two.gpu["tokens"].sum() == one.gpu["tokens"].sum()
    assert summarize(two).e2e_ms["mean"] < summarize(one).e2e_ms["mean"]


def test_unbalanced_compute_makes_others_wait(cluster):
    spec, model, trace, _ = balanced_two_gpu_case(cluster)
    packed = Placement.from_assignment(np.array([[0, 0]]), 2, "packed")  # both experts on GPU 0
    rec = Simulation(build_topology(spec), model, options=EXACT).run(trace, trace.layout(2, TOKENS_PER_GPU), packed)
    g = rec.gpu
    assert g["tokens"][0, 0].tolist() == [2 * TOKENS_PER_GPU, 0]
    assert g["t_compute_end"][0, 0, 1] == g["t_compute_start"][0, 0, 1]  # GPU 1 has no expert work
    wait = g["t_combine_start"] - g["t_combine_join"]
    assert wait[0, 0, 1] > 0 and wait[0, 0, 0] == 0
    m = summarize(rec)
    assert m.compute_skew["max_over_mean"] == 2.0
    assert m.sync_wait_ms > 0


# ---------------------------------------------------------------- expert tensor parallelism

def test_tp2_adds_allgather_and_reducescatter(cluster):
    spec = cluster(nodes=1, gpus_per_node=4)
    model = ModelSpec(num_layers=2, num_experts=4, top_k=2, d_model=512, d_ff=1024,
                      dispatch_bytes_per_token=1000, combine_bytes_per_token=3000)
    rng = np.random.default_rng(0)
    T = 64
    experts = np.stack([np.stack([rng.choice(4, 2, replace=False) for _ in range(2)]) for _ in range(T)])
    trace = make_trace(experts, 4)
    layout = trace.layout(4, T // 4)
    topo = build_topology(spec)
    tp2 = Simulation(topo, model, tp=2, options=EXACT).run(trace, layout, Placement.from_assignment(
        np.array([[0, 0, 1, 1]] * 2), 2, "contiguous"))
    names = by_name(tp2)
    g = tp2.gpu
    for layer in range(2):
        assert {f"allgather[b0.l{layer}]/tp0", f"reducescatter[b0.l{layer}]/tp1"} <= set(names)
        disp = collective_matrix(names[f"dispatch[b0.l{layer}]"], 4)
        recv = disp.sum(axis=0) / 1000  # copies each GPU received
        gather = tp_matrix(names, f"allgather[b0.l{layer}]", 4)
        scatter = tp_matrix(names, f"reducescatter[b0.l{layer}]", 4)
        pairs = [(0, 1), (1, 0), (2, 3), (3, 2)]  # inside each EP rank only
        for s, d in pairs:
            assert gather[s, d] == recv[s] * 1000
            assert scatter[s, d] == recv[d] * 3000  # expert outputs travel at combine size
        assert gather.sum() == sum(gather[s, d] for s, d in pairs)
        offdiag = ~np.eye(4, dtype=bool)
        attn = sum(tp_matrix(names, f"attn_{k}[b0.l{layer}]", 4) for k in ("gather", "scatter"))
        assert attn[offdiag].sum() == 2 * 4 * (T // 4) * 512 * 2  # every GPU's tokens, to its peer, both ways
        tp_bytes = (gather + scatter + attn)[offdiag].sum()
        a2a_bytes = (disp[offdiag].sum() + collective_matrix(names[f"combine[b0.l{layer}]"], 4)[offdiag].sum())
        assert tp_bytes > 0
        assert g["bytes_out_intra"][0, layer].sum() == pytest.approx(a2a_bytes + tp_bytes)
        # each GPU of a rank runs all of the rank's tokens, so both see every pick routed to the rank
        assert g["tokens"][0, layer, 0] == g["tokens"][0, layer, 1]
        assert g["tokens"][0, layer].sum() == 2 * (experts[:, layer] >= 0).sum()
    assert (g["t_compute_start"] > g["t_dispatch_done"]).all()  # the all-gather sits in between
    assert (g["t_combine_join"] > g["t_compute_end"]).all()  # and the reduce-scatter here
    tp1 = Simulation(topo, model, tp=1, options=EXACT).run(trace, layout, Placement.from_assignment(
        np.array([[0, 1, 2, 3]] * 2), 4, "contiguous"))
    assert not any(c.name.startswith(("allgather", "reducescatter", "attn_")) for c in tp1.collectives)
    assert (tp1.gpu["t_compute_start"] == tp1.gpu["t_dispatch_done"]).all()


def test_tp_must_divide_gpus_per_node(cluster, tiny_model):
    with pytest.raises(ValueError, match="tp=3"):
        Simulation(build_topology(cluster(nodes=1, gpus_per_node=4)), tiny_model, tp=3)


# ---------------------------------------------------------------- determinism and metrics

def test_same_inputs_give_identical_records(nodes2x4, tiny_model):
    rng = np.random.default_rng(3)
    T = 8 * 16 * 2
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(T)])
    trace = make_trace(experts, 8)
    layout = trace.layout(8, 16)
    placement = Placement.from_assignment(rng.integers(0, 8, (2, 8)), 8, "rand")
    runs = [Simulation(nodes2x4, tiny_model).run(trace, layout, placement) for _ in range(2)]
    a, b = runs
    assert set(a.gpu) == set(GPU_FIELDS)
    for name in GPU_FIELDS:
        np.testing.assert_array_equal(a.gpu[name], b.gpu[name], err_msg=name)
    np.testing.assert_array_equal(a.batch_end, b.batch_end)
    np.testing.assert_array_equal(a.link_bytes, b.link_bytes)
    assert (a.events, a.flows, a.recomputations, a.sim_time) == (b.events, b.flows, b.recomputations, b.sim_time)
    assert a.gpu["bytes_out_inter"].sum() > 0


def test_summary_and_speedups(cluster):
    spec, model, trace, balanced = balanced_two_gpu_case(cluster)
    sim = Simulation(build_topology(spec), model, options=EXACT)
    layout = trace.layout(2, TOKENS_PER_GPU // 2)
    packed = Placement.from_assignment(np.array([[0, 0]]), 2, "packed")
    metrics = [summarize(sim.run(trace, layout, p)) for p in (balanced, packed)]
    assert [m.placement for m in metrics] == ["contiguous", "packed"]
    out = with_speedups(metrics, "contiguous")
    assert out[0].speedup_vs_baseline == 1.0
    assert out[1].speedup_vs_baseline == pytest.approx(metrics[0].e2e_ms["mean"] / metrics[1].e2e_ms["mean"])
    assert out[1].speedup_vs_baseline < 1.0
    assert metrics[0].compute_skew["max_over_mean"] == 1.0
    m = metrics[0]
    assert m.e2e_ms["p50"] <= m.e2e_ms["p99"] <= m.e2e_ms["max"]
    assert m.a2a_tail_ms["max"] >= m.a2a_mean_ms > 0
    assert m.traffic_GB["inter_node_per_batch"] == 0.0
    assert m.busiest_link["kind"] == "nvlink" and 0 < m.busiest_link["utilisation"] <= 1
    assert with_speedups(metrics, "nobody")[0].speedup_vs_baseline is None


def test_skew_measures():
    s = skew(np.array([[1.0, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]))
    assert s["max_over_mean"].tolist() == [1.0, 4.0, 1.0]
    assert s["mean_over_max"].tolist() == [1.0, 0.25, 1.0]
    assert s["imbalance"].tolist() == [0.0, 3.0, 0.0]


# ---------------------------------------------------------------- compute roofline

def test_expert_time_roofline(tiny_model, cluster):
    gpu = cluster().gpu
    tokens = np.array([[0, 0, 0], [1, 0, 0], [100000, 0, 0], [50000, 50000, 0]])
    grouped = expert_time(tokens, tiny_model, gpu)
    per_expert = expert_time(tokens, tiny_model, gpu, grouped=False)
    overhead = gpu.ffn_overhead_us * 1e-6
    assert grouped[0] == per_expert[0] == 0.0  # experts without tokens cost nothing
    assert grouped[1] == per_expert[1] == pytest.approx(max(gpu.ffn_floor_us * 1e-6, overhead), rel=0.01)
    assert per_expert[3] > grouped[3]  # two launches and two weight reads
    big = 6.0 * tiny_model.d_model * tiny_model.d_ff * 100000 / gpu.flops_per_s
    assert grouped[2] >= big + overhead * (1 - 1e-12)
    assert expert_time(tokens, tiny_model, gpu, tp=2)[2] < grouped[2]
    assert (np.diff(expert_time(np.arange(0, 5000, 500)[:, None], tiny_model, gpu)) >= 0).all()


def test_dense_time_is_zero_without_dense_work(cluster):
    model = ModelSpec(num_layers=1, num_experts=2, top_k=1, d_model=64, d_ff=64, dense_flops_per_token=0,
                      dense_weight_bytes=0)
    assert dense_time(np.array([0, 10, 1000]), model, cluster().gpu).tolist() == [0.0, 0.0, 0.0]
