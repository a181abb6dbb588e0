"""One entry from a scenario to what the simulator runs: :func:`prepare` -> :class:`StudyPlan`.

For every cluster of the scenario a :class:`ClusterPlan` holds the topology, the workload (evaluation and
profiling traces), the placement problem the policies plan on (its hardware costs from
:mod:`moesim.sim.costs`, the model the engine simulates with) and the validated placements. Every check
runs here, before the first simulation: the experts fit in GPU memory, replicas fit, the study fits this
machine's memory and the time limit (:mod:`moesim.study.sizes`), rebalancing intervals fit the trace,
placement files match the model and the cluster, policies and their options are valid. ``run``,
``validate``, ``place``, ``sweep``, rebalancing and the notebooks all go through it; errors name a
placement by its name (or the command-line option that asked for it), never by a position.

``prepare(scenario, build=False)`` stops after the checks that need no workload or policy (what ``moesim
validate`` reports): it generates no trace and runs no optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from tqdm import tqdm

from moesim.budget import require_time
from moesim.errors import InputError
from moesim.hardware.topology import Topology, build_topology
from moesim.placement.format import Placement, load_placement
from moesim.placement.registry import (PlacementProblem, make_placement, reads_profile, replica_option,
                                      replica_slots)
from moesim.placement.validate import Capacity, validate_placement
from moesim.sim.costs import HardwareCosts, hardware_costs
from moesim.sim.engine import EngineOptions, Simulation
from moesim.study.config import ClusterEntry, PlacementEntry, Scenario, check_rebalance_batches
from moesim.study.sizes import check_cluster_sizes
from moesim.study.workload import Workload, build_workload, expert_loads, load_workload_trace
from moesim.traces.format import Trace


@dataclass
class ClusterPlan:
    """One cluster of a study, ready to simulate. ``workload``, ``costs`` and ``problem`` are None and
    ``placements`` holds only the placement files when prepared with ``build=False``. The placement problem
    (with the profile it counts) is built on first use of :attr:`problem`: a study whose placements read no
    profile never builds it."""

    cluster: ClusterEntry
    topology: Topology
    workload: Workload | None = None
    costs: HardwareCosts | None = None
    placements: list[tuple[PlacementEntry, Placement]] = field(default_factory=list)
    make_problem: Callable[[], PlacementProblem] | None = field(default=None, repr=False)
    _problem: PlacementProblem | None = field(default=None, init=False, repr=False)

    @property
    def problem(self) -> PlacementProblem | None:
        """What the policies plan on (built now, profile included, if it was not yet)."""
        if self._problem is None and self.make_problem is not None:
            self._problem = self.make_problem()
        return self._problem

    def placement(self, name: str) -> Placement:
        return next(p for e, p in self.placements if e.name == name)


@dataclass
class StudyPlan:
    scenario: Scenario
    options: EngineOptions
    clusters: list[ClusterPlan]

    def simulation(self, plan: ClusterPlan) -> Simulation:
        """The engine for one cluster of the plan (the same hardware model the placement costs came from)."""
        return Simulation(plan.topology, self.scenario.model, tp=plan.cluster.tp, options=self.options,
                          attention=self.scenario.attention)


def capacity_of(scenario: Scenario, cluster: ClusterEntry) -> Capacity:
    spec = cluster.spec
    return Capacity(
        slots_per_gpu=None,
        expert_bytes_per_gpu=scenario.model.expert_weight_bytes / cluster.tp,
        memory_bytes_per_gpu=spec.gpu.memory_GB * 1e9 * spec.expert_memory_fraction,
    )


def check_fits(scenario: Scenario, cluster: ClusterEntry) -> None:
    """Fail early when an equal share of the experts (``ceil(E / EP)`` per rank per layer) cannot fit."""
    cap = capacity_of(scenario, cluster)
    m = scenario.model
    slots = -(-m.num_experts // cluster.ep)
    need = slots * m.num_layers * cap.expert_bytes_per_gpu
    if need > cap.memory_bytes_per_gpu:
        raise InputError(
            f"{slots} experts x {m.num_layers} layers x {cap.expert_bytes_per_gpu / 1e9:.2f} GB need "
            f"{need / 1e9:.1f} GB of expert weights per GPU, over {cap.memory_bytes_per_gpu / 1e9:.1f} GB "
            f"(memory_GB x expert_memory_fraction); add GPUs or raise tp",
            source=scenario.source, field=f"clusters[{scenario.clusters.index(cluster)}]")


def check_replica_fit(scenario: Scenario, cluster: ClusterEntry, entry: PlacementEntry, where: str) -> None:
    """Fail early (without running the policy) when the copies a replicating policy asks for cannot fit in
    GPU memory: ``ceil((E + R) / EP)`` copies per GPU per layer, over every layer."""
    key = replica_option(entry.policy) if entry.file is None and entry.policy else None
    extra = replica_slots(entry.policy or "", entry.options) if key else 0
    if extra <= 0:
        return
    cap = capacity_of(scenario, cluster)
    m = scenario.model
    room = int(cap.memory_bytes_per_gpu // (cap.expert_bytes_per_gpu * m.num_layers))
    slots = -(-(m.num_experts + extra) // cluster.ep)
    if slots > room:
        raise InputError(f"{slots} expert copies per GPU per layer do not fit in memory on {cluster.name} (room for "
                         f"{room}: memory_GB x expert_memory_fraction over every layer's copies); lower "
                         f"{key} to at most {room * cluster.ep - m.num_experts}",
                         source=scenario.source, field=_option_field(where, key or ""))


def _option_field(where: str, key: str) -> str:
    """How an error names option ``key`` of the placement named ``where``: its key in the scenario, the
    ``--set`` of ``moesim place --policy``, or the command-line option that gave the value."""
    if where.startswith("--policy"):
        return f"--set {key}"
    return where if where.startswith("--") else f"{where}.{key}"


def placement_problem(scenario: Scenario, cluster: ClusterEntry, profile: Trace | None,
                      costs: HardwareCosts) -> PlacementProblem:
    """What the policies plan on: the profile's loads and routing, the memory bounds, and the hardware
    costs of the engine's own model (:mod:`moesim.sim.costs`). Without ``profile`` (for the policies that
    read none: :func:`moesim.placement.registry.reads_profile`) the loads are zeros and there is no routing."""
    m = scenario.model
    ep = cluster.ep
    seed = scenario.workload.synthetic.seed if scenario.workload.synthetic else 0
    cap = capacity_of(scenario, cluster)  # copies per layer that fit: bounds replicas
    max_slots = int(cap.memory_bytes_per_gpu // (cap.expert_bytes_per_gpu * m.num_layers))
    load = expert_loads(profile) if profile is not None else np.zeros((m.num_layers, m.num_experts))
    return PlacementProblem(num_layers=m.num_layers, num_experts=m.num_experts, num_ranks=ep,
                            gpus_per_node=cluster.spec.gpus_per_node // cluster.tp,
                            slots_per_gpu=-(-m.num_experts // ep), seed=seed, load=load,
                            max_slots_per_gpu=max_slots, routing=profile.experts if profile is not None else None,
                            memory_slots=int(cap.memory_bytes_per_gpu // cap.expert_bytes_per_gpu), costs=costs)


def build_placement(scenario: Scenario, cluster: ClusterEntry, entry: PlacementEntry,
                    problem: PlacementProblem | None, where: str) -> Placement:
    """Compute (``problem`` given) or load one placement and validate it against the model and the cluster;
    ``where`` names it in errors (``placements.NAME``, or the command-line option that asked for it)."""
    if entry.file is not None:
        source = str(entry.file)
        try:
            placement = load_placement(entry.file)
            return validate_placement(placement, num_layers=scenario.model.num_layers,
                                      num_experts=scenario.model.num_experts, num_ranks=cluster.ep,
                                      capacity=capacity_of(scenario, cluster), source=source)
        except InputError as exc:
            raise exc.via(scenario.source, f"{where}.file") from None
    if problem is None:
        raise ValueError("a policy placement needs the placement problem")
    try:
        placement = make_placement(entry.policy or "", problem, **entry.options)
    except KeyError as exc:
        raise InputError(str(exc.args[0]), source=scenario.source, field=where) from None
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc), source=scenario.source, field=where) from None
    source = f"{scenario.source}: {where} on {cluster.name}"
    return validate_placement(placement, num_layers=scenario.model.num_layers,
                              num_experts=scenario.model.num_experts, num_ranks=cluster.ep,
                              capacity=capacity_of(scenario, cluster), source=source)


def _select(scenario: Scenario, clusters: Sequence[str] | None, field_name: str) -> list[ClusterEntry]:
    if clusters is None:
        return list(scenario.clusters)
    known = {c.name: c for c in scenario.clusters}
    for name in clusters:
        if name not in known:
            raise InputError(f"no cluster {name!r}; valid: {', '.join(known)}", source=scenario.source,
                             field=field_name)
    return [known[name] for name in clusters]


def prepare(scenario: Scenario, *, placements: Sequence[PlacementEntry] | None = None,
            where: Mapping[str, str] | None = None, clusters: Sequence[str] | None = None,
            cluster_field: str = "clusters", build: bool = True, progress: bool = False) -> StudyPlan:
    """Check a scenario and, with ``build``, make every cluster's workload, costs and placements.

    ``placements`` replaces the scenario's list (``moesim place`` and ``sweep`` plan their own entries);
    ``where[name]`` is how an entry is named in errors (default ``placements.NAME``). ``clusters`` keeps
    only the named clusters (an unknown name is an error on ``cluster_field``). ``progress`` shows a bar per
    cluster over its steps (the workload, the costs, each placement: trace generation and optimisers take time).
    """
    entries = list(scenario.placements if placements is None else placements)
    label = {e.name: (where or {}).get(e.name, f"placements.{e.name}") for e in entries}
    options = scenario.engine.options()
    shared_trace = load_workload_trace(scenario)
    selected = _select(scenario, clusters, cluster_field)
    _check_unbuilt(scenario, selected, entries, label, shared_trace, cluster_field)
    plans = []
    for cluster in selected:
        with tqdm(total=2 + len(entries), desc=f"{cluster.name} / preparing", unit="step",
                  disable=not (progress and build), leave=False) as bar:
            plans.append(_build_cluster(scenario, cluster, entries, label, options, shared_trace, build, bar))
    return StudyPlan(scenario, options, plans)


def _check_unbuilt(scenario: Scenario, selected: list[ClusterEntry], entries: list[PlacementEntry],
                   label: Mapping[str, str], shared_trace: Trace | None, cluster_field: str) -> None:
    """Every check that needs nothing built, for every cluster, before building any: the model fits, the
    replicas fit, memory and time."""
    seconds = 0.0
    for cluster in selected:
        check_fits(scenario, cluster)
        for entry in entries:
            check_replica_fit(scenario, cluster, entry, label[entry.name])
        seconds += check_cluster_sizes(scenario, cluster, entries, shared_trace)  # memory and time
    require_time(seconds, f"the study of {len(entries)} placement(s) on {len(selected)} cluster(s)",
                 source=scenario.source, field=cluster_field)


def check_study(scenario: Scenario) -> None:
    """What :func:`prepare` without building checks, at less cost where it can: a scenario with a synthetic
    workload and no placement files builds no topology (routing every GPU pair of a large cluster takes seconds),
    so that a sweep validates many points quickly; the others go through :func:`prepare` itself."""
    if scenario.workload.trace is not None or any(e.file is not None for e in scenario.placements):
        prepare(scenario, build=False)
        return
    entries = list(scenario.placements)
    _check_unbuilt(scenario, list(scenario.clusters), entries, {e.name: f"placements.{e.name}" for e in entries},
                   None, "clusters")


def _build_cluster(scenario: Scenario, cluster: ClusterEntry, entries: list[PlacementEntry], label: dict[str, str],
                   options: EngineOptions, shared_trace: Trace | None, build: bool, bar: tqdm) -> ClusterPlan:
    """One cluster's topology, workload, costs and placements (``bar`` advances after each); its GPUs at the clock
    the scenario runs them at (:attr:`Scenario.sustained`), for the placement costs and the engine alike."""
    if scenario.sustained:
        cluster = cluster.model_copy(update={"spec": cluster.spec.at_sustained_clock()})
    plan = ClusterPlan(cluster, build_topology(cluster.spec))
    if shared_trace is not None or build:
        bar.set_postfix_str("workload")
        work = build_workload(scenario, cluster, shared_trace)
        if scenario.rebalance is not None:  # a trace's batch count is known only now
            check_rebalance_batches(scenario.rebalance.every_batches, scenario.rebalance.window_batches,
                                    work.layout.num_batches, scenario.source)
        plan.workload = work if build else None
    bar.update(1)
    if build:
        assert plan.workload is not None
        work = plan.workload
        tokens = work.trace.num_tokens / max(work.layout.num_batches * cluster.spec.num_gpus, 1)
        costs = plan.costs = hardware_costs(plan.topology, scenario.model, tp=cluster.tp, options=options,
                                            tokens_per_gpu=tokens, attention=scenario.attention)
        plan.make_problem = lambda: placement_problem(scenario, cluster, work.profile, costs)
    bar.update(1)
    shape_only = None  # the problem of the policies that read no profile
    for e in entries:
        if build or e.file is not None:
            bar.set_postfix_str(e.name)
            problem = plan.problem if e.file is None and reads_profile(e.policy or "") else None
            if build and e.file is None and problem is None:
                assert plan.costs is not None
                shape_only = shape_only or placement_problem(scenario, cluster, None, plan.costs)
                problem = shape_only
            plan.placements.append((e, build_placement(scenario, cluster, e, problem, label[e.name])))
        bar.update(1)
    return plan
