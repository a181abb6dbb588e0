"""Disaggregated prefill and decode pools (moesim.study.disagg): the scenario form and its errors, the combined
figures' closed forms, the shipped DeepSeek Day-6 deployment run shrunk, and moesim run / validate on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.metrics.serving import RequestMix, disaggregated_figures
from moesim.study import load_scenario
from moesim.study.disagg import DisaggScenario, load_any, parse_disaggregated, run_disaggregated

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_scenarios_smoke import shrink  # noqa: E402

DAY6 = Path(__file__).resolve().parents[1] / "scenarios" / "deployments" / "deepseek_day6_disaggregated.yaml"
SYN = {"tokens_per_gpu": 32, "batches": 1, "zipf_alpha": 0.0, "gpu_mix_sigma": 0.0, "affinity": 0.0}
SMALL = {
    "name": "pd",
    "model": {"preset": "qwen3-30b-a3b", "num_layers": 2},
    "engine": {"progress": False},
    "requests": {"input_tokens": 2000, "output_tokens": 500, "cache_hit_rate": 0.5},
    "pools": {
        "prefill": {"cluster": {"name": "p", "preset": "hgx-h200", "nodes": 1},
                    "workload": {"seq_len": 512, "synthetic": {**SYN, "tokens_per_gpu": 512}},
                    "placements": ["contiguous"]},
        "decode": {"cluster": {"name": "d", "preset": "hgx-h200", "nodes": 2},
                   "workload": {"kv_len": 2000, "synthetic": SYN},
                   "placements": ["contiguous", {"name": "eplb", "policy": "eplb", "redundant_experts": 16}],
                   "engine": {"a2a": "low_latency"}},
    },
}


def serving(phase, per_node, ms, nodes):
    """What disaggregated_figures reads of a pool's serving figures."""
    key = "input_tokens_per_s_per_node" if phase == "prefill" else "output_tokens_per_s_per_node"
    return SimpleNamespace(phase=phase, nodes=nodes, forward_ms=ms, tpot_ms=ms if phase == "decode" else None,
                           output_tokens_per_s_per_request=1e3 / ms if phase == "decode" else None,
                           **{"input_tokens_per_s_per_node": None, "output_tokens_per_s_per_node": None, key: per_node})


def test_combined_figures_closed_forms():
    pre, dec = serving("prefill", 40_000.0, 2000.0, 4), serving("decode", 10_000.0, 50.0, 18)
    f = disaggregated_figures(pre, dec, RequestMix(4000, 1000, 0.5))
    # node-seconds per request: prefill 2000 computed tokens / 40k = 0.05; decode 1000 / 10k = 0.1
    assert f["needed_nodes_ratio"] == pytest.approx(0.5) and f["nodes_ratio"] == pytest.approx(4 / 18)
    assert f["requests_per_s_prefill_pool"] == pytest.approx(4 / 0.05)
    assert f["requests_per_s_decode_pool"] == pytest.approx(18 / 0.1)
    assert f["requests_per_s"] == pytest.approx(80) and f["limited_by"] == "prefill"
    assert f["output_tokens_per_s_per_node_balanced"] == pytest.approx(1000 / 0.15)
    assert f["input_tokens_per_s_per_prefill_node_with_cache_hits"] == pytest.approx(80_000)
    assert "needed_nodes_ratio" not in disaggregated_figures(pre, dec)  # no mix: each pool's figures only
    with pytest.raises(ValueError):
        disaggregated_figures(dec, pre)
    with pytest.raises(ValueError):
        RequestMix(100, 10, 1.0)


def test_small_deployment_runs_both_pools_through_the_one_engine():
    sc = parse_disaggregated(SMALL, "pd.yaml")
    assert sc.pools["decode"].engine.a2a == "low_latency" and sc.pools["prefill"].engine.a2a == "direct"
    assert sc.pools["prefill"].clusters[0].ep == 8 and sc.pools["decode"].clusters[0].ep == 16
    r = run_disaggregated(sc, progress=False)
    assert [run.name for run in r.pools["decode"].runs] == ["contiguous", "eplb"]
    fastest = min(r.pools["decode"].runs, key=lambda run: run.metrics.e2e_ms["mean"])
    f = r.figures
    assert f["decode_placement"] == fastest.name and f["prefill_nodes"] == 1 and f["decode_nodes"] == 2
    assert f["output_tokens_per_s_per_decode_node"] == pytest.approx(fastest.metrics.serving.tokens_per_s_per_node)
    prefill = r.pools["prefill"].runs[0].metrics.serving
    assert prefill.phase == "prefill" and f["input_tokens_per_s_per_prefill_node"] == prefill.tokens_per_s_per_node
    assert f["needed_nodes_ratio"] == pytest.approx(
        (1000 / prefill.tokens_per_s_per_node) / (500 / fastest.metrics.serving.tokens_per_s_per_node))


@pytest.mark.parametrize("change, field", [
    ({"pools": {"prefill": SMALL["pools"]["prefill"]}}, "pools.decode"),
    ({"clusters": []}, "clusters"),
    ({"requests": {"input_tokens": 10}}, "requests.output_tokens"),
    ({"requests": {"input_tokens": 10, "output_tokens": 5, "cache_hit_rate": 1.0}}, "requests.cache_hit_rate"),
    ({"pools": {**SMALL["pools"], "decode": {**SMALL["pools"]["decode"], "workload": {"seq_len": 9, "synthetic":
                                                                                      SYN}}}},
     "pools.decode.workload.kv_len"),
    ({"pools": {**SMALL["pools"], "prefill": {**SMALL["pools"]["prefill"], "cluster": {"preset": "nope"}}}},
     "pools.prefill.cluster.preset"),
    ({"pools": {**SMALL["pools"], "prefill": {**SMALL["pools"]["prefill"], "placements": ["nope"]}}},
     "pools.prefill.placements[0].policy"),
    ({"pools": {**SMALL["pools"], "prefill": {**SMALL["pools"]["prefill"], "tp": 2}}}, "pools.prefill.tp"),
    ({"engine": {"overlap": "three"}}, "engine.overlap"),
    ({"engine": "fast"}, "engine"),
    ({"pools": {**SMALL["pools"], "decode": {**SMALL["pools"]["decode"], "engine": [1]}}}, "pools.decode.engine"),
    ({"pools": {**SMALL["pools"], "decode": {**SMALL["pools"]["decode"], "engine": {"a2a": "x"}}}},
     "pools.decode.engine.a2a"),
])
def test_bad_disaggregated_scenarios_name_the_field(change, field, tmp_path, capsys):
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **change}))
    with pytest.raises(InputError) as exc:
        load_any(path)
    assert exc.value.source == str(path) and exc.value.field is not None and exc.value.field.startswith(field)
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_plain_loader_points_to_the_disaggregated_one(tmp_path):
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    with pytest.raises(InputError, match="pools: a disaggregated scenario"):
        load_scenario(path)


def test_day6_runs_shrunk():
    sc = load_any(DAY6)
    assert isinstance(sc, DisaggScenario)
    pre, dec = sc.pools["prefill"], sc.pools["decode"]
    assert (pre.clusters[0].ep, pre.clusters[0].spec.nodes, dec.clusters[0].ep, dec.clusters[0].spec.nodes) == \
        (32, 4, 144, 18)
    assert pre.engine.a2a == "hierarchical" and dec.engine.a2a == "low_latency" and dec.engine.launch == "cuda_graph"
    assert sc.mix is not None and sc.mix.input_tokens / sc.mix.output_tokens == pytest.approx(608 / 168, rel=1e-3)
    small = DisaggScenario(sc.name, sc.source, {k: shrink(v) for k, v in sc.pools.items()}, sc.mix, sc.output)
    r = run_disaggregated(small, progress=False)
    assert r.figures["limited_by"] in ("prefill", "decode") and r.figures["needed_nodes_ratio"] > 0
    for pool in r.pools.values():
        assert all(run.records.micro for run in pool.runs)  # two micro-batches in both pools


def test_cli_run_and_validate_a_disaggregated_scenario(tmp_path, capsys):
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    assert main(["validate", str(path)]) == 0
    assert "ok - disaggregated, prefill: p (8 GPUs, EP8)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "#### prefill pool" in text and "#### decode pool" in text and "need prefill:decode nodes" in text
    assert sorted(p.name for p in out.iterdir()) == ["decode", "disaggregation.json", "prefill"]
    doc = json.loads((out / "disaggregation.json").read_text())
    assert doc["format"] == "moesim.disaggregation/1" and doc["requests"]["cache_hit_rate"] == 0.5
    assert doc["pools"]["prefill"]["serving"]["phase"] == "prefill" and doc["pools"]["decode"]["ep"] == 16
    for pool in ("prefill", "decode"):
        assert json.loads((out / pool / "results.json").read_text())["runs"][0]["serving"]["phase"] == pool
    assert main(["serving", str(path), "--pool", "prefill", "--batch", "64", "-o", str(out / "serving-prefill"),
                 "-q", "--no-plots"]) == 0
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 0  # an older run's folder is replaced
    assert (out / "serving-prefill" / "serving.csv").is_file()  # ... the sweep inside it kept
    (out / "mine.txt").write_text("not moesim's")
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 2  # a folder with foreign files is not


def test_cli_serving_sweeps_one_pool(tmp_path, capsys):
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    assert main(["serving", str(path), "--batch", "16,32", "-o", str(tmp_path / "x"), "-q"]) == 2
    assert "--pool: a disaggregated scenario: name the pool to sweep, prefill or decode" in capsys.readouterr().err
    out = tmp_path / "sweep"
    assert main(["serving", str(path), "--pool", "decode", "--batch", "16,32", "--placement", "contiguous",
                 "-o", str(out), "-q", "--no-plots"]) == 0
    rows = json.loads((out / "serving.json").read_text())["rows"]
    assert [(r["cluster"], r["phase"], r["batch"]) for r in rows] == [("d", "decode", 16), ("d", "decode", 32)]
