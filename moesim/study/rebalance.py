"""Rebalancing over time: re-plan a placement every few batches from recent load, and pay for the moves.

The scenario's ``rebalance`` section names one of its placements (made by a policy, e.g. ``eplb`` with
redundant experts). Three series are simulated batch by batch on the evaluation trace:

- *static*: that placement planned once on the profiling window, never changed;
- *rebalanced*: the same, but before every ``every_batches``-th batch the policy re-plans on the summed
  expert loads of the last ``window_batches`` batches. With ``incremental`` the new plan's GPUs are
  relabelled (per layer, greedily by overlap) so that as many (expert, GPU) copies as possible stay where
  they are - the plan's balance is unchanged, only fewer weights move (a hierarchical EPLB plan is
  relabelled node by node, so its expert groups stay on one node each);
- *baseline*: the scenario's baseline placement, static (when it is not the re-planned one).

Every copy the new plan needs that its GPU does not hold is a weight transfer from a GPU that holds it
(same node preferred, then the least busy sender), ``expert_weight_bytes / tp`` per GPU of the EP rank, lane
to lane. All of one rebalance's transfers run as one collective on the cluster's links
(:class:`moesim.sim.network.Fabric`, max-min fair flows). ``migration: stall`` adds that time before the
batch; ``overlap`` keeps serving on the old plan, each batch slowed by ``overlap_slowdown``, until the
transfers are done, and switches then. A re-plan point reached while a migration is still in flight is
skipped (counted in ``RebalanceResult.skipped``): the weights on their way are not abandoned.

Ignored: the memory a migration needs while old and new copies coexist, transfer traffic sharing links
with the batches' own all-to-alls (``overlap_slowdown`` stands for it), and the time to compute a plan
(:mod:`moesim.placement.eplb` takes milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import simpy

from moesim.errors import InputError
from moesim.hardware.topology import Topology
from moesim.metrics.summary import per_rank, skew
from moesim.placement.format import Placement
from moesim.placement.registry import PlacementProblem, make_placement
from moesim.placement.replication import placement_from_mask
from moesim.sim.engine import Simulation, SimRecords
from moesim.sim.network import Fabric
from moesim.study.config import ClusterEntry, RebalanceConfig, Scenario, check_rebalance_batches
from moesim.traces.format import Layout, Trace
from moesim.traces.stats import window_counts


@dataclass
class Migration:
    """One rebalance: when, what moved, and what it cost."""

    batch: int  # the new plan serves from this batch on (stall) or was requested here (overlap)
    copies_moved: int  # (layer, expert, EP rank) copies the new plan needs that were not there
    bytes_moved: float
    transfer_s: float  # the transfers as one collective on the fabric
    switched_at: int | None  # first batch served by the new plan (None: the run ended first)


@dataclass
class RebalanceResult:
    cluster: str
    placement: str
    config: RebalanceConfig
    batch_ms: dict[str, np.ndarray]  # series -> [B] per-batch end-to-end ms (rebalanced: incl. slowdown)
    imbalance: dict[str, np.ndarray]  # series -> [B] (max-mean)/mean tokens per EP rank, mean over layers
    stall_ms: np.ndarray  # [B] migration stall charged before each batch (stall mode)
    slow_ms: np.ndarray  # [B] extra time of batches slowed by an overlapped migration (included in batch_ms)
    plan_version: np.ndarray  # [B] which plan served each batch (0: the profiled one)
    migrations: list[Migration] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # re-plan points passed while a migration was in flight

    @property
    def num_batches(self) -> int:
        return int(self.plan_version.size)

    def totals_ms(self) -> dict[str, float]:
        out = {k: float(v.sum()) for k, v in self.batch_ms.items()}
        out["rebalanced_with_migration"] = out["rebalanced"] + float(self.stall_ms.sum())
        return out

    def summary(self) -> dict[str, Any]:
        """Flat figures: totals, gains (gross = before migration cost, net = after), migration cost."""
        tot = self.totals_ms()
        static = tot["static"]
        migr = self.migration_cost_ms()
        served = self.batch_ms["rebalanced"] - self.slow_ms  # what the plans served in, migration aside
        saving = float((self.batch_ms["static"] - served).sum())
        if abs(saving) <= 1e-9 * max(static, 1e-300):  # identical plans: rounding noise, not a saving
            saving = 0.0
        gross = saving / static if static > 0 else 0.0
        net = (static - tot["rebalanced_with_migration"]) / static if static > 0 else 0.0
        per = self.mean_cost_per_rebalance_ms()
        # a re-plan can only save from the first rebalance on: the saving per batch is over those batches
        first = self.migrations[0].batch if self.migrations else self.num_batches
        saving_per_batch = saving / (self.num_batches - first) if self.num_batches > first else 0.0
        out: dict[str, Any] = {
            "cluster": self.cluster, "placement": self.placement, "every_batches": self.config.every_batches,
            "window_batches": self.config.window_batches, "incremental": self.config.incremental,
            "migration": self.config.migration, "batches": self.num_batches, "rebalances": len(self.migrations),
            "skipped_rebalances": len(self.skipped),
            "total_ms": tot, "gross_gain": gross, "net_gain": net, "migration_cost_ms": migr,
            "cost_per_rebalance_ms": per, "saving_per_batch_ms": saving_per_batch,
            "break_even_every_batches": break_even(per, saving_per_batch),
            "copies_moved": sum(m.copies_moved for m in self.migrations),
            "GB_moved": sum(m.bytes_moved for m in self.migrations) / 1e9,
            "imbalance_mean": {k: float(v.mean()) for k, v in self.imbalance.items()},
        }
        return out

    def slowdown_ms(self) -> float:
        """Extra time of batches slowed by overlapped migrations."""
        return float(self.slow_ms.sum())

    def migration_cost_ms(self) -> float:
        return float(self.stall_ms.sum()) + self.slowdown_ms()

    def mean_cost_per_rebalance_ms(self) -> float:
        return self.migration_cost_ms() / len(self.migrations) if self.migrations else 0.0


def break_even(cost_per_rebalance_ms: float, saving_per_batch_ms: float) -> float | None:
    """Rebalance interval (batches) below which migrations cost more than a fresher plan saves: one
    rebalance's cost over the saving per batch served by re-planned placements, assuming that saving does not
    depend on the interval; None when rebalancing saves nothing."""
    if saving_per_batch_ms <= 0:
        return None
    return cost_per_rebalance_ms / saving_per_batch_ms


def batch_loads(trace: Trace, layout: Layout) -> np.ndarray:
    """[batches, layers, experts] token-expert pairs per expert in each batch."""
    return window_counts(trace, layout.batch.astype(np.int64)).astype(float)


def held_mask(placement: Placement) -> np.ndarray:
    """[layers, experts, ranks] True where a rank holds a copy."""
    L, E, W = placement.gpus.shape
    held = np.zeros((L, E, placement.num_ranks), dtype=bool)
    l, e, r = np.nonzero(placement.gpus >= 0)
    held[l, e, placement.gpus[l, e, r]] = True
    return held


def _greedy_match(score: np.ndarray) -> np.ndarray:
    """Per layer, a one-to-one map ``perm[l, r] = s`` taking the highest-scoring free (r, s) pair first;
    ``score [L, R, R]`` >= 0 where allowed, negative where not (forbidden pairs are taken last)."""
    L, R, _ = score.shape
    score = score.astype(float).copy()
    perm = np.full((L, R), -1, dtype=np.int64)
    rows = np.arange(L)
    for _ in range(R):
        flat = score.reshape(L, R * R).argmax(axis=1)
        r, s = flat // R, flat % R
        perm[rows, r] = s
        score[rows, r, :] = -np.inf
        score[rows, :, s] = -np.inf
    return perm


def relabel_for_overlap(new: Placement, old: Placement, ranks_per_node: int | None = None) -> Placement:
    """``new`` with its EP ranks permuted per layer (greedy maximum overlap) to keep copies in place.

    A plan whose ``info["mode"]`` is ``hierarchical`` (EPLB with expert groups packed onto nodes) keeps its
    node structure: its nodes are matched to the old plan's nodes first, then ranks inside matched nodes,
    so a group's copies stay together on one node."""
    a, b = held_mask(new), held_mask(old)
    L, E, R = a.shape
    overlap = np.einsum("ler,les->lrs", a.astype(np.int32), b.astype(np.int32)).astype(float)  # new r ~ old s
    rpn = ranks_per_node or R
    if new.info.get("mode") == "hierarchical" and 1 <= rpn < R and R % rpn == 0:
        N = R // rpn
        node_perm = _greedy_match(overlap.reshape(L, N, rpn, N, rpn).sum(axis=(2, 4)))  # new node -> old node
        node = np.arange(R) // rpn
        allowed = node_perm[:, node][:, :, None] == node[None, None, :]  # [L, r, s]
        overlap = np.where(allowed, overlap, -1.0)
    perm = _greedy_match(overlap)
    rows = np.arange(L)
    moved = np.zeros_like(a)
    moved[rows[:, None, None], np.arange(E)[None, :, None], perm[:, None, :]] = a
    return placement_from_mask(moved, new.policy, {**new.info, "relabelled": True})


def migration_bytes(old: Placement, new: Placement, *, tp: int, ranks_per_node: int,
                    expert_bytes: float) -> tuple[np.ndarray, int]:
    """[G, G] bytes each GPU sends to bring every missing copy of ``new``, and the copies moved.

    A missing (layer, expert, rank) copy comes from a rank holding the expert in ``old``: one on the same
    node if any, else any; among those the one that has sent least so far. Each GPU of the rank gets its
    ``1 / tp`` shard from the GPU of the same lane."""
    a, b = held_mask(new), held_mask(old)
    R = old.num_ranks
    need_l, need_e, need_r = np.nonzero(a & ~b)
    sent = np.zeros(R)
    out = np.zeros((R, R))
    node = np.arange(R) // max(ranks_per_node, 1)
    share = expert_bytes  # per rank; split over lanes below
    for l, e, r in zip(need_l.tolist(), need_e.tolist(), need_r.tolist()):
        holders = np.flatnonzero(b[l, e])
        near = holders[node[holders] == node[r]]
        pool = near if near.size else holders
        src = int(pool[np.argmin(sent[pool])])
        sent[src] += share
        out[src, r] += share
    G = R * tp
    gpu_bytes = np.zeros((G, G))
    lanes = np.arange(tp)
    for s, d in zip(*np.nonzero(out)):
        gpu_bytes[s * tp + lanes, d * tp + lanes] += out[s, d] / tp
    return gpu_bytes, int(need_l.size)


def transfer_time(topo: Topology, sim: Simulation, nbytes: np.ndarray) -> float:
    """Seconds to move ``nbytes [G, G]`` as one collective on the cluster's links (max-min fair flows)."""
    if not (nbytes > 0).any():
        return 0.0
    env = simpy.Environment()
    fabric = Fabric(env, topo, rate_tolerance=sim.options.rate_tolerance, routing=sim.routing)
    env.process(fabric.collective("migration", nbytes))
    env.run()
    return float(env.now)


def _imbalance(tokens: np.ndarray, tp: int) -> float:
    """Mean over layers of (max - mean) / mean tokens per EP rank; ``tokens`` [layers, GPUs]."""
    return float(skew(per_rank(tokens, tp))["imbalance"].mean())


class BatchRunner:
    """Simulates single batches under given placements, remembering what it ran (plans are reused across
    series and interval settings)."""

    def __init__(self, sim: Simulation, trace: Trace, layout: Layout, tp: int) -> None:
        self.sim, self.trace, self.layout, self.tp = sim, trace, layout, tp
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._keep: list[Placement] = []  # keeps ids unique while cached

    def seed(self, placement: Placement, records: SimRecords) -> None:
        """Remember the batches of a whole-trace run of ``placement`` (same trace and layout)."""
        for b in range(len(records.batch_end)):
            self._cache[(id(placement), b)] = (float(records.batch_end[b] - records.batch_start[b]) * 1e3,
                                               _imbalance(records.gpu["tokens"][b], self.tp))
        self._keep.append(placement)

    def run(self, placement: Placement, b: int) -> tuple[float, float]:
        """(end-to-end ms, imbalance) of batch ``b`` under ``placement``."""
        key = (id(placement), b)
        if key not in self._cache:
            one = Layout(home=self.layout.home, batch=np.where(self.layout.batch == b, 0, 1).astype(np.int32),
                         num_batches=1)
            rec = self.sim.run(self.trace, one, placement, keep_collectives=False)
            self._cache[key] = (float(rec.batch_end[0] - rec.batch_start[0]) * 1e3,
                                _imbalance(rec.gpu["tokens"][0], self.tp))
            self._keep.append(placement)
        return self._cache[key]


def simulate_rebalancing(scenario: Scenario, cluster: ClusterEntry, topo: Topology, sim: Simulation,
                         trace: Trace, layout: Layout, problem: PlacementProblem, static: Placement,
                         baseline: Placement | None, config: RebalanceConfig, *,
                         options: dict[str, Any] | None = None, runner: BatchRunner | None = None,
                         progress: Callable[[int], object] | None = None) -> RebalanceResult:
    """The static / rebalanced / baseline series for one cluster (see the module docstring).

    ``static`` is the placement planned on the profile; ``options`` are its policy options (default: the
    scenario entry's); ``runner`` may be shared between calls on the same trace to reuse simulated batches.
    """
    entry = next(p for p in scenario.placements if p.name == config.policy)
    opts = dict(entry.options if options is None else options)
    B = layout.num_batches
    check_rebalance_batches(config.every_batches, config.window_batches, B, scenario.source)
    runner = runner or BatchRunner(sim, trace, layout, cluster.tp)
    loads = batch_loads(trace, layout)
    rpn = cluster.spec.gpus_per_node // cluster.tp
    expert_bytes = scenario.model.expert_weight_bytes

    series = ("static", "rebalanced") + (("baseline",) if baseline is not None else ())
    series_ms = {k: np.zeros(B) for k in series}
    series_imb = {k: np.zeros(B) for k in series}
    stall = np.zeros(B)
    slow = np.zeros(B)
    version = np.zeros(B, dtype=np.int64)
    migrations: list[Migration] = []
    skipped: list[int] = []
    active = static
    pending: Placement | None = None  # overlap: the plan whose weights are on their way
    left_ms = 0.0  # ... and the transfer time still to go
    for b in range(B):
        if pending is not None and left_ms <= 0:  # the weights arrived during the previous batch
            active, pending = pending, None
            migrations[-1].switched_at = b
        if b and b % config.every_batches == 0:
            if pending is not None:  # the previous migration is still in flight: this re-plan is dropped
                skipped.append(b)
            else:
                window = loads[max(0, b - config.window_batches) : b].sum(axis=0)
                fresh = _replan(scenario, entry.policy or "", replace(problem, load=window), opts)
                if config.incremental:
                    fresh = relabel_for_overlap(fresh, active, rpn)
                nbytes, moved = migration_bytes(active, fresh, tp=cluster.tp, ranks_per_node=rpn,
                                                expert_bytes=expert_bytes)
                t_ms = transfer_time(topo, sim, nbytes) * 1e3
                migrations.append(Migration(batch=b, copies_moved=moved, bytes_moved=float(nbytes.sum()),
                                            transfer_s=t_ms / 1e3, switched_at=None))
                if config.migration == "stall" or t_ms <= 0:
                    stall[b] = t_ms
                    active = fresh
                    migrations[-1].switched_at = b
                else:
                    pending, left_ms = fresh, t_ms
        ms, imb = runner.run(active, b)
        if pending is not None:  # serving on the old plan while weights move, slowed
            slow[b] = ms * config.overlap_slowdown
            ms += slow[b]
            left_ms -= ms
        series_ms["rebalanced"][b], series_imb["rebalanced"][b] = ms, imb
        version[b] = sum(m.switched_at is not None for m in migrations)
        series_ms["static"][b], series_imb["static"][b] = runner.run(static, b)
        if baseline is not None:
            series_ms["baseline"][b], series_imb["baseline"][b] = runner.run(baseline, b)
        if progress is not None:
            progress(1)
    return RebalanceResult(cluster=cluster.name, placement=config.policy, config=config, batch_ms=series_ms,
                           imbalance=series_imb, stall_ms=stall, slow_ms=slow, plan_version=version,
                           migrations=migrations, skipped=skipped)


def _replan(scenario: Scenario, policy: str, problem: PlacementProblem, options: dict[str, Any]) -> Placement:
    try:
        return make_placement(policy, problem, **options)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(str(exc.args[0]) if exc.args else str(exc), source=scenario.source,
                         field="rebalance.policy") from None


def run_rebalance(scenario: Scenario, cluster: ClusterEntry, topo: Topology, sim: Simulation, trace: Trace,
                  layout: Layout, problem: PlacementProblem, placements: dict[str, Placement], *,
                  records: dict[str, SimRecords] | None = None,
                  progress: Callable[[int], object] | None = None) -> RebalanceResult:
    """The scenario's ``rebalance`` study on one cluster, with the placements the study already made
    (and, in ``records``, their whole-trace runs, so their batches are not simulated again)."""
    config = scenario.rebalance
    assert config is not None
    runner = BatchRunner(sim, trace, layout, cluster.tp)
    for name, rec in (records or {}).items():
        runner.seed(placements[name], rec)
    baseline = placements.get(scenario.baseline) if scenario.baseline != config.policy else None
    return simulate_rebalancing(scenario, cluster, topo, sim, trace, layout, problem, placements[config.policy],
                                baseline, config, runner=runner, progress=progress)
