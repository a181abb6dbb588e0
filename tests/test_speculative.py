"""Speculative decoding with the MTP module (workload.speculative, moesim.study.speculative): closed forms for the
accepted tokens per step, the attention of several queries per request (cache read once) and the serving figures;
the MTP module simulated as one more MoE layer; bad settings as one-line errors naming the field."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.metrics.serving import headline, serving_metrics
from moesim.sim.compute import Attention, attention_time, mla_core_work
from moesim.study import parse_scenario, run_study
from moesim.study.speculative import Speculative
from moesim.hardware import preset
from moesim.hardware.spec import ClusterSpec
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_with_overrides

SCENARIO = {
    "name": "mtp",
    "clusters": [{"name": "h200", "preset": "hgx-h200", "nodes": 1}],
    "model": {"preset": "deepseek-v3", "num_layers": 2},
    "workload": {"kv_len": 1024, "speculative": {"draft_tokens": 1, "acceptance": 0.75},
                 "synthetic": {"tokens_per_gpu": 64, "batches": 1, "seed": 3}},
    "placements": ["contiguous"],
    "engine": {"progress": False, "a2a": "low_latency", "moe_kernels": "deepgemm", "expert_dtype": "fp8"},
}


def scenario(**workload):
    return parse_scenario({**SCENARIO, "workload": {**SCENARIO["workload"], **workload}}, "mtp.yaml")


@pytest.mark.parametrize(("d", "a", "expected"), [(1, 0.6, 1.6), (3, 0.5, 1.875), (2, 0.0, 1.0), (2, 1.0, 3.0)])
def test_accepted_tokens_per_step_is_the_geometric_chain(d, a, expected):
    spec = Speculative(draft_tokens=d, acceptance=a)
    assert spec.queries == d + 1
    assert spec.output_tokens_per_step == pytest.approx(expected)


def test_several_queries_read_the_cache_once():
    """MLA decode: q queries of a request cost q times the FLOPs of one (each over its context) but read the latent
    cache once: bytes per token = H (2r + p) b + (r + p) b ctx / q, with ctx = cache + (q + 1) / 2 (query i sees
    the cache and queries 0..i)."""
    m = ModelSpec(**model_with_overrides({"preset": "deepseek-v3"}))
    H, r, p, b = m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.dtype_bytes
    one, two = Attention("decode", 4000), Attention("decode", 4000, queries=2)
    assert one.mean_context() == 4001 and two.mean_context() == 4001.5
    tokens = np.array([256.0])
    f1, b1 = mla_core_work(tokens, m, one, one.mean_context(), 0.0)
    f2, b2 = mla_core_work(tokens, m, two, two.mean_context(), 0.0)
    assert f2[0] / f1[0] == pytest.approx(4001.5 / 4001)
    assert b2[0] == pytest.approx(256 * (H * (2 * r + p) * b + (r + p) * b * 4001.5 / 2))
    _, b128 = mla_core_work(np.array([128.0]), m, one, one.mean_context(), 0.0)
    assert b1[0] - b2[0] == pytest.approx(128 * (r + p) * b * (4001 - 4001.5 / 2) * 2)  # half the caches read
    assert b2[0] - b128[0] == pytest.approx(128 * H * (2 * r + p) * b + 256 * (r + p) * b * 0.25)  # queries only
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    k0 = gpu.attention_fixed_keys
    f, nbytes = mla_core_work(tokens, m, two, two.mean_context(), k0)
    peak = gpu.bf16_tflops * 1e12 * gpu.mla_decode_efficiency
    hbm = gpu.hbm_GBps * 1e9 * gpu.mla_decode_hbm_efficiency
    expected = max(f[0] / peak, nbytes[0] / hbm) + gpu.attention_overhead_us * 1e-6
    assert attention_time(tokens, m, gpu, two)[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="queries"):
        Attention("prefill", 4000, queries=2)


def test_serving_figures_count_requests_and_accepted_tokens():
    rec = SimpleNamespace(batch_start=np.array([0.0]), batch_end=np.array([0.080]), num_gpus=8, gpus_per_node=8)
    s = serving_metrics(rec, np.array([8 * 256]), Attention("decode", 4000, queries=2), output_per_step=1.6)
    assert s.requests_per_gpu == 128 and s.tokens_per_gpu == 256 and s.draft_tokens == 1
    assert s.output_tokens_per_s_per_gpu == pytest.approx(128 * 1.6 / 0.080)
    assert s.output_tokens_per_s_per_node == pytest.approx(8 * 128 * 1.6 / 0.080)
    assert s.tpot_ms == pytest.approx(80 / 1.6) and s.output_tokens_per_s_per_request == pytest.approx(1.6 / 0.080)
    assert s.tokens_per_s_per_gpu == pytest.approx(256 / 0.080)  # every verified token, drafts included
    assert "128 requests/GPU + 1 draft token(s) each (the MTP module: one more MoE layer), 1.60 output tokens per " \
        "step" in headline(s)
    plain = serving_metrics(rec, np.array([8 * 256]), Attention("decode", 4000))
    assert plain.draft_tokens is None and "draft" not in headline(plain)


def test_mtp_module_runs_as_one_more_moe_layer():
    sc = scenario()
    assert sc.model.num_layers == 3 and sc.model.mtp_layers == 1  # the preset cut to 2 MoE layers, + the MTP module
    assert sc.attention is not None and sc.attention.queries == 2 and sc.output_per_step == pytest.approx(1.75)
    result = run_study(sc, progress=False)
    run = result.runs[0]
    assert run.records.gpu["tokens"].shape[1] == 3  # every layer's records, the MTP module's included
    s = run.metrics.serving
    assert s is not None and s.requests_per_gpu == 32 and s.output_tokens_per_step == pytest.approx(1.75)
    step_s = float((run.records.batch_end - run.records.batch_start).mean())
    assert s.output_tokens_per_s_per_gpu == pytest.approx(32 * 1.75 / step_s)
    # the same forward without speculation: two MoE layers, one output token per request per step
    base = parse_scenario({**SCENARIO, "workload": {"kv_len": 1024, "synthetic": SCENARIO["workload"]["synthetic"]}},
                          "plain.yaml")
    assert base.model.num_layers == 2 and base.output_per_step == 1.0


@pytest.mark.parametrize(("change", "field"), [
    ({"kv_len": None, "seq_len": 1024}, "workload.speculative"),
    ({"synthetic": {"tokens_per_gpu": 63, "seed": 3}}, "workload.synthetic.tokens_per_gpu"),
    ({"speculative": {"draft_tokens": 0, "acceptance": 0.5}}, "workload.speculative.draft_tokens"),
    ({"speculative": {"draft_tokens": 1, "acceptance": 1.5}}, "workload.speculative.acceptance"),
    ({"speculative": {"draft_tokens": 1}}, "workload.speculative.acceptance"),
])
def test_bad_speculative_settings_name_the_field(change, field):
    work = {k: v for k, v in {**SCENARIO["workload"], **change}.items() if v is not None}
    with pytest.raises(InputError) as exc:
        parse_scenario({**SCENARIO, "workload": work}, "mtp.yaml")
    assert exc.value.field == field


def test_a_model_without_mtp_is_refused_by_the_cli(tmp_path, capsys):
    data = {**SCENARIO, "model": {"preset": "qwen3-30b-a3b", "num_layers": 2}, "output": str(tmp_path / "out")}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "workload.speculative" in err[0] and "mtp_layers 0" in err[0]
    assert not (tmp_path / "out").exists()


def test_serving_sweep_batches_are_requests():
    from moesim.study.serving import serving_sweep

    rows = serving_sweep(scenario(), [8, 16])
    assert [r["batch"] for r in rows] == [8, 16]
    assert [r["tokens_per_gpu"] for r in rows] == [16, 32]  # requests x (1 + 1 draft)
    assert rows[0]["tpot_ms"] == pytest.approx(rows[0]["forward_ms"] / 1.75)
