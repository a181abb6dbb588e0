"""moesim bench on the CPU (gloo, tiny shapes): the files it writes are what moesim calibrate reads."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moesim.bench import a2a, ffn  # noqa: E402
from moesim.calibration import calibrate, load_bench  # noqa: E402
from moesim.cli import main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    a2a_path = a2a.run(out, 2, cpu=True, port=_free_port())
    ffn_path = ffn.run(out, cpu=True, shapes={"tiny": (64, 128), "small": (128, 256)})
    return a2a_path, ffn_path


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
    result = calibrate(data, iters=20)
    assert {p.kind for p in result.predictions} == {"a2a-uniform", "a2a-skew", "p2p", "ffn"}
    assert any(p.held_out for p in result.predictions) and any(not p.held_out for p in result.predictions)
    out = tmp_path / "cpu.yaml"
    assert main(["calibrate", *map(str, bench_files), "-o", str(out)]) == 0
    assert out.read_text().startswith("# moesim calibrate")
