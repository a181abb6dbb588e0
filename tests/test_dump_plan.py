"""``moesim plan``: load terms against closed forms, the out-of-sample split, the verdict, the written map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.placement.format import Placement
from moesim.study.dump_plan import (
    REBALANCE_S, DumpPlan, Candidate, current_map, imbalance, rank_loads, rebalance_interval, redundant_sweep,
    PlanOptions,
)
from moesim.traces.count_trace import CountTrace, save_counts
from moesim.traces.format import Trace, TraceMeta, save_trace


def test_rank_loads_split_replicas_evenly():
    # 1 layer, 3 experts on 2 ranks: expert 0 on both ranks, 1 on rank 0, 2 on rank 1
    p = Placement.from_lists([[[0, 1], [0], [1]]], 2)
    loads = np.array([[[10, 4, 2]]])
    assert rank_loads(loads, p).tolist() == [[[9.0, 7.0]]]
    assert imbalance(loads, p) == pytest.approx(9 / 8)


def test_the_engine_default_map_is_p_mod_e():
    p, r = current_map(PlanOptions(), 2, 6, 4)  # 6 experts on 4 ranks: 2 redundant fill 8 slots
    assert r == 2
    # slots [0..7] % 6 = 0 1 | 2 3 | 4 5 | 0 1: experts 0 and 1 on ranks 0 and 3
    assert sorted(int(g) for g in p.gpus[0, 0] if g >= 0) == [0, 3]
    assert [sorted(int(g) for g in reps if g >= 0) for reps in p.gpus[1, 2:]] == [[1], [1], [2], [2]]
    with pytest.raises(InputError, match="multiple of the 4 EP ranks"):
        current_map(PlanOptions(current_redundant=1), 2, 6, 4)
    assert redundant_sweep(6, 4, None) == [2, 6, 10, 18]
    with pytest.raises(InputError, match="--redundant"):
        redundant_sweep(6, 4, (3,))


def _plan(stale: list[float]) -> DumpPlan:
    c = Candidate("current", Placement.from_lists([[[0]]], 1), 0, 1.0, 1.0, 100.0)
    return DumpPlan([c], "", True, None, stale, window_tokens=1e6, batch_tokens=1000)


def test_rebalance_only_when_staleness_costs_more_than_moving_the_weights():
    # a group is 1000 batches of 0.1 s = 100 s; a map 1 group older loses 10% of it = 10 s > 1.8 s
    every, _ = rebalance_interval(_plan([1.0, 1.1, 1.2, 1.3]), 1.0, 0.1)
    assert every == 1
    # 0.1% per group: 0.1 s, 0.2 s, ... lost against 1.8 s per rebalance: static wins over 4 groups
    every, why = rebalance_interval(_plan([1.0, 1.001, 1.002, 1.003]), 1.0, 0.1)
    assert every is None and f"{REBALANCE_S} s" in why
    assert rebalance_interval(_plan([1.0]), 1.0, 0.1)[0] is None


def _count_dump(windows: int = 6, seed: int = 0) -> CountTrace:
    """4 MoE layers x 16 experts, top-2, 512 tokens per window; experts 0-3 hot (as the tiny scenario's model)."""
    rng = np.random.default_rng(seed)
    p = np.ones(16)
    p[:4] = 6.0
    p /= p.sum()
    loads = rng.multinomial(1024, p, size=(windows, 4)).astype(np.int64)
    meta = TraceMeta(num_experts=16, num_layers=4, top_k=2, model="tiny", source="test counts")
    return CountTrace(loads=loads, meta=meta, window_tokens=np.full(windows, 512, dtype=np.int64))


def _plan_cli(dump, scenario, out, *extra) -> list[str]:
    return ["plan", str(dump), "--cluster", "hgx-h200", "--model", str(scenario), "--engine", "sglang", "-o",
            str(out), "-q", "--tokens-per-gpu", "32", "--ilp-time-limit", "1", *extra]


def test_plan_a_count_dump_out_of_sample(tiny_scenario_file, tmp_path, capsys):
    save_counts(tmp_path / "c.npz", _count_dump())
    out = tmp_path / "plan"
    assert main(_plan_cli(tmp_path / "c.npz", tiny_scenario_file, out)) == 0
    text = capsys.readouterr().out
    assert "scored on windows 3-5" in text and "out of sample" in text and "synthetic expansion of counts" in text
    plan = json.loads((out / "plan.json").read_text())
    by = {c["name"]: c for c in plan["candidates"]}
    assert set(by) >= {"current", "eplb+0", "eplb+8", "greedy", "ilp"}
    assert by["eplb+8"]["imbalance_out"] < by["current"]["imbalance_out"]  # 4 hot experts on rank 0-1 by default
    winner = plan["verdict"]["winner"]
    m = json.loads((out / "expert_location.json").read_text())["physical_to_logical_map"]
    assert len(m) == 4 and all(sorted(set(row)) == list(range(16)) for row in m)
    assert len(m[0]) == 16 + by[winner]["redundant"]
    assert (out / "placements" / "current.json").is_file() and (out / "report.txt").read_text().startswith("moesim")


def test_plan_a_per_token_dump_uses_its_batches(tiny_scenario_file, tmp_path, capsys):
    rng = np.random.default_rng(1)
    T = 4 * 256
    experts = np.stack([np.stack([rng.choice(16, 2, replace=False, p=np.r_[[0.2] * 2, [0.6 / 14] * 14])
                                  for _ in range(4)]) for _ in range(T)]).astype(np.int32)
    trace = Trace(experts=experts, meta=TraceMeta(num_experts=16, num_layers=4, top_k=2),
                  batch=np.repeat(np.arange(4), 256).astype(np.int32))
    save_trace(trace, tmp_path / "t.npz")
    assert main(_plan_cli(tmp_path / "t.npz", tiny_scenario_file, tmp_path / "p", "--engine", "trtllm",
                          "--policies", "eplb,greedy")) == 0
    assert "scored on windows 2-3" in capsys.readouterr().out
    cfg = yaml.safe_load((tmp_path / "p" / "moe_load_balancer.yaml").read_text())
    assert list(cfg["initial_global_assignments"]) == [0, 1, 2, 3] and cfg["layer_updates_per_iter"] == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["synthetic_simulation"] is None and plan["out_of_sample"] is True


def test_plan_refuses_bad_input_and_writes_nothing(tiny_scenario_file, tmp_path, capsys):
    ct = _count_dump()
    wrong = CountTrace(loads=np.zeros((2, 4, 8), dtype=np.int64),
                       meta=TraceMeta(num_experts=8, num_layers=4, top_k=2))
    save_counts(tmp_path / "w.npz", wrong)
    out = tmp_path / "plan"
    assert main(_plan_cli(tmp_path / "w.npz", tiny_scenario_file, out)) == 2
    assert "num_experts=8" in capsys.readouterr().err and not out.exists()
    save_counts(tmp_path / "c.npz", ct)
    assert main(_plan_cli(tmp_path / "c.npz", tiny_scenario_file, out, "--redundant", "3")) == 2
    assert main(_plan_cli(tmp_path / "c.npz", tiny_scenario_file, out, "--policies", "magic")) == 2
    assert not out.exists()
    one = CountTrace(loads=ct.loads[:1], meta=ct.meta)
    save_counts(tmp_path / "one.npz", one)
    assert main(_plan_cli(tmp_path / "one.npz", tiny_scenario_file, out, "--policies", "eplb")) == 0
    assert "IN SAMPLE" in capsys.readouterr().out


def test_plan_against_the_users_current_engine_map(tiny_scenario_file, tmp_path, capsys):
    save_counts(tmp_path / "c.npz", _count_dump())
    # the user's map: TensorRT-LLM YAML that puts the 4 hot experts on 4 different GPUs (8 ranks x 2 slots)
    rows = [[0, 4, 1, 5, 2, 6, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15]] * 4
    lines = ["num_slots: 16", "layer_updates_per_iter: 0", "initial_global_assignments:"]
    (tmp_path / "cur.yaml").write_text("\n".join(lines + [f"  {l}: {r}" for l, r in enumerate(rows)]) + "\n")
    assert main(_plan_cli(tmp_path / "c.npz", tiny_scenario_file, tmp_path / "p", "--current",
                          str(tmp_path / "cur.yaml"), "--policies", "eplb")) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    cur = next(c for c in plan["candidates"] if c["name"] == "current")
    # a hot (6) and a cold (1) expert per rank: 7 over a mean of 36 / 8 = 4.5, i.e. 1.56 before sampling noise;
    # the default map puts two hot experts on each of ranks 0 and 1: 12 / 4.5 = 2.67
    assert 1.5 < cur["imbalance_out"] < 2.0
    (tmp_path / "bad.yaml").write_text("num_slots: 16\ninitial_global_assignments: {0: [1]}\n")
    assert main(_plan_cli(tmp_path / "c.npz", tiny_scenario_file, tmp_path / "q", "--current",
                          str(tmp_path / "bad.yaml"))) == 2
    assert "--current" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_plan_an_engine_dump_checks_it_against_the_model(tmp_path, capsys):
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "notebooks" / "data"
    dump, model = data / "tiny-deepseek-trtllm", data / "tiny-deepseek.yaml"
    base = ["plan", str(dump), "--cluster", "hgx-h200", "--set", "gpus_per_node=4", "--engine", "vllm", "-q",
            "--tokens-per-gpu", "32", "--policies", "eplb"]
    assert main([*base, "--model", "deepseek-v3", "-o", str(tmp_path / "a")]) == 2
    assert "the model deepseek-v3 (--model) has 256" in capsys.readouterr().err
    shifted = yaml.safe_load(model.read_text())
    shifted["model"].update(first_dense_layers=0, dense_d_ff=None)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(shifted))  # MoE layers 0-2, the dump says 1-3
    assert main([*base, "--model", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "b")]) == 2
    assert "decoder layers [1, 2, 3]" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main([*base, "--model", str(model), "-o", str(tmp_path / "c")]) == 0
    rec = json.loads((tmp_path / "c" / "eplb_initial_mapping.jsonl").read_text())
    assert list(rec["initial_global_assignments"]) == ["0", "1", "2"]
