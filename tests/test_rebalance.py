"""Rebalancing over time: drift, window re-plans, incremental relabelling, migration bytes and time on the
fabric, the stall / overlap accounting, reports, verdicts and ``moesim sweep``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.hardware.presets import preset
from moesim.hardware.spec import ClusterSpec
from moesim.hardware.topology import build_topology
from moesim.placement import Placement
from moesim.report.files import write_outputs
from moesim.report.rebalance import sweep_verdict, verdict
from moesim.sim.engine import Simulation
from moesim.study.config import parse_scenario
from moesim.study.rebalance import (
    batch_loads, break_even, held_mask, migration_bytes, relabel_for_overlap, transfer_time,
)
from moesim.study.runner import run_study
from moesim.traces.model import ModelSpec
from moesim.traces.synthetic import SyntheticParams, drift_trace, generate_trace

SCENARIO = {
    "name": "rb",
    "clusters": [{"preset": "hgx-h200", "nodes": 2, "gpus_per_node": 2, "name": "c"}],
    "model": {"num_layers": 2, "num_experts": 8, "top_k": 2, "d_model": 256, "d_ff": 128},
    "workload": {"synthetic": {"tokens_per_gpu": 64, "batches": 6, "zipf_alpha": 1.2, "seed": 1,
                               "drift_swaps_per_batch": 2}},
    "placements": ["contiguous", {"policy": "eplb", "redundant_experts": 4, "name": "eplb4"}],
    "rebalance": {"policy": "eplb4", "every_batches": 2, "window_batches": 2},
    "engine": {"progress": False},
}


def _trace(batches=5, seed=0):
    return generate_trace(num_layers=2, num_experts=8, top_k=2, num_gpus=2, tokens_per_gpu=100, batches=batches,
                          params=SyntheticParams(zipf_alpha=1.0), rng=np.random.default_rng(seed))


# ---------------------------------------------------------------- drift

def test_drift_relabels_experts_per_batch_and_keeps_each_batch_statistics():
    tr = _trace()
    d = drift_trace(tr, swaps_per_batch=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(d.experts[tr.batch == 0], tr.experts[tr.batch == 0])  # batch 0 unchanged
    changed = 0
    for b in range(5):
        for l in range(2):
            a = np.bincount(tr.experts[tr.batch == b, l].ravel(), minlength=8)
            c = np.bincount(d.experts[d.batch == b, l].ravel(), minlength=8)
            assert sorted(a) == sorted(c)  # the same loads, on other experts
            changed += int((a != c).any())
    assert changed > 0
    assert (np.sort(d.experts, axis=2)[:, :, 1:] != np.sort(d.experts, axis=2)[:, :, :-1]).all()  # still distinct
    same = drift_trace(tr, swaps_per_batch=0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(same.experts, tr.experts)
    with pytest.raises(ValueError, match=">= 0"):
        drift_trace(tr, swaps_per_batch=-1, rng=np.random.default_rng(0))


def test_batch_loads_count_each_batch():
    tr = _trace(batches=3)
    loads = batch_loads(tr, tr.layout(2, 100))
    assert loads.shape == (3, 2, 8) and (loads.sum(axis=2) == 200 * 2).all()


# ---------------------------------------------------------------- plans and migrations

def test_relabel_recovers_a_permuted_plan_and_then_nothing_moves():
    rng = np.random.default_rng(0)
    held = np.zeros((2, 8, 4), dtype=bool)
    for l in range(2):
        held[l, np.arange(8), rng.permutation(np.arange(8) % 4)] = True
    held[:, 0, :] = True  # expert 0 everywhere
    from moesim.placement.replication import placement_from_mask
    old = placement_from_mask(held, "x")
    shuffled = placement_from_mask(held[:, :, [2, 0, 3, 1]], "x")
    again = relabel_for_overlap(shuffled, old)
    np.testing.assert_array_equal(held_mask(again), held)
    nbytes, moved = migration_bytes(old, again, tp=1, ranks_per_node=2, expert_bytes=1e6)
    assert moved == 0 and nbytes.sum() == 0
    _, moved_raw = migration_bytes(old, shuffled, tp=1, ranks_per_node=2, expert_bytes=1e6)
    assert moved_raw > 0


def test_migration_sources_prefer_the_same_node_and_split_over_tp_lanes():
    old = Placement.from_lists([[[0, 3], [1]]], 4)  # expert 0 on ranks 0 (node 0) and 3 (node 1)
    new = Placement.from_lists([[[0, 2], [1]]], 4)  # a copy now needed on rank 2 (node 1)
    nbytes, moved = migration_bytes(old, new, tp=1, ranks_per_node=2, expert_bytes=10.0)
    assert moved == 1 and nbytes[3, 2] == 10.0 and nbytes.sum() == 10.0
    nbytes, _ = migration_bytes(old, new, tp=2, ranks_per_node=2, expert_bytes=10.0)
    assert nbytes[6, 4] == 5.0 and nbytes[7, 5] == 5.0 and nbytes.sum() == 10.0  # lane to lane halves


def test_transfer_time_is_the_closed_form_for_one_nvlink_copy():
    spec = ClusterSpec(**{**preset("hgx-h200"), "nodes": 1, "gpus_per_node": 2, "name": "t"})
    topo = build_topology(spec)
    sim = Simulation(topo, ModelSpec(num_layers=1, num_experts=2, top_k=1, d_model=8, d_ff=8))
    nbytes = np.array([[0.0, 1e9], [0.0, 0.0]])
    expected = spec.a2a_launch_us * 1e-6 + 1e9 / spec.nvlink.bytes_per_s + topo.path_latency[0, 1]
    assert transfer_time(topo, sim, nbytes) == pytest.approx(expected, rel=0.02)
    assert transfer_time(topo, sim, np.zeros((2, 2))) == 0.0
    assert transfer_time(topo, sim, 2 * nbytes) > transfer_time(topo, sim, nbytes)


def test_break_even():
    assert break_even(10.0, 2.0) == 5.0
    assert break_even(10.0, 0.0) is None and break_even(10.0, -1.0) is None


# ---------------------------------------------------------------- the study

@pytest.fixture(scope="module")
def stall_result():
    return run_study(parse_scenario(SCENARIO, "rb.yaml"), progress=False)


def test_rebalancing_series_and_accounting(stall_result):
    (r,) = stall_result.rebalance
    assert r.num_batches == 6 and [m.batch for m in r.migrations] == [2, 4]
    assert r.plan_version.tolist() == [0, 0, 1, 1, 2, 2]
    # before the first rebalance the rebalanced series is the static one
    np.testing.assert_array_equal(r.batch_ms["rebalanced"][:2], r.batch_ms["static"][:2])
    # the static and baseline series are the whole-trace runs' batches
    runs = {run.name: run for run in stall_result.runs}
    np.testing.assert_allclose(r.batch_ms["static"], (runs["eplb4"].records.batch_end
                                                      - runs["eplb4"].records.batch_start) * 1e3)
    np.testing.assert_allclose(r.batch_ms["baseline"], (runs["contiguous"].records.batch_end
                                                        - runs["contiguous"].records.batch_start) * 1e3)
    s = r.summary()
    assert s["total_ms"]["rebalanced_with_migration"] == pytest.approx(s["total_ms"]["rebalanced"] + r.stall_ms.sum())
    assert (r.stall_ms[[2, 4]] > 0).all() and r.stall_ms[[0, 1, 3, 5]].sum() == 0
    assert s["migration_cost_ms"] == pytest.approx(sum(m.transfer_s for m in r.migrations) * 1e3)
    static = s["total_ms"]["static"]
    assert s["net_gain"] == pytest.approx((static - s["total_ms"]["rebalanced_with_migration"]) / static)
    text = verdict(r, {"redundant_experts": 4})
    assert text.startswith("c: rebalancing eplb4 with 4 redundant experts every 2 batches")
    assert (" saves " in text.split(";")[0]) == (s["net_gain"] > 0)


def test_overlap_mode_serves_the_old_plan_until_the_weights_arrive():
    sc = parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "migration": "overlap",
                                                   "overlap_slowdown": 0.5}}, "rb.yaml")
    (r,) = run_study(sc, progress=False).rebalance
    assert r.stall_ms.sum() == 0
    for m in r.migrations:
        assert m.switched_at > m.batch  # a batch ran, slowed, while the transfer was in flight
        assert r.slow_ms[m.batch] == pytest.approx(r.batch_ms["rebalanced"][m.batch] / 3)  # ms * 0.5 / 1.5
    assert r.summary()["migration_cost_ms"] == pytest.approx(r.slow_ms.sum())


def test_full_replan_moves_more_than_incremental(stall_result):
    sc = parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "incremental": False}}, "rb.yaml")
    (full,) = run_study(sc, progress=False).rebalance
    (inc,) = stall_result.rebalance
    assert sum(m.copies_moved for m in full.migrations) >= sum(m.copies_moved for m in inc.migrations)


def test_rebalance_config_errors():
    with pytest.raises(InputError, match=r"rb.yaml: rebalance.policy: 'nope' is not a placement made by a policy"):
        parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "policy": "nope"}}, "rb.yaml")
    with pytest.raises(InputError, match=r"rebalance.every_batches: .* needs more than 6 batches"):
        parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "every_batches": 6}}, "rb.yaml")
    with pytest.raises(InputError, match=r"rebalance.window_batches"):
        parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "window_batches": 0}}, "rb.yaml")
    with pytest.raises(InputError, match=r"rebalance.often: unknown key"):
        parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "often": 1}}, "rb.yaml")
    with pytest.raises(InputError, match=r"workload.synthetic.drift_swaps_per_batch"):
        parse_scenario({**SCENARIO, "workload": {"synthetic": {"tokens_per_gpu": 8, "drift_swaps_per_batch": -1}}},
                       "rb.yaml")


def test_outputs_include_the_series(stall_result, tmp_path):
    written = write_outputs(stall_result, tmp_path / "out")
    names = {p.name for p in written}
    assert {"rebalance.csv", "rebalance.png", "results.json"} <= names
    rows = list(csv.DictReader(open(tmp_path / "out" / "rebalance.csv")))
    assert len(rows) == 6 and [int(r["rebalance"]) for r in rows] == [0, 0, 1, 0, 1, 0]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    (entry,) = doc["rebalance"]
    assert entry["every_batches"] == 2 and len(entry["migrations"]) == 2 and "verdict" in entry


# ---------------------------------------------------------------- sweep

def test_sweep_verdict_finds_the_break_even_interval():
    rows = [{"cluster": "c", "redundant_experts": 8, "every_batches": n, "static_ms": 100.0,
             "rebalanced_ms": 100.0 - g, "net_gain_pct": g} for n, g in ((1, -5.0), (2, -1.0), (4, 3.0), (8, 2.0))]
    lines = sweep_verdict(rows, {"c": 120.0})
    assert lines[0].startswith("c: rebalancing every 4 batches with 8 redundant experts is best: it saves 3.0% net")
    assert "below 4 batches it costs more than it saves" in lines[1]
    never = [{**r, "rebalanced_ms": 110.0, "net_gain_pct": -10.0} for r in rows]
    assert "rebalancing never pays" in sweep_verdict(never)[0]
    assert "costs more than it saves at every swept interval" in sweep_verdict(never)[1]


def test_cli_sweep_writes_the_tradeoff(tmp_path, capsys):
    path = tmp_path / "rb.yaml"
    path.write_text(yaml.safe_dump({**SCENARIO, "workload": {"synthetic": {**SCENARIO["workload"]["synthetic"],
                                                                           "batches": 4}}}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--redundant", "0,4", "--every", "1,2", "-o", str(out), "-q"]) == 0
    assert {p.name for p in out.iterdir()} == {"sweep.csv", "sweep.json", "tradeoff.png"}
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 4 and {r["redundant_experts"] for r in rows} == {"0", "4"}
    assert "Verdict:" in capsys.readouterr().out


@pytest.mark.parametrize("args, field", [(["--redundant", "3", "--every", "2"], "--redundant"),
                                         (["--redundant", "4", "--every", "9"], "--every"),
                                         (["--redundant", "x", "--every", "2"], "--redundant")])
def test_cli_sweep_bad_input_writes_nothing(tmp_path, capsys, args, field):
    path = tmp_path / "rb.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), *args, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim: error:") and field in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["rb.yaml"]
