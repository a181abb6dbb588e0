"""moesim bench on the CPU (gloo, tiny shapes): the files it writes are what moesim calibrate reads."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesim.measure import a2a, attention, ffn  # noqa: E402
from moesim.calibration import calibrate, load_bench  # noqa: E402
from moesim.calibration.attention import EFFICIENCIES, FIXED_KEYS, HBM_EFFICIENCIES, OVERHEADS_US, fit_attention  # noqa: E402
from moesim.calibration.fit import split  # noqa: E402
from moesim.cli import main  # noqa: E402
from moesim.hardware import ClusterSpec, preset  # noqa: E402

H100_ATTENTION = Path(__file__).parents[1] / "benchmarks/validation/attention_h100/attention_h100.json"
TINY_ATTENTION = {"tiny": {"d_model": 128, "n_heads": 8, "n_kv_heads": 4, "head_dim": 16}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    a2a_path = a2a.run(out, 2, cpu=True, port=_free_port())
    ffn_path = ffn.run(out, cpu=True, shapes={"tiny": (64, 128), "small": (128, 256)})
    attention_path = attention.run(out, cpu=True, shapes=TINY_ATTENTION, log=None)
    return a2a_path, ffn_path, attention_path


def test_a2a_json_has_the_calibration_format(bench_files):
    raw = json.loads(bench_files[0].read_text())
    assert raw["world"] == 2
    sizes = [u["bytes_per_pair"] for u in raw["uniform"]]
    assert sizes == sorted(sizes) and sizes[0] == 1024
    assert all(u["ms_median_max_over_ranks"] >= u["ms_median_rank"] > 0 for u in raw["uniform"])
    assert len(raw["skew"]) == 6
    for case in raw["skew"]:
        assert np.array(case["bytes_matrix"]).shape == (2, 2)
        assert len(case["ms_median_per_rank"]) == 2 and min(case["ms_median_per_rank"]) > 0
    assert [p["bytes"] for p in raw["p2p"]] == [4096, 16384]


def test_a2a_one_rank_in_process_writes_what_calibrate_reads(tmp_path, monkeypatch):
    """The rank's own code run in this process (the fixture's two ranks run in children): one gloo rank, whose
    skewed matrices are the ones random.Random(7) draws, and no point-to-point (that needs two ranks)."""
    import random

    import torch.distributed as dist

    def in_process(fn, args, nprocs, join):
        assert nprocs == 1 and join
        fn(0, *args)

    monkeypatch.setattr(a2a.mp, "spawn", in_process)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # the rank sets them; put them back afterwards
        monkeypatch.setenv(name, "unset")
    try:
        path = a2a.run(tmp_path / "out", 1, cpu=True, port=_free_port())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert path == tmp_path / "out" / "a2a_1.json"
    raw = json.loads(path.read_text())
    assert (raw["world"], raw["device"], raw["nccl"], raw["torch"]) == (1, "cpu", "", torch.__version__)
    assert [u["bytes_per_pair"] for u in raw["uniform"]] == [2**e for e in range(10, 16)]
    for u in raw["uniform"]:
        assert u["ms_median_max_over_ranks"] == u["ms_median_rank"]  # the max over one rank
        assert 0 < u["ms_min"] <= u["ms_median_rank"] <= u["ms_max"]
    rng = random.Random(7)
    drawn = [[[int(4096 * rng.choice([0.0, 0.25, 0.5, 1, 2, 4])) // 2 * 2]] for _ in range(6)]
    assert [c["bytes_matrix"] for c in raw["skew"]] == drawn
    assert all(len(c["ms_median_per_rank"]) == 1 and c["ms_median_per_rank"][0] > 0 for c in raw["skew"])
    assert raw["p2p"] == []
    data = load_bench([path])
    assert data.world == 1 and len(data.a2a) == 12 and not data.p2p
    assert [p.size for p in data.a2a[:6]] == [2.0**e for e in range(10, 16)]


def test_ffn_json_has_the_calibration_format(bench_files):
    raw = json.loads(bench_files[1].read_text())
    assert set(raw["single"]) == {"tiny", "small"}
    assert raw["single"]["tiny"]["d_model"] == 64
    assert [row[0] for row in raw["single"]["tiny"]["rows"]] == [1, 64]
    assert len(raw["multi"]) == 12 and all(m["shape"] == "tiny" for m in raw["multi"])
    assert raw["bf16_tflops_8k"] > 0 and raw["copy_GBps_rw"] > 0


def test_calibrate_reads_what_bench_wrote(bench_files, tmp_path):
    data = load_bench(list(bench_files))
    assert data.world == 2 and len(data.a2a) == 6 + 6 and len(data.p2p) == 2
    assert len(data.ffn) == 2 * 2 + 12
    assert len(data.attention) == 12
    result = calibrate(data, iters=20)
    assert {p.kind for p in result.predictions} == {"a2a-uniform", "a2a-skew", "p2p", "ffn", "attention", "projection"}
    assert any(p.held_out for p in result.predictions) and any(not p.held_out for p in result.predictions)
    # the attention core is fitted last, on the GPU the FFN fit gave
    ffn_only = calibrate(load_bench(list(bench_files[:2])), iters=20)
    assert result.spec.gpu.hbm_efficiency == ffn_only.spec.gpu.hbm_efficiency
    held = split(data.attention, key=lambda p: (p.shape, p.phase))
    fit = fit_attention([p for p, h in zip(data.attention, held) if not h], ffn_only.spec.gpu)
    assert {k: result.fitted[f"gpu.{k}"] for k in asdict(fit)} == asdict(fit)
    out = tmp_path / "cpu.yaml"
    assert main(["calibrate", *map(str, bench_files), "-o", str(out)]) == 0
    header = out.read_text().splitlines()[:2]
    assert header[0].startswith("# moesim calibrate")
    assert all(group in header[1] for group in ("network", "expert FFN", "attention core"))


def test_attention_json_has_the_bench_format(bench_files):
    raw = json.loads(bench_files[2].read_text())
    assert set(raw) == {"device", "torch", "cuda", "cudnn", "python", "date", "warmup", "reps", "l2_flush", "shapes",
                        "ceilings", "method", "records", "elapsed_s"}
    assert raw["shapes"] == TINY_ATTENTION and raw["method"] == attention.METHOD
    assert (raw["warmup"], raw["reps"], raw["l2_flush"]) == (1, 3, True)
    assert raw["ceilings"]["bf16_tflops"] > 0 and raw["ceilings"]["copy_GBps_rw"] > 0
    recs = raw["records"]
    assert len(recs) == 3 * (2 + 2) * 4 and not any("skipped" in r for r in recs)  # tp x (prefill + decode) x parts
    for phase, size in (("prefill", "seq_len"), ("decode", "context")):
        sel = [r for r in recs if r["phase"] == phase]
        assert {r["part"] for r in sel} == {"qkv", "core", "o", "block"}
        assert {r["tp"] for r in sel} == {1, 2, 4}
        assert all(r[size] > 0 and r["tokens"] > 0 and r["batch"] > 0 for r in sel)
    assert all(r["median_ms"] > 0 and r["min_ms"] > 0 and r["reps"] == 3 and r["flops"] > 0 for r in recs)
    assert all("gpu_kernel_ms" not in r for r in recs)  # no profiler on the CPU
    core = [r for r in recs if r["part"] == "core"]
    assert all(r["sdpa_backend_requested"] in ("flash", "default") for r in core)
    block = next(r for r in recs if r["part"] == "block")
    parts = [r for r in recs if r["part"] != "block" and all(r[k] == block[k] for k in ("tp", "phase", "seq_len"))]
    assert block["flops"] == sum(r["flops"] for r in parts)


def test_load_bench_reads_attention_core_points(bench_files):
    data = load_bench([bench_files[2]])
    assert not data.a2a and not data.ffn and data.devices == {"cpu (quick smoke run)"}
    points = data.attention
    assert len(points) == 12 and all(p.timing == "median_ms" for p in points)  # CPU: event time
    assert {(p.phase, p.length) for p in points} == {("prefill", 32), ("prefill", 128), ("decode", 64)}
    raw = json.loads(bench_files[2].read_text())
    first = next(r for r in raw["records"] if r["part"] == "core")
    assert points[0].tokens == first["tokens"] / first["tp"]
    assert points[0].measured_s == pytest.approx(first["median_ms"] * 1e-3)
    assert points[0].model.num_kv_heads == 4 and points[0].model.head_size == 16


def test_calibrate_fits_attention_alone(bench_files):
    result = calibrate(load_bench([bench_files[2]]))
    assert {p.kind for p in result.predictions} == {"attention", "projection"}
    core = [p for p in result.predictions if p.kind == "attention"]
    # every third of each (shape, phase) group of six
    assert len([p for p in core if p.held_out]) == 4 and len(core) == 12
    # qkv and o: every third of each (shape, phase, part)
    proj = [p for p in result.predictions if p.kind == "projection"]
    assert len([p for p in proj if p.held_out]) == 8 and len(proj) == 24
    assert all(p.measured_ms > 0 and p.predicted_ms > 0 for p in result.predictions)
    assert set(result.fitted) == {"gpu.attention_efficiency", "gpu.attention_fixed_keys", "gpu.attention_overhead_us",
                                  "gpu.attention_hbm_efficiency", "gpu.dense_efficiency"}
    assert HBM_EFFICIENCIES.min() <= result.fitted["gpu.attention_hbm_efficiency"] <= HBM_EFFICIENCIES.max()
    assert EFFICIENCIES.min() <= result.fitted["gpu.attention_efficiency"] <= EFFICIENCIES.max()
    assert min(FIXED_KEYS) <= result.fitted["gpu.attention_fixed_keys"] <= max(FIXED_KEYS)
    assert min(OVERHEADS_US) <= result.fitted["gpu.attention_overhead_us"] <= max(OVERHEADS_US)
    assert result.spec.gpu.attention_efficiency == result.fitted["gpu.attention_efficiency"]
    base = ClusterSpec(**preset("hgx-h200"))
    assert result.spec.gpu.compute_efficiency == base.gpu.compute_efficiency  # nothing else fitted
    assert result.spec.nvlink == base.nvlink


def test_calibrate_cli_writes_the_attention_fit(bench_files, tmp_path, capsys):
    import yaml

    from moesim.study.config import load_scenario

    out = tmp_path / "att.yaml"
    assert main(["calibrate", str(bench_files[2]), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 attention-core (median_ms), 24 attention-projection, 0 MoE-layer" in printed
    assert "attention core fit" in printed and "attention core held-out" in printed
    text = out.read_text()
    assert text.splitlines()[1].startswith("# held-out median |error|: attention core ")
    gpu = yaml.safe_load(text)["gpu"]
    fit = calibrate(load_bench([bench_files[2]])).fitted
    for key in ("attention_efficiency", "attention_fixed_keys", "attention_overhead_us", "attention_hbm_efficiency"):
        assert gpu[key] == pytest.approx(fit[f"gpu.{key}"], rel=1e-3)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(f"name: s\nclusters: [{{file: {out.name}, nodes: 1}}]\nmodel: {{num_layers: 1, "
                        "num_experts: 8, top_k: 2, d_model: 64, d_ff: 64}\nworkload: {synthetic: {tokens_per_gpu: 8}}"
                        "\nplacements: [contiguous]\n")
    spec = load_scenario(scenario).clusters[0].spec
    assert spec.gpu.attention_efficiency == gpu["attention_efficiency"]
    assert spec.gpu.attention_fixed_keys == gpu["attention_fixed_keys"]


@pytest.mark.parametrize("drop, field", [("phase", "phase"), ("median_ms", "median_ms")])
def test_malformed_attention_file_is_one_line_error(bench_files, tmp_path, capsys, drop, field):
    raw = json.loads(bench_files[2].read_text())
    i = next(i for i, r in enumerate(raw["records"]) if r["part"] == "core")
    del raw["records"][i][drop]
    bad = tmp_path / "bad_attention.json"
    bad.write_text(json.dumps(raw))
    out = tmp_path / "c.yaml"
    assert main(["calibrate", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and f"records[{i}].{field}: missing" in err
    assert not out.exists()


def test_stored_h100_attention_refits_through_calibrate():
    """benchmarks/validation/attention_h100 through moesim calibrate: every third point of each (shape, phase)
    held out, GPU kernel time, the H100 preset's HBM."""
    data = load_bench([H100_ATTENTION])
    assert len(data.attention) == 66 and {p.timing for p in data.attention} == {"gpu_kernel_ms"}
    result = calibrate(data, "dgx-h100")
    held = result.errors(True, ("attention",))
    assert held.size == 22 and result.errors(False, ("attention",)).size == 44
    assert np.median(held) < 0.05  # 3.9% when written; the fit is the dgx-h100 preset's (tests/test_attention.py)


def test_calibrate_picks_the_preset_of_the_measured_gpu(tmp_path, capsys):
    import yaml

    out = tmp_path / "h100.yaml"
    assert main(["calibrate", str(H100_ATTENTION), "-o", str(out)]) == 0
    assert "fitting the dgx-h100 preset's parameters (measured on NVIDIA H100 80GB HBM3)" in capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    assert doc["preset"] == "dgx-h100" and doc["gpu"]["name"] == "H100-SXM"
    assert main(["calibrate", str(H100_ATTENTION), "--preset", "hgx-h200", "-o", str(out)]) == 0
    assert "note: measured on NVIDIA H100 80GB HBM3, which the dgx-h100 preset models" in capsys.readouterr().out
    assert yaml.safe_load(out.read_text())["preset"] == "hgx-h200"


def test_calibrate_without_a_known_gpu_says_which_preset_it_fits(bench_files, tmp_path, capsys):
    assert main(["calibrate", str(bench_files[1]), "-o", str(tmp_path / "c.yaml")]) == 0
    assert "fitting the hgx-h200 preset's parameters: no single preset matches the devices measured (cpu)" \
        in capsys.readouterr().out


SCENARIO_FOR_BENCH = """name: mine
clusters: [{{preset: hgx-h200}}]
model: {{name: my-moe, num_layers: 2, num_experts: 8, top_k: 2, d_model: 512, d_ff: 768{heads}}}
workload: {{synthetic: {{tokens_per_gpu: 16}}}}
placements: [contiguous]
"""


def test_bench_measures_the_scenario_models_shape(tmp_path):
    """--scenario: the expert FFN and the attention of the user's model, not the built-in list (scaled 16x down
    on the CPU, as the built-in shapes are); tp values that do not divide the heads are left out."""
    path = tmp_path / "mine.yaml"
    path.write_text(SCENARIO_FOR_BENCH.format(heads=", num_heads: 6, num_kv_heads: 2, head_dim: 64"))
    assert main(["bench", "ffn", "--cpu", "--scenario", str(path), "-o", str(tmp_path / "b")]) == 0
    raw = json.loads((tmp_path / "b" / "expert_ffn.json").read_text())
    assert raw["single"] == {"my-moe": {"d_model": 32, "d_ff": 48, "rows": raw["single"]["my-moe"]["rows"]}}
    assert main(["bench", "attention", "--cpu", "--scenario", str(path), "-o", str(tmp_path / "b")]) == 0
    raw = json.loads((tmp_path / "b" / "attention.json").read_text())
    assert raw["shapes"] == {"my-moe": {"d_model": 32, "n_heads": 6, "n_kv_heads": 2, "head_dim": 16}}
    assert {r["tp"] for r in raw["records"]} == {1, 2}  # 6 query and 2 KV heads do not split over 4 GPUs
    assert load_bench([tmp_path / "b" / "attention.json"]).attention


def test_bench_scenario_errors(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(SCENARIO_FOR_BENCH.format(heads=""))
    assert main(["bench", "attention", "--cpu", "--scenario", str(path), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.num_heads" in err and str(path) in err
    assert main(["bench", "a2a", "--cpu", "--scenario", str(path), "-o", str(tmp_path / "b")]) == 2
    assert "--scenario" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
