"""From an engine's routing dump to a placement decision: plan out of sample, simulate, weigh rebalancing.

:func:`plan_from_dump` takes a dump (a per-token :class:`~moesim.traces.format.Trace` or a
:class:`~moesim.traces.count_trace.CountTrace`), a cluster and a model, and:

1. splits the dump's windows (forward passes, iterations; a per-token trace's batches) in two: policies plan on
   the first half, every placement is scored on the second (out of sample; a dump of one window is scored in
   sample, and says so);
2. plans with the policies that fit the dump: ``eplb`` over a sweep of redundant experts, ``greedy``, and
   ``ilp`` (whose communication terms read per-token paths, so with counts it balances load only), beside the
   user's current map (given, or the engine's default: slot ``p`` holds expert ``p % E``);
3. scores each by the load imbalance it leaves on the held-out windows (max/mean of the EP ranks' token-expert
   pairs per layer and window, replicas splitting their expert's load evenly, averaged; TensorRT-LLM's
   ``(max - mean) / mean`` beside it) and by simulating one batch of the held-out windows on the cluster (a
   count dump through :func:`~moesim.traces.count_trace.expand_counts`, the labelled synthetic expansion);
4. decides (:func:`verdict`): is the best replicated map's gain over the current one larger than the
   model's error on placement gains (:data:`GAIN_ERROR`), with how many redundant experts, and how often to
   rebalance: plans made on one window are scored ``k`` windows later to measure how fast a map goes stale,
   and a rebalance is worth it only when the time the staleness costs over an interval exceeds the cost of
   moving the weights (:data:`REBALANCE_S`, SGLang's measured ~1.8 s; vLLM #50647 saw throughput fall 3.17x
   while balance improved, under synchronous rearrangement).

Ignored: the engine's replica dispatch rule (replicas split load evenly here and in the imbalance figures of
vLLM's and TensorRT-LLM's own tools), memory for the copies beyond the cluster's expert budget, and the
rearrangement's own traffic pattern (a fixed cost per rebalance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from moesim.errors import InputError
from moesim.hardware.topology import build_topology
from moesim.metrics.summary import summarize
from moesim.placement.export.slots import identity_map, placement_from_map
from moesim.placement.format import Placement
from moesim.placement.registry import PlacementProblem, make_placement
from moesim.sim.costs import hardware_costs
from moesim.sim.engine import Simulation
from moesim.study.config import Scenario
from moesim.study.plan import capacity_of, check_fits
from moesim.traces.count_trace import CountTrace, counts_of_trace, expand_counts
from moesim.traces.format import Trace

# How far moesim's predicted placement gains have been from measured ones (docs/accuracy.md): one EP MoE
# layer on 2x H200, greedy over contiguous, predicted 1.155x, measured 1.115x (benchmarks/validation/ep_layer).
GAIN_ERROR = 1.155 / 1.115 - 1
GAIN_ERROR_SOURCE = ("one EP layer on 2x H200, greedy vs contiguous: 1.155x predicted, 1.115x measured "
                     "(docs/accuracy.md); whole deployments' EPLB gain is predicted 1.11x vs 1.49x published "
                     "(SGLang prefill; their expert distribution is not published)")
REBALANCE_S = 1.8  # SGLang PR #6739: about 1.8 s per rebalance
TIE = 0.005  # simulated times within 0.5% of the fastest count as equal: the best-balanced of them wins
MAX_DRIFT_WINDOWS = 8  # the dump's windows are grouped into at most this many for the staleness curve


@dataclass(frozen=True)
class Candidate:
    """One placement of the comparison, with its scores."""

    name: str
    placement: Placement
    redundant: int  # P - E: extra slots per layer
    imbalance_in: float  # max/mean on the planning windows (in sample)
    imbalance_out: float  # max/mean on the held-out windows
    e2e_ms: float | None = None  # simulated batch of the held-out windows

    @property
    def trtllm_imbalance(self) -> float:
        return self.imbalance_out - 1.0


@dataclass
class DumpPlan:
    candidates: list[Candidate]
    split: str  # which windows were planned on and which scored
    out_of_sample: bool
    synthetic: str | None  # the expansion's label, when the simulation ran on one
    staleness: list[float]  # max/mean of a plan made on one window group, scored k groups later (k = 1, 2, ...)
    window_tokens: float  # tokens per window group of the staleness curve
    batch_tokens: int  # tokens of the simulated batch
    info: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)


def rank_loads(loads: np.ndarray, placement: Placement) -> np.ndarray:
    """[windows, layers, ranks] token-expert pairs per EP rank, each expert's load split evenly over its copies."""
    gpus = placement.gpus
    L, E, _ = gpus.shape
    held = np.zeros((L, E, placement.num_ranks))
    l_idx, e_idx, r_idx = np.nonzero(gpus >= 0)
    held[l_idx, e_idx, gpus[l_idx, e_idx, r_idx]] = 1.0
    per_copy = np.asarray(loads, dtype=float) / np.maximum(held.sum(axis=2), 1)[None]
    return np.einsum("wle,ler->wlr", per_copy, held)


def imbalance(loads: np.ndarray, placement: Placement) -> float:
    """Max over mean of the ranks' loads, averaged over the (window, layer) pairs that carry load."""
    rl = rank_loads(loads, placement)
    mean = rl.mean(axis=2)
    ok = mean > 0
    return float((rl.max(axis=2)[ok] / mean[ok]).mean()) if ok.any() else 1.0


def _group(loads: np.ndarray, groups: int) -> np.ndarray:
    """Consecutive windows summed into at most ``groups`` groups."""
    edges = np.linspace(0, loads.shape[0], min(groups, loads.shape[0]) + 1).round().astype(int)
    return np.stack([loads[a:b].sum(axis=0) for a, b in zip(edges[:-1], edges[1:])])


def as_counts(dump: Trace | CountTrace) -> CountTrace:
    """A count trace of the dump (a per-token trace: one window per batch, or one per token half)."""
    if isinstance(dump, CountTrace):
        return dump
    if dump.batch is not None and len(np.unique(dump.batch)) > 1:
        return counts_of_trace(dump)
    half = (np.arange(dump.num_tokens) >= dump.num_tokens // 2).astype(np.int64)
    return counts_of_trace(dump, half)


@dataclass(frozen=True)
class PlanOptions:
    redundant: tuple[int, ...] | None = None  # EPLB's sweep of redundant experts; None: 0, 1, 2 and 4 per rank
    policies: tuple[str, ...] = ("eplb", "greedy", "ilp")
    tokens_per_gpu: int = 1024  # the simulated batch
    ilp_time_limit_s: float = 5.0
    seed: int = 0
    current: Placement | None = None  # the user's map; None: the engine default with current_redundant slots
    current_redundant: int | None = None  # None: the fewest that fill every rank equally


def redundant_sweep(num_experts: int, num_ranks: int, given: tuple[int, ...] | None) -> list[int]:
    """EPLB's redundant-expert counts to try: ``given``, or the fewest that fill the ranks plus 0, 1, 2, 4 per rank."""
    base = (-num_experts) % num_ranks
    if given is not None:
        for r in given:
            if r < 0 or (num_experts + r) % num_ranks:
                raise InputError(f"{r}: E + redundant = {num_experts + r} must be a multiple of the {num_ranks} EP "
                                 f"ranks (use {base}, {base + num_ranks}, ...)", field="--redundant")
        return sorted(set(given))
    return [base + k * num_ranks for k in (0, 1, 2, 4)]


def _problem(scenario: Scenario, loads: np.ndarray, routing: np.ndarray | None, costs: Any,
             seed: int) -> PlacementProblem:
    m, cluster = scenario.model, scenario.clusters[0]
    cap = capacity_of(scenario, cluster)
    max_slots = int(cap.memory_bytes_per_gpu // (cap.expert_bytes_per_gpu * m.num_layers))
    return PlacementProblem(num_layers=m.num_layers, num_experts=m.num_experts, num_ranks=cluster.ep,
                            gpus_per_node=cluster.spec.gpus_per_node // cluster.tp,
                            slots_per_gpu=-(-m.num_experts // cluster.ep), load=loads, seed=seed,
                            max_slots_per_gpu=max_slots,
                            routing=routing, costs=costs)


def _policies(problem: PlacementProblem, opts: PlanOptions, groups: int,
              step: Callable[[str], None]) -> list[tuple[str, Placement, int]]:
    """(name, placement, redundant) of every policy asked for that fits the memory."""
    E, R = problem.num_experts, problem.num_ranks
    base = (-E) % R
    out = []
    if "eplb" in opts.policies:
        for r in redundant_sweep(E, R, opts.redundant):
            if problem.max_slots_per_gpu is not None and (E + r) // R > problem.max_slots_per_gpu:
                continue  # the copies do not fit in memory
            step(f"eplb +{r}")
            out.append((f"eplb+{r}", make_placement("eplb", problem, redundant_experts=r, num_groups=groups), r))
    if "greedy" in opts.policies:
        step("greedy")
        out.append(("greedy", make_placement("greedy", problem, redundant_experts=base), base))
    if "ilp" in opts.policies:
        step("ilp")
        out.append(("ilp", make_placement("ilp", problem, redundant_experts=base,
                                          time_limit_s=opts.ilp_time_limit_s), base))
    return out


def current_map(opts: PlanOptions, num_layers: int, num_experts: int, num_ranks: int) -> tuple[Placement, int]:
    """The user's map, or the engines' default (slot ``p`` holds expert ``p % E``), and its redundant slots."""
    if opts.current is not None:
        slots = int(opts.current.copies_per_gpu().max()) * num_ranks
        return opts.current, max(slots - num_experts, 0)
    r = (-num_experts) % num_ranks if opts.current_redundant is None else opts.current_redundant
    if r < 0 or (num_experts + r) % num_ranks:
        raise InputError(f"E + redundant = {num_experts + r} must be a multiple of the {num_ranks} EP ranks",
                         field="--current-redundant")
    phy2log = identity_map(num_layers, num_experts, num_experts + r)
    return placement_from_map(phy2log, num_experts, num_ranks, "engine default"), r


def staleness(loads: np.ndarray, num_ranks: int, redundant: int, groups: int) -> list[float]:
    """``s[k-1]``: max/mean of an EPLB map made on one window group and used ``k`` groups later, averaged."""
    from moesim.placement.eplb import placement_from_phy2log, rebalance_experts

    W, _, E = loads.shape
    plans = []
    for w in range(W):
        phy2log, _, _ = rebalance_experts(loads[w].astype(float), E + redundant, groups, 1, num_ranks)
        plans.append(placement_from_phy2log(phy2log, E, num_ranks, "eplb"))
    return [float(np.mean([imbalance(loads[w + k:w + k + 1], plans[w]) for w in range(W - k)]))
            for k in range(1, W)]


def _score_trace(dump: Trace | CountTrace, score: CountTrace, windows: np.ndarray, tokens: int,
                 rng: np.random.Generator) -> tuple[Trace, str | None]:
    """One batch of ``tokens`` tokens from the held-out windows: real tokens of a per-token dump, or the labelled
    synthetic expansion of a count dump's first held-out window with picks."""
    if isinstance(dump, Trace):
        window = as_counts_window(dump)
        keep = np.flatnonzero(np.isin(window, windows))[:tokens]
        sub = Trace(experts=dump.experts[keep], meta=dump.meta)
        return sub, None
    first = int(np.flatnonzero(score.loads.sum(axis=(1, 2)) > 0)[0])
    trace = expand_counts(score.windows(slice(first, first + 1)), tokens, rng)
    return Trace(experts=trace.experts, meta=trace.meta), trace.meta.source


def as_counts_window(dump: Trace) -> np.ndarray:
    """The window of each token of a per-token dump, as :func:`as_counts` counts them."""
    if dump.batch is not None and len(np.unique(dump.batch)) > 1:
        return np.asarray(dump.batch, dtype=np.int64)
    return (np.arange(dump.num_tokens) >= dump.num_tokens // 2).astype(np.int64)


def _split(ct: CountTrace) -> tuple[np.ndarray, np.ndarray, str]:
    """Windows to plan on, windows to score on, and a line saying so."""
    W = ct.num_windows
    if W < 2:
        idx = np.arange(W)
        return idx, idx, "the dump has one window: planned and scored on it (IN SAMPLE: the gains are optimistic)"
    half = W // 2
    plan, score = np.arange(half), np.arange(half, W)
    tok = ct.tokens()
    return plan, score, (f"planned on windows 0-{half - 1} ({int(tok[plan].sum())} tokens), scored on windows "
                         f"{half}-{W - 1} ({int(tok[score].sum())} tokens): out of sample")


def plan_from_dump(dump: Trace | CountTrace, scenario: Scenario, opts: PlanOptions,
                   step: Callable[[str], None] = lambda _: None) -> DumpPlan:
    """Plan, score and simulate every candidate (module docstring); ``scenario`` gives the cluster (its first),
    the model and the engine. ``step(name)`` is told of each step (progress)."""
    m, cluster = scenario.model, scenario.clusters[0]
    ct = as_counts(dump)
    for key, want in (("num_layers", m.num_layers), ("num_experts", m.num_experts), ("top_k", m.top_k)):
        if getattr(ct.meta, key) != want:
            raise InputError(f"the dump has {key}={getattr(ct.meta, key)}, the model {m.name} {want}",
                             source=ct.source, field=key)
    check_fits(scenario, cluster)
    plan_w, score_w, split = _split(ct)
    plan_loads, score_loads = ct.loads[plan_w], ct.loads[score_w]
    topo = build_topology(cluster.spec.at_sustained_clock() if scenario.sustained else cluster.spec)
    options = scenario.engine.options()
    costs = hardware_costs(topo, m, tp=cluster.tp, options=options, tokens_per_gpu=opts.tokens_per_gpu,
                           attention=scenario.attention)
    routing = None
    if isinstance(dump, Trace):  # the policies that read paths get the planning windows' own tokens
        routing = dump.experts[np.isin(as_counts_window(dump), plan_w)]
    problem = _problem(scenario, plan_loads.sum(axis=0).astype(float), routing, costs, opts.seed)
    current, cur_r = current_map(opts, m.num_layers, m.num_experts, cluster.ep)
    groups = m.expert_groups if m.num_experts % m.expert_groups == 0 else 1
    made = [("current", current, cur_r), *_policies(problem, opts, groups, step)]
    rng = np.random.default_rng(opts.seed)
    batch = opts.tokens_per_gpu * cluster.spec.num_gpus
    trace, synthetic = _score_trace(dump, ct.windows(score_w), score_w, batch, rng)
    sim = Simulation(topo, m, tp=cluster.tp, options=options, attention=scenario.attention)
    layout = trace.layout(cluster.spec.num_gpus, opts.tokens_per_gpu)
    cands = []
    for name, placement, r in made:
        step(f"simulating {name}")
        e2e = summarize(sim.run(trace, layout, placement, name=name, keep_collectives=False)).e2e_ms["mean"]
        cands.append(Candidate(name, placement, r, imbalance(plan_loads, placement),
                               imbalance(score_loads, placement), float(e2e)))
    grouped = _group(ct.loads, MAX_DRIFT_WINDOWS)
    best_r = min((c for c in cands if c.name.startswith("eplb")), key=lambda c: c.e2e_ms or 0.0,
                 default=cands[0]).redundant
    step("staleness")
    stale = staleness(grouped, cluster.ep, best_r, groups) if grouped.shape[0] > 1 else []
    return DumpPlan(cands, split, bool(plan_w[-1] < score_w[0]), synthetic, stale,
                    float(ct.tokens().sum()) / grouped.shape[0], trace.num_tokens,
                    {"windows": ct.num_windows, "window_groups": int(grouped.shape[0]),
                     "windows_per_group": ct.num_windows / grouped.shape[0], "dump_source": ct.meta.source})


@dataclass(frozen=True)
class Verdict:
    winner: str  # the candidate whose map to write
    eplb: str | None  # the EPLB candidate recommended (fewest redundant experts within 1% of EPLB's best)
    worth: bool  # its gain over the current map exceeds the model's error
    gain: float  # current e2e / that EPLB candidate's e2e
    rebalance_every: int | None  # window groups between rebalances; None: a static map
    lines: tuple[str, ...]


def expressible(c: Candidate, engine: str) -> str | None:
    """Why ``engine`` cannot load ``c``'s map, or None when it can."""
    from moesim.placement.export import get_writer, slot_map

    if get_writer(engine).render is None:
        return None
    try:
        slot_map(c.placement, engine)
    except InputError as exc:
        return exc.detail
    return None


def rebalance_interval(plan: DumpPlan, slope: float, batch_s: float) -> tuple[int | None, str]:
    """Window groups between rebalances (None: static) and why: a stale map's extra time against
    :data:`REBALANCE_S` per rebalance."""
    s = plan.staleness
    if len(s) < 2:
        return None, ("too few windows to see drift: keep the map static and re-run moesim plan on a newer dump "
                      "when traffic changes")
    group_s = batch_s * plan.window_tokens / max(plan.batch_tokens, 1)
    penalty = [slope * max(x / s[0] - 1, 0.0) * group_s for x in s]  # seconds lost per group, map k groups old
    cost = {n: (REBALANCE_S + sum(penalty[:n])) / n for n in range(1, len(s) + 1)}
    n_best = min(cost, key=lambda n: cost[n])
    static = penalty[-1]
    why = (f"an EPLB map used 1 window group after it was made leaves max/mean {s[0]:.3f}, {len(s)} groups after "
           f"{s[-1]:.3f} ({100 * (s[-1] / s[0] - 1):+.1f}%), costing ~{static * 1e3:.1f} ms per group of "
           f"{plan.window_tokens:.0f} tokens (~{group_s * 1e3:.1f} ms of serving); a rebalance costs ~{REBALANCE_S} s")
    if cost[n_best] < static:
        return n_best, why
    return None, why


def verdict(plan: DumpPlan, engine: str) -> Verdict:
    """Is EPLB worth enabling, with how many redundant experts, how often to rebalance; which map to write."""
    cur = plan.get("current")
    ok = [c for c in plan.candidates if c.e2e_ms is not None and expressible(c, engine) is None]
    fastest = min((c.e2e_ms or 0.0 for c in ok), default=0.0)
    close = [c for c in ok if (c.e2e_ms or 0.0) <= fastest * (1 + TIE)]  # the best balance among near-equals
    winner = min(close, key=lambda c: (c.imbalance_out, c.redundant)) if close else cur
    eplbs = [c for c in ok if c.name.startswith("eplb")]
    lines = []
    if not eplbs or cur.e2e_ms is None:
        return Verdict(winner.name, None, False, 1.0, None, ("no EPLB map fits this cluster's memory",))
    best = min(c.e2e_ms or 0.0 for c in eplbs)
    pick = min((c for c in eplbs if (c.e2e_ms or 0.0) <= best * 1.01), key=lambda c: c.redundant)
    gain = cur.e2e_ms / (pick.e2e_ms or cur.e2e_ms)
    worth = gain - 1 > GAIN_ERROR
    imb = (cur.imbalance_out / pick.imbalance_out - 1) if pick.imbalance_out > 0 else 0.0
    slope = min(max((gain - 1) / imb, 0.0), 1.0) if imb > 0.01 else 1.0
    every, why = rebalance_interval(plan, slope, (pick.e2e_ms or 0.0) / 1e3)
    if worth:
        lines.append(f"EPLB is worth enabling: {pick.redundant} redundant experts ({pick.name}) predict {gain:.3f}x "
                     f"vs the current map (+-{100 * GAIN_ERROR:.1f}%: {GAIN_ERROR_SOURCE})")
    else:
        lines.append(f"EPLB is not worth enabling here: its best map ({pick.name}) predicts {gain:.3f}x vs the "
                     f"current map, within the model's error on placement gains (+-{100 * GAIN_ERROR:.1f}%)")
    groups = plan.info.get("windows_per_group", 1.0)
    if every is None:
        lines.append(f"rebalance: no - a static map (TensorRT-LLM layer_updates_per_iter: 0, vLLM without online "
                     f"rebalancing); {why}")
    else:
        lines.append(f"rebalance every {every} window group(s) (~{every * groups:.0f} dump windows); {why}")
    lines.append("weigh online rebalancing with care: vLLM #50647 saw balancedness rise 0.936 -> 0.992 while "
                 "throughput fell 3.17x under synchronous rearrangement")
    return Verdict(winner.name, pick.name, worth, gain, every, tuple(lines))
