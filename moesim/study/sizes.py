"""What a study will need in memory and time, estimated from its sizes before anything is built.

For each cluster of a scenario, before its topology, workload or placements are made (and so also for
``moesim validate``, which builds none of them), :func:`check_cluster_sizes` adds up the big arrays and long
loops the run would make and refuses, through :mod:`moesim.budget`, what cannot fit in memory or finish in
the time limit, naming the scenario and the field whose size decides it:

- routing every ordered GPU pair (``clusters[i].nodes``): :func:`moesim.hardware.topology.topology_cost`;
- the workload: the synthetic or fitted generator's trace (evaluation and profile), its drift, or a trace
  file's layout (``workload.*``): the generators' own cost functions;
- the simulation: per run, [batches, layers, GPUs] records of every field, kept for every placement, and
  its events and flows (one per GPU pair and layer);
- the placement problem: expert loads, the GPU-pair costs, and the layers x experts^2 transition and
  co-activation counts that the pair-aware policies read (:func:`moesim.placement.registry.uses_pairwise`).

Deliberately rough (see :mod:`moesim.budget`): enough to tell a possible study from an impossible one.
"""

from __future__ import annotations

from moesim.budget import require_memory, require_time
from moesim.hardware.topology import topology_cost
from moesim.placement.registry import replica_slots, uses_pairwise
from moesim.sim.engine import GPU_FIELDS
from moesim.study.config import ClusterEntry, PlacementEntry, Scenario
from moesim.traces.fitted_generator import fitted_cost
from moesim.traces.format import Trace
from moesim.traces.synthetic import SyntheticParams, drift_cost, synthetic_cost

_SIM_S_PER_EVENT = 1e-4  # SimPy events: about nine per GPU and layer
_SIM_S_PER_FLOW = 5e-5  # flows: one per GPU pair with traffic, dispatch and combine


def _workload_size(scenario: Scenario, cluster: ClusterEntry, trace: Trace | None) -> tuple[int, int, float, float]:
    """(tokens, batches, bytes, seconds) of the workload on ``cluster``: generated (evaluation, profile,
    drift) or laid out from ``trace``."""
    m, G = scenario.model, cluster.spec.num_gpus
    syn, tw = scenario.workload.synthetic, scenario.workload.trace
    if syn is not None:
        T = syn.batches * G * syn.tokens_per_gpu
        params = SyntheticParams(affinity_fanout=syn.affinity_fanout)

        def generated(batches: int) -> tuple[float, float]:
            if syn.fitted is not None:  # (its layers, experts and top_k are the model's: checked by the config)
                nbytes, seconds, _ = fitted_cost(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
                                                 num_gpus=G, tokens_per_gpu=syn.tokens_per_gpu, batches=batches,
                                                 in_memory=True, weights=False)
            else:
                nbytes, seconds, _ = synthetic_cost(num_layers=m.num_layers, num_experts=m.num_experts,
                                                    top_k=m.top_k, num_gpus=G, tokens_per_gpu=syn.tokens_per_gpu,
                                                    batches=batches, params=params, weights=False)
            return nbytes, seconds

        (b1, s1), (b2, s2) = generated(syn.batches), generated(syn.profile_batches)
        b3, s3 = drift_cost(num_tokens=T, num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
                            batches=syn.batches, swaps_per_batch=syn.drift_swaps_per_batch)
        drift = syn.fitted is None and syn.drift_swaps_per_batch > 0
        return T, syn.batches, b1 + b2 + (b3 if drift else 0.0), s1 + s2 + (s3 if drift else 0.0)
    assert tw is not None and trace is not None
    T = trace.num_tokens
    B = trace.num_batches(G, tw.tokens_per_gpu)
    # layout: batch and home ids, one index array per batch; the profile: a copy of its tokens
    return T, B, T * 40.0 + B * 200.0 + T * m.num_layers * m.top_k * 4.0, T * 1e-7 + B * 1e-5


def _placement_bytes(scenario: Scenario, cluster: ClusterEntry, entries: list[PlacementEntry]) -> float:
    """The placement problem's statistics and every placement's [layers, experts, copies] array."""
    L, E, R = scenario.model.num_layers, scenario.model.num_experts, cluster.ep
    total = L * E * 8.0 * 4 + R * R * 8.0 * 2  # loads, the rank-pair costs
    if any(e.policy is not None and uses_pairwise(e.policy) for e in entries):
        total += 4.0 * L * E * E * 8  # transition and co-activation counts, int64 then float
    for e in entries:
        copies = 1 + -(-replica_slots(e.policy or "", e.options) // max(E, 1))
        total += L * E * copies * 4.0 + L * E * R * 1.0  # the placement, and which ranks hold what
    return total


def simulation_seconds(cluster: ClusterEntry, num_layers: int, batches: int, runs: int) -> float:
    """Rough seconds of ``runs`` simulations of ``batches`` batches of ``num_layers`` layers on ``cluster``:
    its SimPy events (about nine per GPU and layer) and flows (one per GPU pair, dispatch and combine)."""
    G = cluster.spec.num_gpus
    return runs * batches * num_layers * (9 * G * _SIM_S_PER_EVENT + 2 * G * G * _SIM_S_PER_FLOW)


def check_cluster_sizes(scenario: Scenario, cluster: ClusterEntry, entries: list[PlacementEntry],
                        trace: Trace | None) -> float:
    """Raise InputError naming the scenario and the deciding field when the study of ``entries`` on
    ``cluster`` cannot fit in memory or the time limit (see the module docstring); else return its estimated
    seconds (the caller checks a study's clusters together)."""
    src = scenario.source
    i = scenario.clusters.index(cluster)
    where = f"clusters[{i}]"
    G = cluster.spec.num_gpus
    L = scenario.model.num_layers
    nbytes, seconds = topology_cost(cluster.spec)
    routing = f"routing every pair of the {G} GPUs of {cluster.name}"
    require_memory(nbytes, routing, source=src, field=f"{where}.nodes")
    require_time(seconds, routing, source=src, field=f"{where}.nodes")

    work_field = "workload.synthetic" if scenario.workload.synthetic is not None else "workload.trace"
    T, B, nbytes, seconds = _workload_size(scenario, cluster, trace)
    tw = scenario.workload.trace
    what = (f"the workload on {cluster.name} ({B} batches, {T} tokens x {L} layers x top-{scenario.model.top_k}"
            + (f", from {tw.label})" if tw is not None else ")"))
    require_memory(nbytes, what, source=src, field=work_field)
    require_time(seconds, what, source=src, field=work_field)

    runs = len(entries) + (2 if scenario.rebalance is not None else 0)
    records = runs * B * L * G * len(GPU_FIELDS) * 8.0
    sim = f"simulating {runs} placement(s) x {B} batches x {L} layers x {G} GPUs on {cluster.name}"
    require_memory(records + L * G * G * 8.0 * 4, sim, source=src, field=work_field)
    sim_s = simulation_seconds(cluster, L, B, runs)
    require_time(sim_s, sim, source=src, field=work_field)

    problem = _placement_bytes(scenario, cluster, entries)
    require_memory(problem, f"planning {len(entries)} placement(s) of {scenario.model.num_experts} experts x {L} "
                            f"layers on {cluster.ep} EP ranks", source=src, field="model.num_experts")
    return topology_cost(cluster.spec)[1] + seconds + sim_s
