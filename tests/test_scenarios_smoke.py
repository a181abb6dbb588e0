"""Every shipped scenario runs end to end, shrunk to a few layers and tokens (the full runs are for people)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.study import Scenario, load_scenario, run_study

SCENARIO_FILES = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))


def _batches(scenario: Scenario) -> int:
    """One batch, or just enough for one rebalance when the scenario rebalances over time."""
    return 1 if scenario.rebalance is None else scenario.rebalance.every_batches + 1


def shrink(scenario: Scenario) -> Scenario:
    """32 tokens per GPU, one batch, at most 3 MoE layers; everything else as shipped."""
    update = {"model": scenario.model.model_copy(update={"num_layers": min(scenario.model.num_layers, 3)}),
              "engine": scenario.engine.model_copy(update={"progress": False})}
    syn = scenario.workload.synthetic
    if syn is not None:
        small = syn.model_copy(update={"tokens_per_gpu": 32, "batches": _batches(scenario), "profile_batches": 1})
        update["workload"] = scenario.workload.model_copy(update={"synthetic": small})
    return scenario.model_copy(update=update)


def _training_smoke(scenario: Scenario) -> None:
    from moesim.study.training import run_training

    result = run_training(scenario)
    assert len(result.runs) == len(scenario.clusters) * len(scenario.training.layouts)
    for run in result.summary()["runs"]:
        assert np.isfinite(run["step_ms"]["step"]) and run["step_ms"]["step"] > 0, run["layout"]
        assert run["tokens_per_s"] > 0 and run["memory_GB"]["total"] > 0
        if run["layout"] == scenario.training.baseline_name:
            assert run["speedup_vs_baseline"] == 1.0


def test_there_are_scenarios():
    assert SCENARIO_FILES


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: p.stem)
def test_scenario_smoke(path):
    scenario = shrink(load_scenario(path))
    if scenario.training is not None:  # workload.phase: train
        _training_smoke(scenario)
        return
    result = run_study(scenario)
    assert len(result.runs) == len(scenario.clusters) * len(scenario.placements)
    for run in result.runs:
        m = run.metrics
        assert np.isfinite(m.e2e_ms["mean"]) and m.e2e_ms["mean"] > 0, (run.cluster.name, run.name)
        assert np.isfinite(m.a2a_tail_ms["max"]) and m.a2a_tail_ms["max"] > 0
        assert m.speedup_vs_baseline is not None and m.speedup_vs_baseline > 0
        assert run.records.gpu["tokens"].shape[1] == scenario.model.num_layers
        if run.name == scenario.baseline:
            assert m.speedup_vs_baseline == 1.0
    for cluster in scenario.clusters:
        work = result.workloads[cluster.name]
        if scenario.workload.synthetic is not None:
            assert work["tokens"] == cluster.spec.num_gpus * 32 * _batches(scenario)
            assert work["batches"] == _batches(scenario)
