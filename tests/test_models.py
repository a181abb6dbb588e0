"""Model presets and the architecture they describe: dense layers, shared experts, MLA, windows, group routing.

Every preset in the catalogue (whatever it holds) validates and runs a shrunk simulation; the new compute terms
match their closed forms worked out here from the GPUSpec fields; MLA's projection count matches DeepSeek-V3's
published parameter totals; a scenario's ``model: {preset: ...}`` parses with overrides, and bad ones fail as one
line naming the file and the field.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from moesim.cli import main
from moesim.errors import InputError
from moesim.hardware import build_topology
from moesim.metrics.summary import term_ms
from moesim.placement import Placement
from moesim.sim import EngineOptions, Simulation
from moesim.sim.compute import (Attention, attention_time, dense_layers_time, dense_time, expert_time,
                                shared_expert_time, swiglu_time)
from moesim.study import load_scenario, parse_scenario, run_study
from moesim.traces import Trace, TraceMeta
from moesim.traces.model import ARCHITECTURE_FIELDS, ModelSpec
from moesim.traces.model_presets import model_preset, model_preset_names, model_with_overrides

PRESETS = model_preset_names()


def preset_model(name: str, **overrides) -> ModelSpec:
    return ModelSpec(**{**model_preset(name).fields, **overrides})


def small_scenario(model: dict, **workload) -> dict:
    return {
        "name": "presets",
        "clusters": [{"name": "1x8", "preset": "hgx-h200"}],
        "model": model,
        "workload": {"seq_len": 64, **workload, "synthetic": {"tokens_per_gpu": 64, "batches": 1, "seed": 2,
                                                               **workload.pop("synthetic", {})}},
        "placements": ["contiguous"],
        "engine": {"progress": False},
    }


def gpu_rates(gpu):
    """(dense FLOP/s, HBM B/s, attention FLOP/s, attention HBM B/s, launch s, floor s) from the GPUSpec fields."""
    return (gpu.bf16_tflops * 1e12 * (gpu.dense_efficiency or gpu.compute_efficiency),
            gpu.hbm_GBps * 1e9 * gpu.hbm_efficiency,
            gpu.bf16_tflops * 1e12 * (gpu.attention_efficiency or gpu.compute_efficiency),
            gpu.hbm_GBps * 1e9 * (gpu.attention_hbm_efficiency or gpu.hbm_efficiency),
            gpu.ffn_overhead_us * 1e-6, gpu.ffn_floor_us * 1e-6)


def gemm_by_hand(gpu, T: float, n: int, k: int, b: float = 2.0) -> float:
    """One plain bf16 GEMM [T, k] x [k, n] as the plain-GEMM model times it, written out: tile-padded waves over
    the SMs against the weight and activation bytes, plus the eager fixed cost."""
    g = gpu.plain_gemm
    tiles = math.ceil(T / g.tile_m) * math.ceil(n / g.tile_n)
    tile_s = 2 * g.tile_m * g.tile_n * k / (gpu.bf16_tflops * 1e12 * g.gemm_efficiency / gpu.sms)
    nbytes = k * n * b + T * (k * b + n * 2)
    return max(math.ceil(tiles / gpu.sms) * tile_s, nbytes / (gpu.hbm_GBps * 1e9 * g.gemm_hbm_efficiency)) + \
        g.gemm_fixed_us * 1e-6


def swiglu_by_hand(gpu, T: float, d: int, f: int, b: float = 2.0) -> float:
    """A SwiGLU MLP: gate-up GEMM [T, d] x [d, 2f], the activation's 3 T f b bytes, down GEMM [T, f] x [f, d]."""
    hbm = gpu.hbm_GBps * 1e9 * gpu.hbm_efficiency
    return gemm_by_hand(gpu, T, 2 * f, d, b) + 3 * T * f * b / hbm + gemm_by_hand(gpu, T, d, f, b)


# ---------------------------------------------------------------- the catalogue


def test_there_are_presets():
    assert len(PRESETS) >= 2


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_cites_its_source(name):
    preset = model_preset(name)
    model = ModelSpec(**preset.fields)
    assert model.name == name
    assert "huggingface.co/" in preset.source and "config.json" in preset.source
    counts = model.param_counts()
    assert 0 < counts["active"] < counts["total"]
    assert model.total_layers == model.num_layers + model.dense_layers
    if model.mtp_layers:  # recorded, not simulated: model show must say so
        assert any("MTP" in note for note in preset.notes)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_a_shrunk_simulation(name):
    """Every preset, cut to 2 MoE layers and 64 tokens per GPU, runs end to end with the attention core on."""
    scenario = parse_scenario(small_scenario({"preset": name, "num_layers": 2}), f"{name}.yaml")
    model = scenario.model
    assert model.num_layers == 2 and model.d_model == model_preset(name).fields["d_model"]
    result = run_study(scenario, progress=False)
    (run,) = result.runs
    assert np.isfinite(run.metrics.e2e_ms["mean"]) and run.metrics.e2e_ms["mean"] > 0
    assert run.records.gpu["tokens"].shape[1] == 2
    terms = term_ms(run.records)
    assert (terms["shared_expert"] > 0) == (model.shared_experts > 0)
    assert (terms["dense_layers"] > 0) == (model.dense_layers > 0)
    assert terms["attention"] > 0
    assert sum(terms.values()) == pytest.approx(run.metrics.e2e_ms["mean"], rel=0.05)


def test_preset_lookup_errors():
    with pytest.raises(KeyError, match="unknown model preset 'gpt-5'; valid: "):
        model_preset("gpt-5")
    with pytest.raises(KeyError, match="text"):
        model_with_overrides({"preset": ["deepseek-v3"]})
    assert model_with_overrides({"num_layers": 2}) == {"num_layers": 2}  # no preset: as given


def test_preset_fields_are_copies():
    model_preset(PRESETS[0]).fields["num_layers"] = -1
    assert model_preset(PRESETS[0]).fields["num_layers"] > 0


# ---------------------------------------------------------------- shape, parameters and validation


def test_deepseek_v3_mla_projection_count_and_published_totals():
    """The five MLA matrices of DeepSeek-V3, by hand; with experts, dense MLPs, routers and embeddings they give
    its published 671B total and 37B activated (README_WEIGHTS.md: 36.7B with 0.9B embedding and 0.9B head).
    Counted: attention projections, routed and shared experts, routers, dense MLPs, embedding and head; not
    norms or the MTP module."""
    m = preset_model("deepseek-v3")
    q_a, q_b = 7168 * 1536, 1536 * 128 * (128 + 64)
    kv_a, kv_b, o = 7168 * (512 + 64), 512 * 128 * (128 + 128), 128 * 128 * 7168
    assert m.projection_params == q_a + q_b + kv_a + kv_b + o == 187_105_280
    counts = m.param_counts()
    assert counts["total"] == pytest.approx(671e9, rel=0.01)
    assert counts["active"] == pytest.approx(37e9, rel=0.03)
    assert counts["attention"] == 61 * 187_105_280
    assert counts["dense_mlp"] == 3 * 3 * 7168 * 18432
    assert counts["shared_experts"] == 58 * 3 * 7168 * 2048


def test_mla_without_query_compression():
    """DeepSeek-V2-Lite has no q_lora_rank: one d_model x heads x (nope + rope) query projection."""
    m = preset_model("deepseek-v2-lite")
    assert m.q_lora_rank is None
    q, kv_a, kv_b, o = 2048 * 16 * 192, 2048 * 576, 512 * 16 * 256, 16 * 128 * 2048
    assert m.projection_params == q + kv_a + kv_b + o
    assert m.param_counts()["total"] == pytest.approx(15.7e9, rel=0.01)


def test_layer_positions():
    llama = ModelSpec(num_layers=3, num_experts=4, top_k=1, d_model=8, d_ff=8, moe_layer_step=2, dense_d_ff=16)
    assert [llama.moe_layer_index(l) for l in range(3)] == [1, 3, 5]  # Llama-4's moe_layers with step 2
    assert [list(llama.dense_layers_before(l)) for l in range(3)] == [[0], [2], [4]]
    ds = ModelSpec(num_layers=3, num_experts=4, top_k=1, d_model=8, d_ff=8, first_dense_layers=3, dense_d_ff=16)
    assert [list(ds.dense_layers_before(l)) for l in range(3)] == [[0, 1, 2], [], []]
    assert ds.total_layers == 6 and ds.dense_layers == 3
    gpt = preset_model("gpt-oss-120b")
    assert [gpt.window_at(i) for i in range(4)] == [128, None, 128, None]  # layer_types: sliding first


BASE = {"num_layers": 2, "num_experts": 8, "top_k": 2, "d_model": 64, "d_ff": 32}


@pytest.mark.parametrize("fields, message", [
    ({"first_dense_layers": 1}, "dense_d_ff"),
    ({"moe_layer_step": 2}, "dense_d_ff"),
    ({"num_heads": 4, "kv_lora_rank": 16}, "needs qk_nope_head_dim, qk_rope_head_dim, v_head_dim"),
    ({"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}, "needs num_heads"),
    ({"num_heads": 4, "num_kv_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
      "v_head_dim": 8}, "GQA fields"),
    ({"num_heads": 4, "sliding_window": 8, "sliding_window_every": 0}, "greater than or equal to 1"),
    ({"num_heads": 4, "sliding_window_every": 2}, "needs sliding_window"),
    ({"expert_groups": 3}, "must divide num_experts"),
    ({"expert_groups": 4, "topk_groups": 5}, "at most expert_groups"),
    ({"expert_groups": 8, "topk_groups": 1}, "top_k"),
    ({"first_dense_layers": 20_000, "dense_d_ff": 8}, "less than or equal"),
    ({"num_layers": 5_000, "moe_layer_step": 3, "dense_d_ff": 8}, "more than 10000"),
    ({"shared_experts": True}, "must be a number"),
])
def test_bad_architecture_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**{**BASE, **fields})


def test_models_without_the_new_fields_dump_as_before():
    """results.json holds the model's dump: the architecture fields stay out of it at their defaults, so the
    results of every older scenario stay byte-identical (tests/test_golden_results.py)."""
    plain = ModelSpec(**BASE).model_dump(mode="json")
    assert not set(ARCHITECTURE_FIELDS) & set(plain)
    assert set(plain) == {"name", *BASE, "dtype_bytes", "dispatch_bytes_per_token", "combine_bytes_per_token",
                          "dense_flops_per_token", "dense_weight_bytes", "num_heads", "num_kv_heads", "head_dim",
                          "sliding_window"}
    full = preset_model("deepseek-v3").model_dump(mode="json")
    assert full["first_dense_layers"] == 3 and full["shared_experts"] == 1 and full["kv_lora_rank"] == 512
    assert ModelSpec(**full) == preset_model("deepseek-v3")


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("tokens", [4096, 8])  # compute-bound prefill, weight-bound decode
def test_shared_expert_closed_form(cluster, tokens):
    gpu = cluster().gpu
    m = preset_model("deepseek-v3")
    expected = swiglu_by_hand(gpu, tokens, 7168, 2048)  # hidden_size, one shared expert of moe_intermediate_size
    assert shared_expert_time(np.array([tokens, 0]), m, gpu) == pytest.approx([expected, 0.0], rel=1e-12)
    # two shared experts run as one MLP twice as wide (DeepSeek-V2-Lite: 2 x 1408)
    lite = preset_model("deepseek-v2-lite")
    assert shared_expert_time(np.array([tokens]), lite, gpu)[0] == pytest.approx(
        swiglu_time(np.array([tokens]), 2048, 2 * 1408, gpu, 2)[0], rel=1e-12)
    assert shared_expert_time(np.array([tokens]), preset_model("qwen3-30b-a3b"), gpu)[0] == 0.0


def test_dense_layer_closed_form_mla_prefill(cluster):
    """One of DeepSeek-V3's dense layers on 2048 tokens of 2048-token prompts: MLA projections (2 FLOPs per
    weight against the weights and the activations in and out), the non-absorbed MLA core, and the SwiGLU MLP of
    intermediate_size 18432, each with its own launch cost."""
    gpu = cluster().gpu
    flops_s, hbm, att_s, att_hbm, launch, floor = gpu_rates(gpu)
    m = preset_model("deepseek-v3")
    T, S, d, b, H = 2048, 2048, 7168, 2, 128
    P = 187_105_280
    projections = max(2 * P * T / flops_s, (P * b + T * 2 * d * b) / hbm) + launch
    ctx = (S + 1) / 2  # causal: position i sees i keys
    width = 128 + 64 + 192  # QK^T over nope + rope, PV over v padded to 192: FlashAttention-2 takes one head size
    core = max(T * 2 * H * width * (ctx + gpu.attention_fixed_keys) / att_s, T * 2 * H * width * b / att_hbm)
    core += gpu.attention_overhead_us * 1e-6
    mlp = swiglu_by_hand(gpu, T, d, 18432)
    got = dense_layers_time(np.array([T]), m, gpu, range(1), attention=Attention("prefill", S))[0]
    assert got == pytest.approx(projections + core + mlp, rel=1e-12)
    assert dense_layers_time(np.array([T]), m, gpu, range(3))[0] == pytest.approx(3 * (projections + mlp), rel=1e-12)
    assert dense_layers_time(np.array([T]), m, gpu, range(0))[0] == 0.0


def test_mla_prefill_after_a_cached_prefix_closed_form(cluster):
    """DeepSeek-V3 prefill of S computed tokens after P cached ones: the cache holds the 576-element latent, so each
    prefix token is decompressed by kv_b (512 -> 128 heads x (128 + 128)) before the core reads its keys and values;
    the core's context grows by P."""
    gpu = cluster().gpu
    flops_s, hbm, att_s, att_hbm, launch, floor = gpu_rates(gpu)
    m = preset_model("deepseek-v3")
    T, S, P, d, b, H = 2048, 512, 1536, 7168, 2, 128
    q = P / S  # prefix tokens per computed token
    W = 187_105_280
    flops = 2 * W * T + T * q * 2 * 512 * H * (128 + 128)
    nbytes = W * b + T * 2 * d * b + T * q * (576 + H * 256) * b
    projections = max(flops / flops_s, nbytes / hbm) + launch
    width = 128 + 64 + 192
    ctx = P + (S + 1) / 2
    core_bytes = T * 2 * H * width * b + T * q * H * (128 + 64 + 128) * b
    core = max(T * 2 * H * width * (ctx + gpu.attention_fixed_keys) / att_s, core_bytes / att_hbm)
    core += gpu.attention_overhead_us * 1e-6
    got = dense_time(np.array([T]), m, gpu, attention=Attention("prefill", S, prefix=P))[0]
    assert got == pytest.approx(projections + core, rel=1e-12)
    # no prefix: the plain prefill, nothing decompressed
    plain = dense_time(np.array([T]), m, gpu, attention=Attention("prefill", S))[0]
    assert plain < got


def test_mla_decode_core_closed_form(cluster):
    """Weight-absorbed MLA decode: every query head attends over the shared 576-element latent cache, 2 x 576 +
    2 x 512 FLOPs per head per context token; the cache is read once per sequence; at FlashMLA's published H800
    rates (580 TFLOP/s, 3000 GB/s), as shares of the GPU's peak."""
    gpu = cluster().gpu
    att_s = gpu.bf16_tflops * 1e12 * 580 / 989
    att_hbm = gpu.hbm_GBps * 1e9 * 3000 / 3350
    m = preset_model("kimi-k2")
    T, K, H, b = 64, 4096, 64, 2
    flops = T * H * (2 * 576 + 2 * 512) * (K + 1 + gpu.attention_fixed_keys)
    nbytes = T * (H * (512 + 576) * b + 576 * b * (K + 1))
    expected = max(flops / att_s, nbytes / att_hbm) + gpu.attention_overhead_us * 1e-6
    assert attention_time(np.array([T]), m, gpu, Attention("decode", K))[0] == pytest.approx(expected, rel=2e-3)


def test_sliding_window_on_every_other_layer(cluster):
    gpu = cluster().gpu
    m = preset_model("gpt-oss-120b")
    att = Attention("prefill", 8192)
    windowed, full = (attention_time(np.array([8192]), m, gpu, att, layer=i)[0] for i in (0, 1))
    assert windowed < full / 10
    no_window = preset_model("gpt-oss-120b", sliding_window=None, sliding_window_every=1)
    assert full == attention_time(np.array([8192]), no_window, gpu, att)[0]


def test_engine_runs_dense_layers_and_shared_experts_in_closed_form(cluster):
    """Two GPUs, balanced routing, no contention: a batch is the leading dense layer, then per MoE layer its
    attention, shared expert, dispatch, experts and combine; each span is its closed form."""
    spec = cluster(nodes=1, gpus_per_node=2)
    n = 4096
    model = ModelSpec(num_layers=2, num_experts=2, top_k=1, d_model=1024, d_ff=2048, first_dense_layers=1,
                      dense_d_ff=4096, shared_experts=1, shared_d_ff=1024)
    experts = (np.arange(2 * n) % 2).repeat(2).reshape(2 * n, 2, 1)
    trace = Trace(experts=experts, meta=TraceMeta(num_experts=2, num_layers=2, top_k=1)).validate()
    placement = Placement.from_assignment(np.array([[0, 1], [0, 1]]), 2, "contiguous")
    options = EngineOptions(rate_tolerance=0.0, moe_kernels="ffn")
    rec = Simulation(build_topology(spec), model, options=options).run(trace, trace.layout(2, n), placement)
    gpu, g = spec.gpu, rec.gpu
    tokens = np.array([n])
    dense_layer = dense_time(tokens, model, gpu)[0] + swiglu_time(tokens, 1024, 4096, gpu, 2)[0]
    shared = swiglu_time(tokens, 1024, 1024, gpu, 2)[0]
    assert (g["t_attn_start"] - g["t_layer_start"])[0, :, 0] == pytest.approx([dense_layer, 0.0], rel=1e-9)
    assert (g["t_dense_end"] - g["t_attn_start"])[0, :, 0] == pytest.approx([dense_time(tokens, model, gpu)[0]] * 2)
    assert (g["t_dispatch_join"] - g["t_shared_start"])[0, :, 0] == pytest.approx([shared] * 2, rel=1e-9)
    assert (g["t_shared_start"] == g["t_dense_end"]).all()  # moe_kernels ffn: no router steps before it
    compute = expert_time(np.array([[n, 0]]), model, gpu)[0]
    assert (g["t_compute_end"] - g["t_compute_start"])[0, :, 0] == pytest.approx([compute] * 2, rel=1e-9)
    terms = term_ms(rec)
    assert terms["dense_layers"] == pytest.approx(dense_layer * 1e3, rel=1e-9)
    assert terms["shared_expert"] == pytest.approx(2 * shared * 1e3, rel=1e-9)
    assert sum(terms.values()) == pytest.approx((rec.batch_end - rec.batch_start)[0] * 1e3, rel=1e-9)


def test_without_the_new_terms_no_event_is_added(cluster, tiny_model):
    """A model with neither dense layers nor shared experts schedules exactly the events it did."""
    spec = cluster(nodes=1, gpus_per_node=2)
    experts = np.stack([np.arange(64) % 8, (np.arange(64) + 1) % 8], axis=1)[:, None, :].repeat(2, axis=1)
    trace = Trace(experts=experts, meta=TraceMeta(num_experts=8, num_layers=2, top_k=2)).validate()
    placement = Placement.from_assignment(np.tile(np.arange(8) // 4, (2, 1)), 2, "contiguous")
    topo = build_topology(spec)
    base = Simulation(topo, tiny_model).run(trace, trace.layout(2, 32), placement)
    shared = Simulation(topo, tiny_model.model_copy(update={"shared_experts": 1})).run(
        trace, trace.layout(2, 32), placement)
    assert shared.events == base.events + 2 * 2  # one shared-expert step per GPU and layer
    g = base.gpu
    assert (g["t_attn_start"] == g["t_layer_start"]).all() and (g["t_shared_start"] == g["t_dispatch_join"]).all()


# ---------------------------------------------------------------- scenarios and the command line


def test_scenario_preset_with_overrides(tmp_path, yaml_writer):
    data = small_scenario({"preset": "deepseek-v3", "num_layers": 4, "dispatch_bytes_per_token": 7408})
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", data))
    assert sc.model == preset_model("deepseek-v3", num_layers=4, dispatch_bytes_per_token=7408)
    syn = sc.workload.synthetic
    assert (syn.groups, syn.topk_groups) == (8, 4)  # the model's group-limited routing by default
    data["workload"]["synthetic"]["groups"] = 4  # the workload's own values win, both of them
    syn = load_scenario(yaml_writer(tmp_path / "t.yaml", data)).workload.synthetic
    assert (syn.groups, syn.topk_groups) == (4, None)
    bare = load_scenario(yaml_writer(tmp_path / "u.yaml", small_scenario("qwen3-30b-a3b")))
    assert bare.model == preset_model("qwen3-30b-a3b")


@pytest.mark.parametrize("model, field, message", [
    ({"preset": "deepseek-v9"}, "model.preset", "unknown model preset 'deepseek-v9'; valid: "),
    ("deepseek-v9", "model", "unknown model preset"),
    ({"preset": 3}, "model.preset", "text"),
    ({"preset": "deepseek-v3", "num_layers": 0}, "model.num_layers", "greater than or equal to 1"),
    ({"preset": "deepseek-v3", "layers": 4}, "model.layers", "unknown key"),
    ({"preset": "deepseek-v3", "num_experts": 12}, "model", "expert_groups (8) must divide num_experts (12)"),
    ({"preset": "llama-4-maverick", "dense_d_ff": None}, "model", "dense_d_ff"),
])
def test_bad_preset_names_file_and_field(tmp_path, yaml_writer, capsys, model, field, message):
    path = yaml_writer(tmp_path / "bad.yaml", small_scenario(model))
    with pytest.raises(InputError) as exc:
        load_scenario(path)
    assert str(exc.value).startswith(f"{path}: {field}: ") and message in str(exc.value), str(exc.value)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: {field}: " in err


def test_model_list_and_show(capsys):
    assert main(["model", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(PRESETS)
    assert {line.split()[0] for line in lines[1:]} == set(PRESETS)
    ds = next(line for line in lines if line.startswith("deepseek-v3 "))
    assert "58 MoE + 3 dense" in ds and "256+1" in ds and "MLA" in ds and "671.0B" in ds
    assert main(["model", "show", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "huggingface.co/deepseek-ai/DeepSeek-V3" in out and "MTP" in out and "not simulated" in out
    for field in ModelSpec.model_fields:
        assert f"\n    {field} " in out


def test_model_show_yaml_is_a_scenario_model(capsys, tmp_path, yaml_writer):
    assert main(["model", "show", "llama-4-maverick", "--set", "num_layers=3", "--yaml"]) == 0
    import yaml

    section = yaml.safe_load(capsys.readouterr().out)["model"]
    assert set(section) == set(ModelSpec.model_fields)
    sc = load_scenario(yaml_writer(tmp_path / "s.yaml", small_scenario(section)))
    assert sc.model == preset_model("llama-4-maverick", num_layers=3)


@pytest.mark.parametrize("argv, message", [
    (["model", "show", "deepseek-v9"], "unknown model preset"),
    (["model", "show"], "needs a preset name"),
    (["model", "show", "deepseek-v3", "--set", "num_layers=0"], "deepseek-v3: num_layers: "),
    (["model", "show", "deepseek-v3", "--set", "a.b=1"], "--set a.b"),
])
def test_model_show_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_outputs_show_the_new_terms(tmp_path, yaml_writer, capsys):
    """The per-layer CSV has the dense-layer and shared-expert columns, the timeline their slices, and the run
    prints them per step."""
    path = yaml_writer(tmp_path / "s.yaml", small_scenario({"preset": "deepseek-v3", "num_layers": 2}))
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Time per batch by step" in out and "dense layers" in out and "shared expert" in out
    import csv

    with open(tmp_path / "out" / "per_gpu_layer.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["shared_expert_ms"]) > 0 for r in rows)
    assert {r["layer"] for r in rows if float(r["dense_layers_ms"]) > 0} == {"0"}  # the 3 leading dense layers
    events = json.loads((tmp_path / "out" / "timeline.json").read_text())["traceEvents"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert {"dense_layers", "dense", "shared_expert", "dispatch", "compute", "combine"} <= names
    dense = [e for e in events if e.get("name") == "dense_layers"]
    assert {e["args"]["dense_layers"] for e in dense} == {3}
