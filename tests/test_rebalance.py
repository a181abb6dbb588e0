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
from moesim.report.rebalance import sweep_break_even, sweep_verdict, verdict
from moesim.sim.engine import Simulation
from moesim.study.config import parse_scenario
from moesim.study.rebalance import (
    batch_loads, break_even, held_mask, migration_bytes, relabel_for_overlap, transfer_time,
)
from moesim.study.config import load_scenario
from moesim.study.runner import run_study
from moesim.study.workload import chain_traces, load_workload_trace
from moesim.traces.format import Trace, save_trace
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
        assert m.switched_at is None or m.switched_at > m.batch  # a batch ran, slowed, while weights moved
        assert r.slow_ms[m.batch] == pytest.approx(r.batch_ms["rebalanced"][m.batch] / 3)  # ms * 0.5 / 1.5
    assert r.summary()["migration_cost_ms"] == pytest.approx(r.slow_ms.sum())


def _overlap_with_transfer(monkeypatch, seconds):
    """The overlap study with every migration taking ``seconds(static batch ms)`` on the fabric."""
    import moesim.study.rebalance as rb

    sc = parse_scenario({**SCENARIO, "workload": {"synthetic": {**SCENARIO["workload"]["synthetic"], "batches": 9}},
                         "rebalance": {**SCENARIO["rebalance"], "migration": "overlap", "overlap_slowdown": 0.5}},
                        "rb.yaml")
    static = run_study(sc.model_copy(update={"rebalance": None}), progress=False)
    ms = (static.runs[1].records.batch_end - static.runs[1].records.batch_start) * 1e3
    monkeypatch.setattr(rb, "transfer_time", lambda topo, sim, nbytes: seconds(ms) if nbytes.sum() else 0.0)
    (r,) = run_study(sc, progress=False).rebalance
    return r, ms


def test_overlap_switches_before_the_next_replan_when_the_weights_arrived(monkeypatch):
    # longer than one slowed batch, shorter than two: batches 2 and 3 run slowed, the plan switches at 4 - the
    # next re-plan point - and that re-plan then goes ahead (it used to replace the arrived plan, forever)
    r, ms = _overlap_with_transfer(monkeypatch, lambda ms: 1.4 * (ms[2] + ms[3]) / 1e3)
    first = r.migrations[0]
    assert first.batch == 2 and first.switched_at == 4
    assert r.plan_version[:4].tolist() == [0, 0, 0, 0] and r.plan_version[4] == 1
    assert [m.batch for m in r.migrations] == [2, 4, 6, 8] and r.skipped == []
    assert (r.slow_ms[[2, 3]] > 0).all()


def test_overlap_skips_replans_while_a_migration_is_in_flight(monkeypatch):
    r, _ = _overlap_with_transfer(monkeypatch, lambda ms: 3.2 * ms.max() / 1e3)  # about two intervals
    assert r.migrations[0].batch == 2 and r.skipped and r.skipped[0] == 4
    assert r.migrations[0].switched_at is not None and r.migrations[0].switched_at > 4
    s = r.summary()
    assert s["skipped_rebalances"] == len(r.skipped) and s["rebalances"] == len(r.migrations)
    text = verdict(r)
    assert "skipped because the previous migration was still in flight" in text
    assert " ms each in slowed batches (the transfers took " in text
    never, _ = _overlap_with_transfer(monkeypatch, lambda ms: 1e3)  # a transfer longer than the run
    assert [m.switched_at for m in never.migrations] == [None] and never.skipped == [4, 6, 8]
    assert (never.plan_version == 0).all() and (never.slow_ms[2:] > 0).all()


def _result(static, rebalanced, stall=None, slow=None, migrate_at=(2,), every=2):
    from moesim.study.config import RebalanceConfig
    from moesim.study.rebalance import Migration, RebalanceResult

    B = len(static)
    cfg = RebalanceConfig(policy="p", every_batches=every, window_batches=every)
    return RebalanceResult(cluster="c", placement="p", config=cfg,
                           batch_ms={"static": np.array(static, float), "rebalanced": np.array(rebalanced, float)},
                           imbalance={"static": np.zeros(B), "rebalanced": np.zeros(B)},
                           stall_ms=np.array(stall if stall is not None else [0.0] * B, float),
                           slow_ms=np.array(slow if slow is not None else [0.0] * B, float),
                           plan_version=np.zeros(B, dtype=np.int64),
                           migrations=[Migration(batch=b, copies_moved=1, bytes_moved=1.0, transfer_s=0.001,
                                                 switched_at=b) for b in migrate_at])


def test_break_even_uses_the_batches_a_replan_could_serve():
    # 4 batches, one rebalance before batch 2 costing 1 ms, saving 2 ms in each of the 2 batches after it
    r = _result([10, 10, 10, 10], [10, 10, 8, 8], stall=[0, 0, 1, 0])
    s = r.summary()
    assert s["saving_per_batch_ms"] == pytest.approx(2.0)  # not 4 ms / 4 batches
    assert s["break_even_every_batches"] == pytest.approx(0.5)
    assert s["net_gain"] == pytest.approx(3 / 40) and s["gross_gain"] == pytest.approx(4 / 40)
    assert "it would pay even every batch" in verdict(r)


def test_identical_plans_have_no_break_even_despite_rounding():
    # overlapped batches slowed by 10% and the slowdown taken off again: only float noise is left
    static = [5.428683, 5.452289, 5.697444, 5.49615]
    slowed = [v * 1.1 for v in static]
    r = _result(static, slowed, slow=[v * 0.1 for v in static])
    s = r.summary()
    assert s["gross_gain"] == 0.0 and s["break_even_every_batches"] is None
    text = verdict(r)
    assert "cannot pay at any interval" in text and "e+" not in text and "Before migration cost: +0.0%" in text


def test_verdict_when_rebalancing_loses_names_the_interval_it_would_need():
    r = _result([10] * 6, [10, 10, 9, 9, 9, 9], stall=[0, 0, 5, 0, 0, 0])  # 1 ms saved per batch, 5 ms paid once
    text = verdict(r)
    assert " costs 1.7% net vs planning once; it would pay only at intervals above about 5.0 batches (" in text
    assert "1 rebalance moved 0.0 GB (1 expert copy), 5.00 ms each" in text
    r = _result([10] * 6, [10, 10, 9.5, 9.5, 9.5, 9.5], stall=[0, 0, 5, 0, 0, 0])
    assert ("above about 10.0 batches, longer than this 6-batch run (break-even: 5.00 ms per rebalance over 0.50 ms"
            in verdict(r))


def test_full_replan_moves_more_than_incremental(stall_result):
    sc = parse_scenario({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], "incremental": False}}, "rb.yaml")
    (full,) = run_study(sc, progress=False).rebalance
    (inc,) = stall_result.rebalance
    assert sum(m.copies_moved for m in full.migrations) >= sum(m.copies_moved for m in inc.migrations)


@pytest.mark.parametrize("change, field, message", [
    ({"window_batches": 6}, "rebalance.window_batches", "a window of 6 batches is longer than the run"),
    ({"window_batches": -1}, "rebalance.window_batches", "greater than or equal to 1"),
    ({"every_batches": -4}, "rebalance.every_batches", "greater than or equal to 1"),
    ({"overlap_slowdown": 0.3}, "rebalance.overlap_slowdown", "applies only with migration: overlap"),
    ({"migration": "overlap", "overlap_slowdown": 10}, "rebalance.overlap_slowdown", "fraction of batch time"),
    ({"migration": "overlap", "overlap_slowdown": -0.1}, "rebalance.overlap_slowdown", "fraction of batch time"),
    ({"every_ms": 100}, "rebalance.every_ms", "unknown key"),
])
def test_bad_rebalance_sections_are_one_line_errors(tmp_path, capsys, change, field, message):
    path = tmp_path / "rb.yaml"
    path.write_text(yaml.safe_dump({**SCENARIO, "rebalance": {**SCENARIO["rebalance"], **change}}))
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"rb.yaml: {field}: " in err and message in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["rb.yaml"]


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


def _line_points_px(fig):
    """(axes, line, its points in display pixels) of every data line of the figure, drawn."""
    fig.canvas.draw()
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):  # the series, not the rebalance marks
                yield ax, line, ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))


def test_series_plot_shows_every_batch_whole(stall_result):
    """Batch 0 and the last batch, and every point of every series, lie inside the axes with room for their
    markers: no axis limit is pinned onto a point (a stall bar's base once pinned the lowest one)."""
    from moesim.report.rebalance import series_figure

    (r,) = stall_result.rebalance
    fig = series_figure([r], "t")
    seen = 0
    for ax, line, px in _line_points_px(fig):
        room = line.get_markersize() * fig.dpi / 72 / 2  # the marker's radius in pixels
        box = ax.bbox
        assert (px[:, 0] - room > box.x0).all() and (px[:, 0] + room < box.x1).all(), line.get_label()
        assert (px[:, 1] - room > box.y0).all() and (px[:, 1] + room < box.y1).all(), line.get_label()
        assert line.get_xdata()[0] == 0 and line.get_xdata()[-1] == r.num_batches - 1
        seen += 1
    assert seen == 6  # three series in each panel


def test_series_plot_shows_coinciding_series(stall_result):
    """Identical static, rebalanced and baseline series (as before the first rebalance) are each seen: their
    colours are on screen, not hidden under the series drawn last."""
    from dataclasses import replace

    from matplotlib.colors import to_rgb

    from moesim.report.rebalance import SERIES_STYLES, series_figure

    (r,) = stall_result.rebalance
    same_ms, same_imb = r.batch_ms["static"], r.imbalance["static"]
    zero = np.zeros(r.num_batches)
    r = replace(r, batch_ms={k: same_ms.copy() for k in r.batch_ms},
                imbalance={k: same_imb.copy() for k in r.imbalance}, stall_ms=zero, slow_ms=zero, migrations=[])
    assert set(r.batch_ms) == set(SERIES_STYLES)
    fig = series_figure([r], "t")
    for ax in fig.axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()  # its samples would show every colour anyway
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    height = rgb.shape[0]
    for ax in fig.axes:
        x0, y0, x1, y1 = (int(v) for v in ax.bbox.extents)
        inside = rgb[height - y1 + 3:height - y0 - 3, x0 + 3:x1 - 3]  # rows run from the top; spines left out
        for key, style in SERIES_STYLES.items():
            near = np.linalg.norm(inside - np.array(to_rgb(style["color"])) * 255, axis=-1) < 40
            assert near.sum() >= 40, (ax.get_ylabel(), key, int(near.sum()))


# ---------------------------------------------------------------- sweep

def test_sweep_verdict_finds_the_break_even_interval():
    rows = [{"cluster": "c", "redundant_experts": 8, "every_batches": n, "static_ms": 100.0,
             "rebalanced_ms": 100.0 - g, "net_gain_pct": g} for n, g in ((1, -5.0), (2, -1.0), (4, 3.0), (8, 2.0))]
    lines = sweep_verdict(rows, {"c": 120.0})
    assert lines[0].startswith("c: rebalancing every 4 batches with 8 redundant experts is best: it saves 3.0% net")
    # net -1% at every 2, +3% at every 4: crosses zero a quarter of the way, at 2.5
    assert "below about 2.5 batches rebalancing costs more than it saves (net -1.0% at every 2, +3.0% at every 4" \
        in lines[1]
    (be,) = sweep_break_even(rows)
    assert be["every_batches"] == pytest.approx(2.5) and be["between"] == [2, 4] and be["below"] is None
    paying = [{**r, "net_gain_pct": abs(r["net_gain_pct"])} for r in rows]
    assert sweep_break_even(paying)[0]["below"] == 1 and sweep_break_even(paying)[0]["every_batches"] is None
    assert "break-even interval is below 1 batches" in sweep_verdict(paying)[1]
    bumpy = [{**r, "net_gain_pct": g} for r, g in zip(rows, (-5.0, 1.0, -1.0, -2.0))]
    assert sweep_break_even(bumpy)[0]["every_batches"] is None
    assert "saves only at every 2 batches" in sweep_verdict(bumpy)[1]
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
                                         (["--redundant", "4", "--every", "2", "--window", "6"], "--window"),
                                         (["--redundant", "4", "--every", "2", "--window", "0"], "--window"),
                                         (["--redundant", "x", "--every", "2"], "--redundant")])
def test_cli_sweep_bad_input_writes_nothing(tmp_path, capsys, args, field):
    path = tmp_path / "rb.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), *args, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moesim: error:") and field in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["rb.yaml"]


# ---------------------------------------------------------------- a sequence of real traces

def _captured(seed, hot, batches=3):
    """A 'captured' trace of ``batches`` batches on 4 GPUs whose popular experts are ``hot`` (a relabelling)."""
    tr = generate_trace(num_layers=2, num_experts=8, top_k=2, num_gpus=4, tokens_per_gpu=64, batches=batches,
                        params=SyntheticParams(zipf_alpha=1.5), rng=np.random.default_rng(seed),
                        structure_rng=np.random.default_rng(0))
    relabel = np.asarray(hot)[tr.experts]
    return Trace(experts=relabel.astype(tr.experts.dtype), meta=tr.meta, home=tr.home, batch=tr.batch)


TRACE_SCENARIO = {**SCENARIO, "workload": {"trace": {"files": ["morning.npz", "evening.npz"], "profile_batches": 2}},
                  "rebalance": {"policy": "eplb4", "every_batches": 4, "window_batches": 1}}


def test_a_sequence_of_traces_is_replayed_in_order_and_rebalancing_follows_it(tmp_path):
    # two captures whose hot experts differ: planned once on the morning, the evening is served badly
    morning, evening = _captured(1, np.arange(8)), _captured(2, np.arange(8)[::-1], batches=4)
    save_trace(morning, tmp_path / "morning.npz")
    save_trace(evening, tmp_path / "evening.npz")
    (tmp_path / "sc.yaml").write_text(yaml.safe_dump(TRACE_SCENARIO))
    sc = load_scenario(tmp_path / "sc.yaml")
    trace = load_workload_trace(sc)
    np.testing.assert_array_equal(trace.experts, np.concatenate([morning.experts, evening.experts]))
    np.testing.assert_array_equal(trace.batch, np.concatenate([morning.batch, evening.batch + 3]))
    result = run_study(sc, progress=False)
    assert result.workloads["c"]["batches"] == 7
    (r,) = result.rebalance
    # the re-plan before batch 4 sees batch 3, the evening's first
    assert [m.batch for m in r.migrations] == [4] and r.plan_version.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert (r.imbalance["rebalanced"][4:] < r.imbalance["static"][4:] / 2).all()


def test_chained_traces_without_batches_are_one_batch_each_or_cut_at_replay():
    a, b = _captured(1, np.arange(8)), _captured(2, np.arange(8))
    bare = [Trace(experts=t.experts, meta=t.meta) for t in (a, b)]
    each = chain_traces(bare, ["a", "b"], one_batch_each=True)
    assert each.batch.tolist() == [0] * a.num_tokens + [1] * b.num_tokens and each.home is None
    cut = chain_traces(bare, ["a", "b"], one_batch_each=False)
    assert cut.batch is None and cut.layout(4, 64).num_batches == 6  # consecutive blocks of 4 x 64 tokens
    with pytest.raises(InputError, match=r"^b: batch: has no batch array while other traces"):
        chain_traces([a, bare[1]], ["a", "b"], one_batch_each=True)


def test_trace_sequence_and_trace_rebalance_errors(tmp_path, capsys):
    save_trace(_captured(1, np.arange(8)), tmp_path / "morning.npz")
    path = tmp_path / "sc.yaml"
    path.write_text(yaml.safe_dump(TRACE_SCENARIO))  # evening.npz is missing
    with pytest.raises(InputError, match=r"workload.trace.files\[1\]: trace file not found: .*evening.npz"):
        load_scenario(path)
    save_trace(_captured(2, np.arange(8)), tmp_path / "evening.npz")
    trace = {"files": ["morning.npz", "evening.npz"]}
    path.write_text(yaml.safe_dump({**TRACE_SCENARIO, "workload": {"trace": trace}}))
    with pytest.raises(InputError, match=r"workload.trace.profile_batches: a rebalancing study needs the plan"):
        load_scenario(path)
    both = {**trace, "file": "morning.npz", "profile_batches": 2}
    path.write_text(yaml.safe_dump({**TRACE_SCENARIO, "workload": {"trace": both}}))
    with pytest.raises(InputError, match=r"workload.trace: give exactly one of 'file' or 'files'"):
        load_scenario(path)
    # the trace's batch count is known only once it is laid out: checked before anything is simulated
    path.write_text(yaml.safe_dump({**TRACE_SCENARIO, "rebalance": {**TRACE_SCENARIO["rebalance"],
                                                                    "every_batches": 6}}))
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("rebalance.every_batches: rebalancing every 6 batches needs more than 6 batches; the "
                        "workload has 6") and not out.exists()


# ---------------------------------------------------------------- relabelling a hierarchical plan

def test_relabel_keeps_a_hierarchical_plan_node_by_node():
    from moesim.placement.replication import placement_from_mask

    # old: ranks 0,1 on node 0, ranks 2,3 on node 1, holding experts {0,1}, {2,3}, {4,5}, {6,7}
    old_held = np.zeros((1, 8, 4), dtype=bool)
    for r in range(4):
        old_held[0, [2 * r, 2 * r + 1], r] = True
    old = placement_from_mask(old_held, "eplb")
    # new, node A = {0,1} + {4,5}, node B = {2,3} + {6,7}: rank by rank it could stay exactly in place, but
    # that would split node A over both old nodes
    new_held = old_held[:, :, [0, 2, 1, 3]]
    free = relabel_for_overlap(placement_from_mask(new_held, "eplb", {"mode": "global"}), old, 2)
    assert migration_bytes(old, free, tp=1, ranks_per_node=2, expert_bytes=1.0)[1] == 0
    hier = relabel_for_overlap(placement_from_mask(new_held, "eplb", {"mode": "hierarchical"}), old, 2)
    held = held_mask(hier)[0]
    for node_experts in ({0, 1, 4, 5}, {2, 3, 6, 7}):  # each planned node's experts land on one node
        ranks = {int(r) for e in node_experts for r in np.flatnonzero(held[e])}
        assert len({r // 2 for r in ranks}) == 1
    assert migration_bytes(old, hier, tp=1, ranks_per_node=2, expert_bytes=1.0)[1] == 4  # two ranks' pairs
