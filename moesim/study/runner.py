"""Run a scenario: prepare it once (:mod:`moesim.study.plan`), then simulate every placement on every cluster.

Returns a :class:`StudyResult` holding the records and metrics of every (cluster, placement) run; writing
files is :mod:`moesim.report`'s job. Everything a run needs is validated by :func:`prepare` before the
first simulation starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from moesim.metrics.serving import serving_metrics
from moesim.metrics.summary import RunMetrics, summarize, with_speedups
from moesim.placement.format import Placement
from moesim.sim.engine import SimRecords
from moesim.study.config import ClusterEntry, Scenario
from moesim.study.plan import ClusterPlan, StudyPlan, prepare


@dataclass
class Run:
    cluster: ClusterEntry
    name: str
    placement: Placement
    records: SimRecords
    metrics: RunMetrics
    predicted_ms: float | None = None  # an optimising policy's own model of a batch (moesim.sim.costs)


@dataclass
class StudyResult:
    scenario: Scenario
    runs: list[Run]
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    rebalance: list[Any] = field(default_factory=list)  # moesim.study.rebalance.RebalanceResult per cluster
    plan: StudyPlan | None = None  # what was simulated: topologies, workloads, placement problems

    def metrics(self) -> list[RunMetrics]:
        return [r.metrics for r in self.runs]


def _predicted_ms(cp: ClusterPlan, placement: Placement, num_layers: int) -> float | None:
    """What an optimising policy (one that reports its ``objective``) predicts a batch takes."""
    objective = placement.info.get("objective") if placement.info else None
    if objective is None or cp.costs is None or cp.workload is None:
        return None
    per_batch = cp.workload.trace.num_tokens / max(cp.workload.layout.num_batches, 1)
    counted = bool(placement.info.get("dispatch_objective"))
    profile = cp.workload.profile_tokens / per_batch
    return cp.costs.predicted_batch_s(float(objective), profile, num_layers, dispatch_counted=counted) * 1e3


def _simulate_cluster(plan: StudyPlan, cp: ClusterPlan, show: bool,
                      on_run: Callable[[Run], None] | None) -> tuple[list[Run], Any]:
    """Every placement of one cluster, then its rebalancing study when the scenario has one."""
    scenario, work = plan.scenario, cp.workload
    assert work is not None
    sim = plan.simulation(cp)
    batch_tokens = np.bincount(work.layout.batch, minlength=work.layout.num_batches)  # tokens of each forward
    runs = []
    for entry, placement in cp.placements:
        total = work.layout.num_batches * scenario.model.num_layers
        with tqdm(total=total, desc=f"{cp.cluster.name} / {entry.name}", unit="layer", disable=not show,
                  leave=False) as bar:
            # no per-flow collective results: no report reads them (hundreds of MB at 1,024 GPUs)
            records = sim.run(work.trace, work.layout, placement, name=entry.name, progress=bar.update,
                              keep_collectives=False)
        metrics = replace(summarize(records),
                          serving=serving_metrics(records, batch_tokens, scenario.attention,
                                                  output_per_step=scenario.output_per_step))
        run = Run(cluster=cp.cluster, name=entry.name, placement=placement, records=records,
                  metrics=metrics, predicted_ms=_predicted_ms(cp, placement, scenario.model.num_layers))
        runs.append(run)
        if on_run is not None:
            on_run(run)
    if scenario.rebalance is None:
        return runs, None
    from moesim.study.rebalance import run_rebalance  # re-plan over time

    with tqdm(total=work.layout.num_batches, desc=f"{cp.cluster.name} / rebalancing", unit="batch",
              disable=not show, leave=False) as bar:
        assert cp.problem is not None
        rebalanced = run_rebalance(scenario, cp.cluster, cp.topology, sim, work.trace, work.layout, cp.problem,
                                   {e.name: p for e, p in cp.placements},
                                   records={r.name: r.records for r in runs}, progress=bar.update)
    return runs, rebalanced


def run_study(scenario: Scenario | StudyPlan, *, progress: bool | None = None,
              on_run: Callable[[Run], None] | None = None) -> StudyResult:
    """Simulate every placement of a scenario (prepared here, or already by :func:`prepare`) on every cluster."""
    sc = scenario.scenario if isinstance(scenario, StudyPlan) else scenario
    show = sc.engine.progress if progress is None else progress
    plan = scenario if isinstance(scenario, StudyPlan) else prepare(scenario, progress=show)
    runs: list[Run] = []
    workloads: dict[str, dict[str, Any]] = {}
    rebalanced: list[Any] = []
    for cp in plan.clusters:
        work = cp.workload
        assert work is not None, "run_study needs a plan prepared with build=True"
        workloads[cp.cluster.name] = {
            "tokens": work.trace.num_tokens, "batches": work.layout.num_batches,
            "profile_tokens": work.profile_tokens, "profile_in_sample": work.profile_in_sample,
        }
        mine, rebalance = _simulate_cluster(plan, cp, show, on_run)
        runs += mine
        if rebalance is not None:
            rebalanced.append(rebalance)
    final = with_speedups([r.metrics for r in runs], sc.baseline)
    for run, m in zip(runs, final):
        run.metrics = m
    return StudyResult(scenario=sc, runs=runs, workloads=workloads, rebalance=rebalanced, plan=plan)
