"""Training mode: backward costs against their closed forms, the sparse collectives' bytes (FSSDP with every
expert everywhere is FSDP), all-reduce bytes, memory against a hand count, the step's assembly, the scenario
section and a whole training study."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.metrics.training import Memory, activation_bytes, in_flight, memory_per_gpu, non_expert_params
from moesim.placement.format import Placement
from moesim.placement.fssdp import (
    everywhere, held, lanes, make_shards, sharding_names, sparse_allgather_bytes, sparse_reduce_scatter_bytes,
)
from moesim.sim.compute import Attention
from moesim.sim.engine import EngineOptions
from moesim.sim.kernels import grouped_gemm_time
from moesim.sim.training import (
    BACKWARD, CollectiveTimer, LayerStep, MicroBatch, TrainOptions, adam_seconds, allreduce_bytes, backward_kernels,
    layer_kernels, pipeline_bubble, run_micro_batch, step_seconds,
)
from moesim.study.config import parse_scenario
from moesim.study.training import expand_groups, run_training, verdict
from moesim.traces.model import ModelSpec

TRAIN_SCENARIO = {
    "name": "train",
    "clusters": [{"name": "2x4", "preset": "hgx-h200", "nodes": 2, "gpus_per_node": 4}],
    "model": {"name": "m", "num_layers": 2, "num_experts": 8, "top_k": 2, "d_model": 512, "d_ff": 1024,
              "num_heads": 8, "num_kv_heads": 8, "head_dim": 64},
    "workload": {"phase": "train", "seq_len": 256,
                 "synthetic": {"tokens_per_gpu": 256, "batches": 4, "zipf_alpha": 1.2, "seed": 2,
                               "drift_swaps_per_batch": 1}},
    "training": {"micro_batches": 2, "layouts": [
        {"name": "ep", "kind": "ep", "placement": "contiguous"},
        {"name": "rearrange", "kind": "rearrange", "placement": "greedy", "every_steps": 2},
        {"name": "fssdp", "kind": "fssdp", "placement": "greedy", "options": {"redundant_experts": 8}},
        {"name": "fsdp", "kind": "fssdp", "placement": "everywhere", "sharding": "uniform"}]},
    "engine": {"progress": False},
}


# ---------------------------------------------------------------- backward closed forms

def test_backward_gemms_are_dgrad_plus_wgrad(nodes2x4):
    model = ModelSpec(name="m", num_layers=1, num_experts=8, top_k=2, d_model=1024, d_ff=2048)
    rows = np.full((8, 8), 512.0)
    fwd = layer_kernels(np.full(8, 2048.0), rows, model, nodes2x4, layer=0, tp=1, options=EngineOptions(),
                        attention=None)
    bwd = backward_kernels(fwd)
    gpu = nodes2x4.cluster.gpu
    spec = gpu.moe_pipelines["torch_reference"]
    one = grouped_gemm_time(rows, 2 * 2048, 1024, gpu, spec, weight_bytes=2, act_bytes=2, out_bytes=2)
    np.testing.assert_allclose(fwd["gemm_gate_up"], one)
    np.testing.assert_allclose(bwd["gemm_gate_up"], 2 * one)  # a data-gradient and a weight-gradient GEMM
    np.testing.assert_allclose(bwd["gemm_down"], 2 * fwd["gemm_down"])
    np.testing.assert_allclose(bwd["activation"], fwd["activation"] * 5 / 3)
    np.testing.assert_allclose(bwd["permute"], fwd["permute"])  # gathers move their bytes back once
    assert BACKWARD["attn_core"] == 2.5
    measured = backward_kernels(fwd, gemm_factor=2.5)  # an H200's grouped GEMMs through autograd
    np.testing.assert_allclose(measured["gemm_down"], 2.5 * fwd["gemm_down"])
    np.testing.assert_allclose(measured["activation"], bwd["activation"])


def test_attention_backward_splits_core_and_projections(nodes2x4):
    model = ModelSpec(name="m", num_layers=1, num_experts=8, top_k=2, d_model=1024, d_ff=2048, num_heads=8,
                      num_kv_heads=8, head_dim=128)
    fwd = layer_kernels(np.full(8, 4096.0), np.full((8, 8), 1024.0), model, nodes2x4, layer=0, tp=1,
                        options=EngineOptions(moe_kernels="ffn"), attention=Attention("prefill", 4096))
    assert fwd["attn_core"].min() > 0 and fwd["attn_proj"].min() > 0
    bwd = backward_kernels(fwd)
    np.testing.assert_allclose(bwd["attn_core"] + bwd["attn_proj"], 2.5 * fwd["attn_core"] + 2 * fwd["attn_proj"])
    np.testing.assert_allclose(bwd["experts_ffn"], 2 * fwd["experts_ffn"])


# ---------------------------------------------------------------- the sparse collectives

def test_fssdp_everything_everywhere_is_fsdp():
    L, E, R, W = 2, 6, 4, 1000.0
    mat = everywhere(L, E, R)
    shards = make_shards("uniform", mat, 2)
    for l in range(L):
        gather = sparse_allgather_bytes(held(mat)[l], shards[l], W)
        # FSDP: every rank receives (R - 1) / R of every expert, E * W / R from each other rank
        expected = np.full((R, R), E * W / R)
        np.fill_diagonal(expected, 0)
        np.testing.assert_allclose(gather, expected)
        np.testing.assert_allclose(gather.sum(axis=0), (R - 1) / R * E * W)
        reduce = sparse_reduce_scatter_bytes(held(mat)[l], shards[l], 2 * W)
        np.testing.assert_allclose(reduce, 2 * expected.T)


def test_home_sharding_materialised_at_home_moves_nothing():
    ref = Placement.from_assignment(np.array([[0, 1, 2, 3, 0, 1]]), 4)
    shards = make_shards("home", ref, 2)
    np.testing.assert_array_equal(sparse_allgather_bytes(held(ref)[0], shards[0], 10.0), 0)
    # expert 0 (home rank 0) also materialised on rank 3: rank 0 sends it whole
    extra = held(ref)[0].copy()
    extra[0, 3] = True
    gather = sparse_allgather_bytes(extra, shards[0], 10.0)
    assert gather[0, 3] == 10.0 and gather.sum() == 10.0


def test_node_sharding_spreads_over_the_home_node():
    ref = Placement.from_assignment(np.array([[0, 3]]), 4)
    shards = make_shards("node", ref, 2)
    np.testing.assert_allclose(shards[0], [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    assert sharding_names() == ["home", "node", "uniform"]
    with pytest.raises(KeyError, match="valid: home, node, uniform"):
        make_shards("nope", ref, 2)


def test_lanes_split_rank_bytes_over_tp():
    out = lanes(np.array([[0.0, 4.0], [2.0, 0.0]]), 2)
    assert out[0, 2] == 2.0 and out[1, 3] == 2.0 and out[2, 0] == 1.0 and out.sum() == 6.0


def test_expand_groups_copies_every_group():
    group = Placement.from_assignment(np.array([[1, 0]]), 2)
    wide = expand_groups(group, 6)
    assert wide.gpus[0].tolist() == [[1, 3, 5], [0, 2, 4]]


# ---------------------------------------------------------------- all-reduce, Adam, the step

def test_allreduce_ring_in_one_node_and_over_rails():
    one = allreduce_bytes(4, 4, 1, 100.0)
    np.testing.assert_allclose(one.sum(axis=1), 2 * 3 / 4 * 100)  # each GPU moves 2 (n-1)/n of the buffer
    assert one[0, 1] > 0 and one[3, 0] > 0 and one[0, 2] == 0
    two = allreduce_bytes(8, 4, 1, 100.0)
    P = 2 * 7 / 8 * 100
    assert two[0, 1] == P and two[0, 4] == pytest.approx(P / 4) and two[4, 0] == pytest.approx(P / 4)
    lanes2 = allreduce_bytes(8, 4, 2, 100.0)  # two lanes of 4 GPUs: 0, 2 on node 0 and 4, 6 on node 1
    assert lanes2[0, 2] == 2 * 3 / 4 * 100 and lanes2[0, 1] == 0


def test_adam_is_memory_bound(nodes2x4):
    gpu = nodes2x4.cluster.gpu
    assert adam_seconds(1e9, nodes2x4) == pytest.approx(30e9 / gpu.hbm_bytes_per_s)


def test_step_assembly():
    mb = MicroBatch(forward_s=1.0, backward_s=2.0, pair_s=2.5, gather_s=0.1, regather_s=0.05, reduce_s=0.2)
    none = step_seconds(mb, TrainOptions(micro_batches=4, pp=2), grad_sync_s=3.0, optimizer_s=0.5)
    assert none["compute"] == 12.0 and none["bubble"] == 3.0  # 1F1B: pp - 1 micro-batch times
    assert none["grad_sync"] == 1.0  # 3 s all-reduce, 2 s hidden behind the last backward
    assert none["fssdp"] == pytest.approx(0.1 + 4 * 0.05 + 0.2)
    assert none["step"] == pytest.approx(12 + 3 + 0.5 + 1 + 0.5)
    dual = step_seconds(mb, TrainOptions(micro_batches=4, pp=4, overlap="dualpipe"), grad_sync_s=0.0, optimizer_s=0)
    assert dual["compute"] == 3.0 + 3 * 2.5 and dual["bubble"] == 3.0  # (pp / 2 - 1) micro-batch times
    assert pipeline_bubble(TrainOptions()) == 0.0
    with pytest.raises(ValueError, match="even number"):
        TrainOptions(pp=3, overlap="dualpipe")


def _step(G: int, fwd: float, bwd: float, comm: np.ndarray) -> LayerStep:
    k = {"attn_proj": np.full(G, fwd), "gemm_down": np.full(G, fwd)}
    return LayerStep(fwd=k, bwd={n: v * bwd / fwd for n, v in k.items()}, mats={n: comm for n in
                                                                                  ("dispatch", "combine",
                                                                                   "combine_bwd", "dispatch_bwd")})


def test_micro_batch_without_traffic_is_the_sum_of_its_kernels(nodes2x4):
    timer = CollectiveTimer(nodes2x4)
    mb = run_micro_batch([_step(8, 1e-3, 2e-3, np.zeros((8, 8)))] * 3, timer, TrainOptions())
    assert mb.forward_s == pytest.approx(3 * 2e-3) and mb.backward_s == pytest.approx(3 * 4e-3)
    assert mb.pair_s == pytest.approx(mb.forward_s + mb.backward_s) and mb.overlap_share == 0


def test_dualpipe_pair_is_the_longer_of_compute_and_comm(nodes2x4):
    timer = CollectiveTimer(nodes2x4)
    comm = np.full((8, 8), 64e6)
    np.fill_diagonal(comm, 0)
    a2a = float(timer.durations(comm).max())
    for compute in (0.1 * a2a, 10 * a2a):  # per kernel; two kernels each way
        lp = _step(8, compute, 2 * compute, comm)
        mb = run_micro_batch([lp], timer, TrainOptions(overlap="dualpipe"), slowdown=1.2)
        c = 1.2 * (2 * compute + 4 * compute)
        assert mb.pair_s == pytest.approx(max(c, 4 * a2a), rel=1e-6)
        assert mb.overlap_share == pytest.approx(min(c, 4 * a2a) / (4 * a2a), rel=1e-6)


# ---------------------------------------------------------------- memory

def test_memory_against_a_hand_count():
    model = ModelSpec(name="m", num_layers=2, num_experts=4, top_k=2, d_model=100, d_ff=200, shared_experts=1,
                      shared_d_ff=50, num_heads=4, num_kv_heads=2, head_dim=25)
    # per layer: Q, K, V, O = 100 x (2 x 100 + 2 x 50) = 30,000; shared 3 x 100 x 50 = 15,000; router 400
    assert non_expert_params(model, range(2)) == 2 * (30_000 + 15_000 + 400)
    # activations per layer: attention 10 x (100 + 300); router 10 x 100; rows 30 x (200 + 600); shared 10 x 250
    assert activation_bytes(model, range(2), 10, 30, 1) == 2 * 2 * (4_000 + 1_000 + 24_000 + 2_500)
    opts = TrainOptions()
    mem = memory_per_gpu(model, range(2), opts, tp=1, dp=4, expert_params=60_000, capacity_GB=1e-3, home_tokens=10,
                         max_rows=30, materialised_params=1_000, materialised_layer_params=500)
    assert mem.params == 2 * (90_800 + 60_000) and mem.grads == 4 * (90_800 + 60_000)
    assert mem.optimizer == 12 * (90_800 / 4 + 60_000)
    assert mem.materialised == 2 * 1_000 + 4 * 500
    assert mem.total == pytest.approx(mem.params + mem.grads + mem.optimizer + mem.activations + mem.materialised)
    assert not mem.fits  # 1 MB of GPU
    assert in_flight(TrainOptions(pp=4, micro_batches=8)) == 4
    assert in_flight(TrainOptions(pp=4, micro_batches=8, overlap="dualpipe")) == 5
    assert Memory(1, 1, 1, 1, 1, 10).fits


# ---------------------------------------------------------------- scenarios and the study

def test_training_section_is_checked(tiny_scenario_data):
    data = dict(TRAIN_SCENARIO)
    scenario = parse_scenario(data, "t.yaml")
    assert scenario.training is not None and scenario.baseline == "ep"
    bad = {**data, "workload": {**data["workload"], "phase": "serve"}}
    with pytest.raises(InputError, match="training"):
        parse_scenario(bad, "t.yaml")
    lay = {**data, "training": {"layouts": [{"name": "r", "kind": "rearrange"}]}}
    with pytest.raises(InputError, match=r"t.yaml: training.layouts.0.*every_steps"):
        parse_scenario(lay, "t.yaml")
    tiny_scenario_data["workload"]["phase"] = "train"
    with pytest.raises(InputError, match="workload.phase"):
        parse_scenario(tiny_scenario_data, "s.yaml")


def test_training_study_runs_every_layout():
    scenario = parse_scenario(TRAIN_SCENARIO, "t.yaml")
    result = run_training(scenario)
    summary = {r["layout"]: r for r in result.summary()["runs"]}
    assert set(summary) == {"ep", "rearrange", "fssdp", "fsdp"}
    assert summary["ep"]["speedup_vs_baseline"] == 1.0
    for r in summary.values():
        assert r["step_ms"]["step"] > 0 and r["tokens_per_s"] > 0 and r["fits"]
    assert summary["ep"]["fssdp_GB_per_step"] == 0 and summary["fsdp"]["fssdp_GB_per_step"] > 0
    assert summary["fsdp"]["imbalance"] == 0  # every token runs at home
    assert summary["fssdp"]["imbalance"] < summary["ep"]["imbalance"]
    tokens = 8 * 256 * 2  # GPUs x tokens per micro-batch x micro-batches
    assert summary["ep"]["tokens_per_s"] == pytest.approx(tokens / summary["ep"]["step_ms"]["step"] * 1e3)
    assert verdict(result)[0].startswith("2x4: ")


def test_moesim_run_writes_the_training_outputs(tmp_path, capsys):
    import json

    from moesim.cli import main
    from tests.conftest import write_yaml

    path = write_yaml(tmp_path / "train.yaml", TRAIN_SCENARIO)
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "Verdict:" in printed and "fssdp" in printed
    data = json.loads((out / "training.json").read_text())
    assert data["format"] == "moesim.training/1" and len(data["runs"]) == 4
    rows = (out / "training_steps.csv").read_text().splitlines()
    assert rows[0].startswith("cluster,layout,step,") and len(rows) == 1 + 4 * 4
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert main(["run", str(path), "-o", str(tmp_path / "foreign"), "-q"]) == 2  # a folder moesim did not write
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_layout_errors_name_the_field():
    group = {**TRAIN_SCENARIO, "training": {"layouts": [
        {"name": "f", "kind": "fssdp", "placement": "greedy", "group": 3}]}}
    with pytest.raises(InputError, match="training.layouts.f"):
        run_training(parse_scenario(group, "t.yaml"))
    pp = {**TRAIN_SCENARIO, "training": {**TRAIN_SCENARIO["training"], "pp": 4}}
    with pytest.raises(InputError, match="training.pp"):
        run_training(parse_scenario(pp, "t.yaml"))
    with pytest.raises(InputError, match="everywhere"):
        parse_scenario({**TRAIN_SCENARIO, "training": {"layouts": [
            {"name": "e", "kind": "ep", "placement": "everywhere"}]}}, "t.yaml")


def test_pipeline_stage_and_memory_flag():
    data = {**TRAIN_SCENARIO, "model": {**TRAIN_SCENARIO["model"], "num_layers": 4},
            "training": {**TRAIN_SCENARIO["training"], "pp": 2, "model_layers": 8}}
    result = run_training(parse_scenario(data, "t.yaml"), layouts=["ep"])
    run = result.runs[0]
    assert len(run.micro[0].terms) and run.step_s[0]["bubble"] > 0  # 1F1B bubble of pp - 1 micro-batches
    # 2 of the stage's 4 layers are simulated and scaled by 2: the memory of 4 layers
    small = {**data, "clusters": [{**TRAIN_SCENARIO["clusters"][0], "gpu": {"memory_GB": 0.05}}]}
    tiny = run_training(parse_scenario(small, "t.yaml"), layouts=["ep"])
    assert not tiny.runs[0].memory.fits
    assert "no layout fits in GPU memory" in verdict(tiny)[0]


def test_sweep_rows_and_crossovers():
    from moesim.study.training_sweep import best_speedup, crossovers, sweep

    data = {**TRAIN_SCENARIO, "workload": {**TRAIN_SCENARIO["workload"],
                                           "synthetic": {**TRAIN_SCENARIO["workload"]["synthetic"], "batches": 2}}}
    rows = sweep(data, nodes=[1, 2], alphas=[0.0, 1.5])
    assert len(rows) == 2 * 2 * 4 and {r["gpus"] for r in rows} == {4, 8}
    assert all(r["speedup"] == 1.0 for r in rows if r["layout"] == "ep")
    lines = crossovers(rows, "ep")
    assert len(lines) == 2 and lines[0].startswith("m on 4 GPUs")
    assert best_speedup(rows, "fssdp") == max(r["speedup"] for r in rows if r["kind"] == "fssdp")


REAL = sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "traces"
               / "deepseek-v2-lite-prefill").glob("*.csv.gz"))
V2_LITE = {"name": "deepseek-v2-lite", "num_layers": 26, "num_experts": 64, "top_k": 6, "d_model": 2048,
           "d_ff": 1408, "num_heads": 16, "num_kv_heads": 16, "head_dim": 128}


def _v2_lite_training(workload: dict) -> dict:
    return {"name": "v2lite-train", "clusters": [{"name": "1x8", "preset": "hgx-h200", "nodes": 1}],
            "model": {**V2_LITE, "num_layers": 2}, "workload": {"phase": "train", **workload},
            "training": {"layouts": [{"name": "ep", "kind": "ep", "placement": "contiguous"},
                                     {"name": "fssdp", "kind": "fssdp", "placement": "greedy",
                                      "options": {"redundant_experts": 8}, "predict": "current"}]}}


def test_training_on_the_fitted_generator_drifts_step_to_step():
    data = _v2_lite_training({"synthetic": {"fitted": "deepseek-v2-lite", "tokens_per_gpu": 256, "batches": 3,
                                            "seed": 4}})
    data["model"]["num_layers"] = 26  # as fitted; then cut to 2 (the generator keeps the fit's first layers)
    scenario = parse_scenario(data, "t.yaml")
    scenario = scenario.model_copy(update={"model": scenario.model.model_copy(update={"num_layers": 2})})
    result = run_training(scenario)
    ep = result.runs[0]
    assert len(ep.step_s) == 3 and len(set(round(s["step"], 12) for s in ep.step_s)) == 3  # loads move per step


@pytest.mark.skipif(len(REAL) != 250, reason="needs ../shared/traces/deepseek-v2-lite-prefill")
def test_training_on_real_deepseek_v2_lite_routing(tmp_path):
    from moesim.traces.format import save_trace
    from moesim.traces.readers import import_trace

    res = import_trace(REAL[:40], num_experts=64, num_gpus=8, tokens_per_gpu=128, model="deepseek-v2-lite-chat")
    trace = res.trace
    cut = type(trace)(experts=trace.experts[:, :2], meta=trace.meta.__class__(**{**trace.meta.__dict__,
                                                                                  "num_layers": 2}),
                      home=trace.home, batch=trace.batch)
    path = tmp_path / "real.npz"
    save_trace(cut, path)
    result = run_training(parse_scenario(_v2_lite_training({"trace": {"file": str(path)}}), "t.yaml"))
    ep, fssdp = result.runs
    assert len(ep.step_s) == res.trace.num_batches(8, None) >= 2
    assert np.mean(fssdp.imbalance) < np.mean(ep.imbalance)  # real skew: materialising hot experts twice helps


def test_fp8_gradient_dispatch_sends_the_gradients_at_the_dispatchs_bytes():
    """training.fp8_gradient_dispatch: the backward's all-to-all to the experts moves the dispatch's bytes per copy
    (DeepSeek-V3's FP8 recipe) on the same matrix it moves the combine's bytes on without it."""
    from moesim.study.plan import prepare
    from moesim.study.training import StageRunner

    data = {**TRAIN_SCENARIO, "model": {**TRAIN_SCENARIO["model"], "dispatch_bytes_per_token": 600,
                                        "combine_bytes_per_token": 1024}}
    mats = {}
    for fp8 in (False, True):
        scenario = parse_scenario({**data, "training": {**data["training"], "fp8_gradient_dispatch": fp8}}, "t.yaml")
        study = prepare(scenario)
        st = StageRunner(study, study.clusters[0], scenario.training)
        placement = st.static_placement(scenario.training.layouts[0])
        mats[fp8] = st.traffic(0, placement, "token_index")[0][2]
    assert mats[True]["combine_bwd"].sum() > 0
    np.testing.assert_allclose(mats[True]["combine_bwd"], mats[False]["combine_bwd"] * 600 / 1024)
    np.testing.assert_allclose(mats[True]["dispatch_bwd"], mats[False]["dispatch_bwd"])
    np.testing.assert_allclose(mats[True]["dispatch"], mats[True]["combine_bwd"])
