"""moesim bench train (forward/backward expert GEMMs, all-gather and reduce-scatter) and what moesim calibrate
fits from it: the experts' GEMMs' backward / forward ratio beside the benchmark's autograd harness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.calibration.train import (CollectivePoint, TrainGemmPoint, check_train, collective_ms, fit_backward,
                                      held_out, train_points)
from moesim.cli import main
from moesim.errors import InputError
from moesim.hardware import ClusterSpec, preset
from moesim.study.train_config import TrainingConfig
from moesim.study.training import train_options

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks" / "validation" / "train_h200" / "train_h200.json"


def _gemm(i: int, fwd: float, bwd: float, per: int = 64) -> TrainGemmPoint:
    return TrainGemmPoint(f"p{i}", "s", 4, per + i, 256, 128, fwd, bwd)


def test_the_fit_recovers_a_known_ratio_and_harness() -> None:
    """Backward = 2.4 x forward + 0.1 ms exactly: the grid fit finds both (to its step)."""
    rng = np.random.default_rng(3)
    fwd = rng.uniform(0.05, 5.0, 30)
    points = [_gemm(i, f, 2.4 * f + 0.1) for i, f in enumerate(fwd)]
    ratio, harness = fit_backward(points, held_out(points))
    assert ratio == pytest.approx(2.4, abs=0.011) and harness == pytest.approx(0.1, abs=0.003)


def test_every_third_point_of_a_shape_is_held_out_with_both_its_gemms() -> None:
    raw = json.loads(SHIPPED.read_text())
    points, colls = train_points(raw, "f")
    held = held_out(points)
    assert not colls and len(points) == 2 * len(raw["gemms"])
    assert held[0::2] == held[1::2]  # gate-up and down of one record together
    assert 0.25 < np.mean(held) < 0.4


@pytest.mark.parametrize(("path", "value", "field"), [
    (("gemms", 1, "bwd_down_ms"), -1.0, "gemms[1].bwd_down_ms"),
    (("gemms", 0, "local_experts"), 2.5, "gemms[0].local_experts"),
    (("collectives", 0, "op"), "all_reduce", "collectives[0].op"),
    (("collectives", 0, "ranks"), 1, "collectives[0].ranks"),
])
def test_a_malformed_file_is_one_line_naming_the_field(path, value, field) -> None:
    raw = json.loads(SHIPPED.read_text())
    raw["collectives"] = [{"op": "all_gather", "bytes_per_rank": 1024, "ranks": 2, "ms_median_max_over_ranks": 0.1}]
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(InputError) as err:
        check_train(raw, "t.json")
    assert err.value.field == field and "\n" not in str(err.value)


def test_a_large_two_gpu_all_gather_costs_its_bytes_over_nvlink() -> None:
    """1 GiB per rank between 2 GPUs of one node: each receives 1 GiB over NVLink at its efficiency (closed form,
    the launch aside)."""
    spec = ClusterSpec(**preset("hgx-h200"))
    b = float(2**30)
    ms = collective_ms(CollectivePoint("all_gather", b, 2, 1.0), spec)
    closed = b / (spec.nvlink.GBps * 1e9 * spec.nvlink.efficiency) * 1e3
    assert ms == pytest.approx(closed, rel=0.05)


def test_training_takes_the_gpus_fitted_ratio_unless_the_scenario_gives_one() -> None:
    import yaml

    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    shipped = yaml.safe_load((ROOT / "moesim/hardware/calibrated/hgx-h200.yaml").read_text())["gpu"]
    assert gpu.gemm_backward == shipped["gemm_backward"]  # fitted on benchmarks/validation/train_h200
    assert ClusterSpec(**preset("dgx-a100")).gpu.gemm_backward == gpu.gemm_backward  # not measured: the H200's
    layouts = [{"name": "ep", "kind": "ep", "placement": "contiguous"}]
    assert train_options(TrainingConfig(layouts=layouts), 2.3).gemm_backward == 2.3
    assert train_options(TrainingConfig(layouts=layouts, gemm_backward=3.0), 2.3).gemm_backward == 3.0


def test_bench_train_on_the_cpu_then_calibrate(tmp_path, capsys) -> None:
    """The CPU dry run writes a valid file (GEMMs on one rank, both collectives among two), and moesim calibrate
    fits a backward ratio from it."""
    pytest.importorskip("torch")
    assert main(["bench", "train", "--cpu", "--nproc", "2", "-o", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "train.json").read_text())
    check_train(raw, "train.json")
    assert raw["format"] == "moesim.bench.train/1" and raw["world_size"] == 2 and raw["gemms"]
    assert {c["op"] for c in raw["collectives"]} == {"all_gather", "reduce_scatter"}
    assert all(c["ranks"] == 2 for c in raw["collectives"])
    out = tmp_path / "cluster.yaml"
    assert main(["calibrate", str(tmp_path / "train.json"), "--preset", "hgx-h200", "-o", str(out), "-q"]) == 0
    assert "gemm_backward:" in out.read_text()
    assert "all-gather and reduce-scatter" in capsys.readouterr().out


def test_a_collective_among_gpus_a_clusters_nic_layout_would_not_split_is_still_timed() -> None:
    """The collectives run inside one node: a cluster whose NICs serve pairs of GPUs still times 3 ranks."""
    from moesim.hardware import deep_merge

    spec = ClusterSpec(**deep_merge(preset("dgx-h100"), {"network": {"nics_per_node": 2}}))
    assert collective_ms(CollectivePoint("all_gather", 2.0**20, 3, 1.0), spec) > 0
