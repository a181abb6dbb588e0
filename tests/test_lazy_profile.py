"""The profile trace and the placement problem are made on first use (issue 18): a study whose placements read no
profile (contiguous, round_robin, random: ``profile=False``) never generates it, and their placements and results
are those of a study that does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_scenarios_smoke import shrink

from moesim.placement.registry import reads_profile
from moesim.study import load_scenario, run_study
from moesim.study.config import PlacementEntry
from moesim.study.plan import prepare

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "singlenode.yaml"


def entries(*names: str) -> list[PlacementEntry]:
    return [PlacementEntry(name=n, policy=n) for n in names]


def test_profile_free_policies_generate_no_profile():
    assert not any(reads_profile(n) for n in ("contiguous", "round_robin", "random"))
    assert reads_profile("greedy") and reads_profile("ilp")
    scenario = shrink(load_scenario(SCENARIO))
    plan = prepare(scenario, placements=entries("contiguous", "round_robin"))
    cp = plan.clusters[0]
    assert cp.workload is not None and not hasattr(cp.workload._profile, "experts")  # still a recipe
    assert cp._problem is None  # nothing built it
    syn = scenario.workload.synthetic
    assert cp.workload.profile_tokens == syn.profile_batches * cp.cluster.spec.num_gpus * syn.tokens_per_gpu
    both = prepare(scenario, placements=entries("contiguous", "round_robin", "greedy")).clusters[0]
    assert both.workload is not None and both.workload.profile.num_tokens == cp.workload.profile_tokens
    np.testing.assert_array_equal(cp.workload.profile.experts, both.workload.profile.experts)  # made when asked
    for name in ("contiguous", "round_robin"):
        np.testing.assert_array_equal(cp.placement(name).gpus, both.placement(name).gpus)


def test_a_study_without_profile_gives_the_same_results():
    scenario = shrink(load_scenario(SCENARIO))
    lean = run_study(prepare(scenario, placements=entries("contiguous")), progress=False)
    full = run_study(prepare(scenario, placements=entries("contiguous", "greedy")), progress=False)
    assert lean.runs[0].metrics == full.runs[0].metrics
    assert lean.workloads == full.workloads
