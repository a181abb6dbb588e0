"""Serving figures (moesim.metrics.serving) and the batch sweep (moesim serving): closed forms (tokens/s = tokens /
time), the sweep's monotone latency, the CLI's table and files, and bad --batch values as one-line errors."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.metrics.serving import headline, serving_metrics
from moesim.report.serving import serving_table
from moesim.sim.compute import Attention
from moesim.study import parse_scenario, run_study
from moesim.study.serving import ROW_FIELDS, parse_batches, serving_sweep

SCENARIO = {
    "name": "serve",
    "clusters": [{"name": "h200", "preset": "hgx-h200", "nodes": 1}],
    "model": {"preset": "qwen3-30b-a3b", "num_layers": 2},
    "workload": {"kv_len": 1024, "synthetic": {"tokens_per_gpu": 64, "batches": 2, "seed": 3}},
    "placements": ["contiguous", "greedy"],
    "engine": {"progress": False},
}


def scenario(**workload):
    return parse_scenario({**SCENARIO, "workload": {**SCENARIO["workload"], **workload}}, "serve.yaml")


def records(times_s, gpus=16, per_node=8):
    """What serving_metrics reads of a run's records: forwards' start and end, GPUs, GPUs per node."""
    end = np.cumsum(times_s)
    return SimpleNamespace(batch_start=end - np.asarray(times_s), batch_end=end, num_gpus=gpus, gpus_per_node=per_node)


def test_decode_closed_forms():
    rec = records([0.050, 0.070])
    s = serving_metrics(rec, np.array([16 * 128, 16 * 96]), Attention("decode", 4096))
    assert s.phase == "decode" and s.kv_len == 4096
    assert s.requests_per_gpu == s.tokens_per_gpu == pytest.approx(112)
    # tokens of every forward / their summed time, per GPU; x 8 per node
    assert s.output_tokens_per_s_per_gpu == pytest.approx((128 + 96) / 0.120)
    assert s.output_tokens_per_s_per_node == pytest.approx(8 * (128 + 96) / 0.120)
    assert s.tpot_ms == s.forward_ms == pytest.approx(60.0)
    assert s.output_tokens_per_s_per_request == pytest.approx(1000 / 60.0)
    assert s.input_tokens_per_s_per_gpu is None and "prompt_len" not in s.to_json()
    assert "decode, 112 requests/GPU, KV 4096" in headline(s) and s.nodes == 2


def test_prefill_closed_forms():
    rec = records([2.0], gpus=32)
    s = serving_metrics(rec, np.array([32 * 16384]), Attention("prefill", 4096))
    assert s.phase == "prefill" and s.prompt_len == 4096 and s.prompts_per_gpu == 4
    assert s.input_tokens_per_s_per_gpu == pytest.approx(16384 / 2.0)
    assert s.input_tokens_per_s_per_node == pytest.approx(8 * 16384 / 2.0)
    assert s.tpot_ms is None and s.output_tokens_per_s_per_gpu is None
    assert s.forward_ms == s.forward_ms_p99 == pytest.approx(2000.0)
    assert serving_metrics(rec, np.array([32 * 16384]), None).phase == "batch"
    with pytest.raises(ValueError):
        serving_metrics(rec, np.array([1, 2]), None)  # one token count per forward
    assert "prefix_len" not in s.to_json() and "cached" not in headline(s)
    # a cached prefix: the computed tokens' rate as before, and the prompt's tokens counted with the cached ones
    c = serving_metrics(rec, np.array([32 * 16384]), Attention("prefill", 1024, prefix=3072))
    assert c.prompts_per_gpu == 16 and c.input_tokens_per_s_per_node == s.input_tokens_per_s_per_node
    assert c.prefix_len == 3072 and c.input_tokens_per_s_per_node_with_prefix == pytest.approx(4 * 8 * 16384 / 2.0)
    assert "1024-token prompts after a 3072-token cached prefix" in headline(c)


def test_every_run_carries_its_serving_figures():
    result = run_study(scenario(), progress=False)
    work = result.workloads["h200"]
    for run in result.runs:
        s = run.metrics.serving
        assert s is not None and s.phase == "decode" and s.gpus == 8
        forwards = run.records.batch_end - run.records.batch_start
        assert s.tokens_per_s_per_gpu == pytest.approx(work["tokens"] / forwards.sum() / 8)
        assert s.tokens_per_gpu == 64 and s.forward_ms == pytest.approx(run.metrics.e2e_ms["mean"])
        assert run.metrics.to_json()["serving"]["output_tokens_per_s_per_node"] == pytest.approx(
            8 * s.output_tokens_per_s_per_gpu)


def test_sweep_latency_and_throughput_rise_with_the_batch():
    rows = serving_sweep(scenario(), [8, 64, 512], placement="contiguous")
    assert [r["batch"] for r in rows] == [8, 64, 512] and {r["placement"] for r in rows} == {"contiguous"}
    for a, b in zip(rows, rows[1:]):
        assert b["forward_ms"] >= a["forward_ms"]  # a bigger batch never runs faster
        assert b["tokens_per_s_per_gpu"] > a["tokens_per_s_per_gpu"]  # ... and weights are read once for more tokens
    for r in rows:
        assert set(r) == set(ROW_FIELDS)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["batch"] / (r["forward_ms"] / 1e3))
        assert r["tpot_ms"] == r["forward_ms"]
    assert "requests/GPU" in serving_table(rows).splitlines()[0]


def test_sweep_refuses_traces_and_unknown_names(tmp_path):
    with pytest.raises(InputError, match="--placement: no placement 'nope'; valid: contiguous, greedy"):
        serving_sweep(scenario(), [8], placement="nope")
    with pytest.raises(InputError, match="--cluster: no cluster"):
        serving_sweep(scenario(), [8], cluster="nope")
    from moesim.study.serving import at_batch

    sc = scenario()
    traced = sc.model_copy(update={"workload": sc.workload.model_copy(update={
        "synthetic": None, "trace": SimpleNamespace()})})
    with pytest.raises(InputError, match="workload.trace: a serving sweep sets"):
        at_batch(traced, 8)


@pytest.mark.parametrize("text", ["", "abc", "0", "8,-1", "8,x", "1.5", "99999999999"])
def test_bad_batches_are_one_line_errors(text, tmp_path, capsys):
    with pytest.raises(InputError, match="--batch"):
        parse_batches(text)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    assert main(["serving", str(path), "--batch", text, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim: error: --batch: ") and err.count("\n") == 1
    assert not out.exists()


def test_cli_serving_prints_the_table_and_writes_the_files(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SCENARIO, "workload": {"seq_len": 512, "synthetic": {"tokens_per_gpu": 64}}}))
    out = tmp_path / "out"
    assert main(["serving", str(path), "--tokens", "256,64", "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:4] == ["cluster", "placement", "tokens/GPU", "input"]
    assert sorted(p.name for p in out.iterdir()) == ["serving.csv", "serving.json", "serving.png"]
    doc = json.loads((out / "serving.json").read_text())
    assert doc["format"] == "moesim.serving/1" and len(doc["rows"]) == 4  # 2 batches x 2 placements
    assert [r["batch"] for r in doc["rows"]] == [64, 64, 256, 256]
    assert all(r["phase"] == "prefill" and r["prompt_len"] == 512 and "tpot_ms" not in r for r in doc["rows"])
    with open(out / "serving.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == ROW_FIELDS and rows[0]["tpot_ms"] == ""
    assert float(rows[0]["tokens_per_s_per_gpu"]) == pytest.approx(64 / (float(rows[0]["forward_ms"]) / 1e3),
                                                                  rel=1e-5)
    assert main(["serving", str(path), "--tokens", "64", "-o", str(out), "-q", "--no-plots"]) == 0  # replaces it
    assert sorted(p.name for p in out.iterdir()) == ["serving.csv", "serving.json"]


def test_cli_run_prints_and_writes_serving_figures(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "Serving (back-to-back forwards" in text and "h200 / greedy: decode, 64 requests/GPU, KV 1024:" in text
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(r["serving"]["phase"] == "decode" and r["serving"]["tpot_ms"] > 0 for r in runs)


def test_a_run_keeps_the_serving_sweep_inside_its_folder(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 0
    assert main(["serving", str(path), "--batch", "8", "-o", str(out / "serving"), "-q", "--no-plots"]) == 0
    assert main(["run", str(path), "-o", str(out), "-q", "--no-plots"]) == 0  # replaces its own files only
    assert (out / "serving" / "serving.json").is_file()
    assert main(["serving", str(path), "--pool", "decode", "--batch", "8", "-o", str(tmp_path / "x"), "-q"]) == 2
    assert "--pool: only a disaggregated scenario" in capsys.readouterr().err
