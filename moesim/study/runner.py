"""Run a scenario: for every cluster, build the topology and workload, compute every placement, simulate.

Returns a :class:`StudyResult` holding the records and metrics of every (cluster, placement) run;
writing files is :mod:`moesim.report`'s job. Everything a run needs is validated before the first
simulation starts, and one ``numpy.random.Generator`` per purpose is derived from the workload seed, so
the same scenario gives the same numbers on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from moesim.errors import InputError
from moesim.hardware.topology import Topology, build_topology
from moesim.metrics.summary import RunMetrics, summarize, with_speedups
from moesim.placement.format import Placement, load_placement
from moesim.placement.registry import PlacementProblem, make_placement
from moesim.placement.validate import Capacity, validate_placement
from moesim.sim.engine import EngineOptions, Simulation, SimRecords
from moesim.study.config import ClusterEntry, PlacementEntry, Scenario, check_rebalance_batches
from moesim.traces.fitted_generator import generate_fitted, load_params
from moesim.traces.format import Layout, Trace, load_trace
from moesim.traces.stats import expert_counts
from moesim.traces.synthetic import SyntheticParams, drift_trace, generate_trace


@dataclass
class Workload:
    """The evaluation trace and the profiling trace, laid out for one cluster."""

    trace: Trace
    layout: Layout
    profile: Trace
    profile_in_sample: bool


@dataclass
class Run:
    cluster: ClusterEntry
    name: str
    placement: Placement
    records: SimRecords
    metrics: RunMetrics


@dataclass
class StudyResult:
    scenario: Scenario
    runs: list[Run]
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    rebalance: list[Any] = field(default_factory=list)  # moesim.study.rebalance.RebalanceResult per cluster

    def metrics(self) -> list[RunMetrics]:
        return [r.metrics for r in self.runs]


def expert_loads(trace: Trace) -> np.ndarray:
    """[layers, experts] token-expert pairs per expert (counted block by block: memory-mapped traces stay so)."""
    return expert_counts(trace).astype(float)


def _check_trace(trace: Trace, scenario: Scenario, source: str) -> None:
    m = scenario.model
    for key in ("num_layers", "num_experts", "top_k"):
        have, want = getattr(trace.meta, key), getattr(m, key)
        if have != want:
            raise InputError(f"trace has {key}={have}, the scenario's model has {want}", source=source,
                             field=f"meta.{key}")


def load_workload_trace(scenario: Scenario) -> Trace | None:
    """The scenario's trace file (or sequence of files, joined by :func:`chain_traces`), loaded and checked
    against the model (None for synthetic workloads)."""
    tw = scenario.workload.trace
    if tw is None:
        return None
    parts = []
    for path in tw.paths:
        part = load_trace(path, mmap=True)  # stored (uncompressed) traces are memory-mapped, not read
        _check_trace(part, scenario, str(path))
        parts.append(part)
    if tw.files is None:
        return parts[0]
    return chain_traces(parts, [str(p) for p in tw.paths], one_batch_each=tw.tokens_per_gpu is None)


def chain_traces(parts: list[Trace], sources: list[str], *, one_batch_each: bool) -> Trace:
    """Traces replayed one after another, as one trace: batches keep their order, each part's after the
    previous part's. Parts either all carry batch arrays (renumbered consecutively) or none does; then
    each part is one batch (``one_batch_each``) or the whole sequence is cut into batches at replay. Home
    GPUs and gate weights are kept when every part has them."""
    with_batch = [p.batch is not None for p in parts]
    if any(with_batch) and not all(with_batch):
        i = with_batch.index(False)
        raise InputError("has no batch array while other traces of the sequence do; import them alike (moesim "
                         "trace import --gpus) or give none a batch array", source=sources[i], field="batch")
    with_home = [p.home is not None for p in parts]
    if any(with_home) and not all(with_home):
        i = with_home.index(False)
        raise InputError("has no home array while other traces of the sequence do", source=sources[i], field="home")
    batch = None
    if all(with_batch):
        chunks, offset = [], 0
        for p in parts:
            ids, renumbered = np.unique(np.asarray(p.batch), return_inverse=True)  # consecutive, order kept
            chunks.append(renumbered.astype(np.int64) + offset)
            offset += ids.size
        batch = np.concatenate(chunks)
    elif one_batch_each:
        batch = np.repeat(np.arange(len(parts), dtype=np.int64), [p.num_tokens for p in parts])

    def joined(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate([np.asarray(a) for a in arrays])

    meta = replace(parts[0].meta, source=" + ".join(sources))
    return Trace(experts=np.concatenate([np.asarray(p.experts) for p in parts]), meta=meta,
                 weights=joined("weights"), home=joined("home"), batch=batch)


def build_workload(scenario: Scenario, cluster: ClusterEntry, trace: Trace | None = None) -> Workload:
    m, G = scenario.model, cluster.spec.num_gpus
    syn = scenario.workload.synthetic
    if syn is not None and syn.fitted is not None:  # a generator fitted to real data (moesim.traces.fitted_generator)
        fitted = load_params(syn.fitted)
        if fitted.num_layers > m.num_layers:  # a model cut short (smoke tests): keep the fit's first layers
            fitted = fitted.first_layers(m.num_layers)

        def gen_fitted(batches: int, stream: int) -> Trace:
            return generate_fitted(fitted, num_gpus=G, tokens_per_gpu=syn.tokens_per_gpu, batches=batches,
                                   rng=np.random.default_rng([syn.seed, stream]), model=m.name)

        evaluation = gen_fitted(syn.batches, 1)
        return Workload(evaluation, evaluation.layout(G, syn.tokens_per_gpu), gen_fitted(syn.profile_batches, 2),
                        False)
    if syn is not None:
        params = SyntheticParams(zipf_alpha=syn.zipf_alpha, gpu_mix_sigma=syn.gpu_mix_sigma,
                                 affinity=syn.affinity, affinity_fanout=syn.affinity_fanout,
                                 groups=syn.groups, topk_groups=syn.topk_groups)

        def gen(batches: int, stream: int) -> Trace:
            return generate_trace(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, num_gpus=G,
                                  tokens_per_gpu=syn.tokens_per_gpu, batches=batches, params=params,
                                  rng=np.random.default_rng([syn.seed, stream]),
                                  structure_rng=np.random.default_rng(syn.seed), model=m.name)

        evaluation = gen(syn.batches, 1)
        if syn.drift_swaps_per_batch > 0:  # the evaluation drifts away from what the profile saw
            evaluation = drift_trace(evaluation, swaps_per_batch=syn.drift_swaps_per_batch,
                                     rng=np.random.default_rng([syn.seed, 3]))
        return Workload(evaluation, evaluation.layout(G, syn.tokens_per_gpu), gen(syn.profile_batches, 2), False)
    tw = scenario.workload.trace
    assert tw is not None
    trace = trace if trace is not None else load_workload_trace(scenario)
    assert trace is not None
    layout = trace.layout(G, tw.tokens_per_gpu, source=tw.label)
    if tw.profile_batches is None:
        return Workload(trace, layout, trace, True)
    keep = layout.batch < tw.profile_batches
    profile = Trace(experts=trace.experts[keep], meta=trace.meta)
    return Workload(trace, layout, profile, False)


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
        index = scenario.clusters.index(cluster)
        raise InputError(
            f"{slots} experts x {m.num_layers} layers x {cap.expert_bytes_per_gpu / 1e9:.2f} GB need "
            f"{need / 1e9:.1f} GB of expert weights per GPU, over {cap.memory_bytes_per_gpu / 1e9:.1f} GB "
            f"(memory_GB x expert_memory_fraction); add GPUs or raise tp",
            source=scenario.source, field=f"clusters[{index}]")


def check_replica_fit(scenario: Scenario, cluster: ClusterEntry, entry: PlacementEntry) -> None:
    """Fail early (without running the policy) when a policy's ``redundant_experts`` copies cannot fit in
    GPU memory: ``ceil((E + R) / EP)`` copies per GPU per layer, over every layer."""
    extra = entry.options.get("redundant_experts") if entry.file is None else None
    if not isinstance(extra, int) or extra <= 0:
        return
    cap = capacity_of(scenario, cluster)
    m = scenario.model
    room = int(cap.memory_bytes_per_gpu // (cap.expert_bytes_per_gpu * m.num_layers))
    slots = -(-(m.num_experts + extra) // cluster.ep)
    if slots > room:
        index = scenario.placements.index(entry)
        raise InputError(f"{slots} expert copies per GPU per layer do not fit in memory on {cluster.name} (room for "
                         f"{room}: memory_GB x expert_memory_fraction over every layer's copies); lower "
                         f"redundant_experts to at most {room * cluster.ep - m.num_experts}",
                         source=scenario.source, field=f"placements[{index}].redundant_experts")


def placement_problem(scenario: Scenario, cluster: ClusterEntry, profile: Trace) -> PlacementProblem:
    m = scenario.model
    ep = cluster.ep
    seed = scenario.workload.synthetic.seed if scenario.workload.synthetic else 0
    cap = capacity_of(scenario, cluster)  # copies per layer that fit: bounds replicas
    max_slots = int(cap.memory_bytes_per_gpu // (cap.expert_bytes_per_gpu * m.num_layers))
    spec = cluster.spec
    eng = scenario.engine  # a dispatch copy per destination node, rank, or expert pick
    copies = ("node" if eng.a2a == "hierarchical" else
              "gpu" if eng.a2a == "direct" and eng.dispatch == "per_gpu" else "expert")
    return PlacementProblem(num_layers=m.num_layers, num_experts=m.num_experts, num_gpus=ep,
                            gpus_per_node=cluster.spec.gpus_per_node // cluster.tp,
                            slots_per_gpu=-(-m.num_experts // ep), load=expert_loads(profile), seed=seed,
                            max_slots_per_gpu=max_slots,
                            routing=profile.experts,
                            compute_s_per_pair=6.0 * m.d_model * m.d_ff / cluster.tp / spec.gpu.flops_per_s,
                            transfer_bytes=float(m.dispatch_bytes), rank_s_per_byte=rank_seconds_per_byte(cluster),
                            memory_slots=int(cap.memory_bytes_per_gpu // cap.expert_bytes_per_gpu),
                            coherent=scenario.engine.dataflow == "coherent",
                            a2a_copies=copies, combine_bytes=float(m.combine_bytes))


def rank_seconds_per_byte(cluster: ClusterEntry) -> np.ndarray:
    """[EP, EP] seconds per byte between EP ranks: NVLink inside a node, the NICs across nodes.

    A rank's ``tp`` GPUs each carry 1/tp of its traffic on their own links; GPUs that share a NIC get an
    equal share of it (all send at once in an all-to-all). Two tiers only: leaf/spine oversubscription and
    PCIe are ignored here (the simulator models them).
    """
    spec, tp = cluster.spec, cluster.tp
    node = np.arange(cluster.ep) * tp // spec.gpus_per_node
    same = node[:, None] == node[None, :]
    inter = spec.gpus_per_nic / (tp * spec.network.nic_bytes_per_s) if spec.nodes > 1 else 0.0
    out = np.where(same, 1.0 / (tp * spec.nvlink.bytes_per_s), inter)
    np.fill_diagonal(out, 0.0)
    return out


def build_placement(scenario: Scenario, cluster: ClusterEntry, entry: PlacementEntry,
                    problem: PlacementProblem) -> Placement:
    """Compute or load one placement and validate it against the model and the cluster."""
    index = scenario.placements.index(entry)
    if entry.file is not None:
        placement = load_placement(entry.file)
        source = str(entry.file)
    else:
        try:
            placement = make_placement(entry.policy or "", problem, **entry.options)
        except KeyError as exc:
            raise InputError(str(exc.args[0]), source=scenario.source, field=f"placements[{index}]") from None
        except (ValueError, TypeError) as exc:
            raise InputError(str(exc), source=scenario.source, field=f"placements[{index}]") from None
        source = f"{scenario.source}: placements[{index}] ({entry.name}) on {cluster.name}"
    return validate_placement(placement, num_layers=scenario.model.num_layers,
                              num_experts=scenario.model.num_experts, num_gpus=cluster.ep,
                              capacity=capacity_of(scenario, cluster), source=source)


def engine_options(scenario: Scenario) -> EngineOptions:
    """The engine options a scenario asks for."""
    return EngineOptions(dedup=scenario.engine.dispatch == "per_gpu",
                         grouped=scenario.engine.expert_kernel == "grouped",
                         rate_tolerance=scenario.engine.rate_tolerance, a2a=scenario.engine.a2a,
                         replica_rule=scenario.engine.replica_rule, dataflow=scenario.engine.dataflow)


def run_study(scenario: Scenario, *, progress: bool | None = None,
              on_run: Callable[[Run], None] | None = None) -> StudyResult:
    """Simulate every placement of ``scenario`` on every cluster."""
    show = scenario.engine.progress if progress is None else progress
    options = engine_options(scenario)
    shared_trace = load_workload_trace(scenario)
    prepared: list[tuple[ClusterEntry, Topology, Workload, PlacementProblem,
                         list[tuple[PlacementEntry, Placement]]]] = []
    for cluster in scenario.clusters:  # validate everything before simulating anything
        check_fits(scenario, cluster)
        topo = build_topology(cluster.spec)
        work = build_workload(scenario, cluster, shared_trace)
        if scenario.rebalance is not None:  # a trace's batch count is known only now
            check_rebalance_batches(scenario.rebalance.every_batches, scenario.rebalance.window_batches,
                                    work.layout.num_batches, scenario.source)
        for entry in scenario.placements:
            check_replica_fit(scenario, cluster, entry)
        problem = placement_problem(scenario, cluster, work.profile)
        placements = [(e, build_placement(scenario, cluster, e, problem)) for e in scenario.placements]
        prepared.append((cluster, topo, work, problem, placements))

    runs: list[Run] = []
    workloads: dict[str, dict[str, Any]] = {}
    rebalanced: list[Any] = []
    for cluster, topo, work, problem, placements in prepared:
        sim = Simulation(topo, scenario.model, tp=cluster.tp, options=options,
                         attention=scenario.workload.attention)
        workloads[cluster.name] = {
            "tokens": work.trace.num_tokens, "batches": work.layout.num_batches,
            "profile_tokens": work.profile.num_tokens, "profile_in_sample": work.profile_in_sample,
        }
        for entry, placement in placements:
            total = work.layout.num_batches * scenario.model.num_layers
            with tqdm(total=total, desc=f"{cluster.name} / {entry.name}", unit="layer", disable=not show,
                      leave=False) as bar:
                records = sim.run(work.trace, work.layout, placement, progress=bar.update)
            records.placement = entry.name
            run = Run(cluster=cluster, name=entry.name, placement=placement, records=records,
                      metrics=summarize(records))
            runs.append(run)
            if on_run is not None:
                on_run(run)
        if scenario.rebalance is not None:  # re-plan over time (moesim.study.rebalance)
            from moesim.study.rebalance import run_rebalance

            with tqdm(total=work.layout.num_batches, desc=f"{cluster.name} / rebalancing", unit="batch",
                      disable=not show, leave=False) as bar:
                rebalanced.append(run_rebalance(scenario, cluster, topo, sim, work.trace, work.layout, problem,
                                                {e.name: p for e, p in placements},
                                                records={r.name: r.records for r in runs if r.cluster is cluster},
                                                progress=bar.update))
    final = with_speedups([r.metrics for r in runs], scenario.baseline)
    for run, m in zip(runs, final):
        run.metrics = m
    return StudyResult(scenario=scenario, runs=runs, workloads=workloads, rebalance=rebalanced)
