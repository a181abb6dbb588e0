"""Training studies: step time and tokens/s of expert layouts - static expert parallelism, periodic
rearrangement, Hecate's FSSDP - on the scenario's clusters, step by step over drifting routing.

The scenario's ``workload.phase: train`` and ``training`` section (:mod:`moesim.study.train_config`) say how.
Each cluster is cut to its first pipeline stage (``nodes / pp`` nodes, ``ceil(layers / pp)`` MoE layers) and
prepared as any study (:func:`moesim.study.plan.prepare`: topology, workload, hardware costs, the layouts'
placements planned on the profile). Every trace batch is one training step: its routing drives one micro-batch
through the stage (:func:`moesim.sim.training.run_micro_batch`), and the step is assembled from it
(:func:`moesim.sim.training.step_seconds`) with the gradient all-reduce of the non-expert parameters (and,
with expert-data-parallel groups, of the expert gradients) as ring all-reduces on the cluster's links, Adam
over the local parameters, and:

- ``ep``: the static placement all along;
- ``rearrange``: before every ``every_steps``-th step the policy re-plans on the last ``window_steps`` steps'
  loads; the moved copies' parameters and optimizer states travel (:func:`moesim.study.rebalance.
  migration_bytes`, one collective) while training stalls;
- ``fssdp``: every step the materialisation policy plans on the predicted loads (the previous step's, or the
  step's own), tokens go to the materialised copies (``replica_rule``), and each layer pays a
  SparseAllGather and SparseReduceScatter (:mod:`moesim.placement.fssdp`) from the shards ``sharding`` chose
  (its reference placement is the layout's policy planned on the profile).

Memory per GPU is counted (:mod:`moesim.metrics.training`) and a layout that does not fit is flagged, not run
as if it did: its results carry ``fits: false`` and the verdict skips it. Ignored: the time to plan a
placement each step (Hecate and EPLB plan in milliseconds), and the memory a migration needs in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from moesim.errors import InputError
from moesim.metrics.training import Memory, imbalance, local_params, memory_per_gpu, non_expert_params
from moesim.placement.format import Placement
from moesim.placement.fssdp import (
    everywhere, held, lanes, make_shards, sparse_allgather_bytes, sparse_reduce_scatter_bytes,
)
from moesim.placement.registry import PlacementProblem, make_placement
from moesim.sim.compute import attention_backward_time
from moesim.sim.replicas import ReplicaChooser
from moesim.sim.traffic import hierarchical_bytes, layer_traffic
from moesim.sim.training import (
    CollectiveTimer, LayerStep, MicroBatch, TrainOptions, adam_seconds, allreduce_bytes, backward_kernels,
    comm_slowdown, layer_kernels, run_micro_batch, step_seconds,
)
from moesim.study.config import Scenario
from moesim.study.plan import ClusterPlan, StudyPlan, prepare
from moesim.study.rebalance import migration_bytes
from moesim.study.train_config import LayoutEntry, TrainingConfig

Progress = Callable[[str], object]


@dataclass
class LayoutRun:
    """One layout on one cluster, step by step."""

    cluster: str
    name: str
    kind: str
    step_s: list[dict[str, float]] = field(default_factory=list)  # step_seconds' parts, per step
    micro: list[MicroBatch] = field(default_factory=list)
    imbalance: list[float] = field(default_factory=list)  # (max - mean) / mean expert rows per GPU, mean over layers
    fssdp_bytes: list[float] = field(default_factory=list)  # per step: gathered + reduce-scattered bytes per GPU
    migrations: int = 0
    migrated_bytes: float = 0.0
    memory: Memory | None = None
    tokens_per_step: float = 0.0

    @property
    def mean_step_s(self) -> float:
        return float(np.mean([s["step"] for s in self.step_s]))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.mean_step_s

    def terms_ms(self) -> dict[str, float]:
        """Where one micro-batch's time went (mean over steps), in ms."""
        keys = sorted({k for m in self.micro for k in m.terms})
        return {k: 1e3 * float(np.mean([m.terms.get(k, 0.0) for m in self.micro])) for k in keys}

    def summary(self) -> dict[str, Any]:
        parts = {k: 1e3 * float(np.mean([s[k] for s in self.step_s])) for k in self.step_s[0]}
        assert self.memory is not None
        return {"cluster": self.cluster, "layout": self.name, "kind": self.kind, "step_ms": parts,
                "tokens_per_s": self.tokens_per_s, "imbalance": float(np.mean(self.imbalance)),
                "overlap_share": float(np.mean([m.overlap_share for m in self.micro])),
                "fssdp_GB_per_step": float(np.mean(self.fssdp_bytes)) / 1e9 if self.fssdp_bytes else 0.0,
                "migrations": self.migrations, "migrated_GB": self.migrated_bytes / 1e9,
                "memory_GB": self.memory.as_gb(), "fits": self.memory.fits, "micro_batch_ms": self.terms_ms()}


@dataclass
class TrainingResult:
    scenario: Scenario
    runs: list[LayoutRun]

    def summary(self) -> dict[str, Any]:
        base = self.scenario.training.baseline_name if self.scenario.training else ""
        out = []
        for r in self.runs:
            ref = next(b for b in self.runs if b.cluster == r.cluster and b.name == base)
            out.append({**r.summary(), "speedup_vs_baseline": ref.mean_step_s / r.mean_step_s})
        return {"format": "moesim.training/1", "scenario": self.scenario.name, "baseline": base, "runs": out}


def stage_scenario(scenario: Scenario) -> Scenario:
    """The scenario cut to its first pipeline stage: ``nodes / pp`` nodes per cluster, ``ceil(L / pp)`` layers."""
    cfg = scenario.training
    assert cfg is not None
    pp = cfg.pp
    if pp == 1:
        return scenario
    clusters = []
    for c in scenario.clusters:
        if c.spec.nodes % pp:
            raise InputError(f"pp={pp} must divide the {c.spec.nodes} nodes of cluster {c.name}",
                             source=scenario.source, field="training.pp")
        clusters.append(c.model_copy(update={"spec": c.spec.model_copy(update={"nodes": c.spec.nodes // pp})}))
    model = scenario.model.model_copy(update={"num_layers": -(-scenario.model.num_layers // pp)})
    return scenario.model_copy(update={"clusters": tuple(clusters), "model": model})


def train_options(cfg: TrainingConfig, gpu_backward: float = 2.0) -> TrainOptions:
    """The engine's training options; the GEMMs' backward ratio is the scenario's or else the GPU's."""
    return TrainOptions(pp=cfg.pp, micro_batches=cfg.micro_batches, overlap=cfg.overlap,
                        overlap_grad_sync=cfg.overlap_grad_sync, prefetch=cfg.prefetch, recompute=cfg.recompute,
                        grad_bytes=cfg.grad_bytes, optimizer_bytes=cfg.optimizer_bytes,
                        gemm_backward=cfg.gemm_backward if cfg.gemm_backward is not None else gpu_backward)


def group_problem(problem: PlacementProblem, ep: int) -> PlacementProblem:
    """The placement problem of one expert-parallel group of ``ep`` ranks (the first ones)."""
    costs = problem.costs
    if costs.rank_s_per_byte is not None:
        costs = replace(costs, rank_s_per_byte=costs.rank_s_per_byte[:ep, :ep])
    return replace(problem, num_ranks=ep, gpus_per_node=min(problem.gpus_per_node, ep),
                   slots_per_gpu=-(-problem.num_experts // ep), costs=costs, max_slots_per_gpu=None)


def expand_groups(group: Placement, num_ranks: int) -> Placement:
    """A group's placement copied to every expert-parallel group of the stage (ranks ``j x ep + r``)."""
    ep = group.num_ranks
    copies = [np.where(group.gpus >= 0, group.gpus + j * ep, -1) for j in range(num_ranks // ep)]
    return Placement(num_ranks=num_ranks, gpus=np.concatenate(copies, axis=2).astype(np.int32),
                     policy=group.policy, info=group.info)


class StageRunner:
    """One cluster's stage: builds each step's layers under a placement and times them."""

    def __init__(self, study: StudyPlan, cp: ClusterPlan, cfg: TrainingConfig) -> None:
        self.study, self.cp, self.cfg = study, cp, cfg
        self.scenario = study.scenario
        self.model, self.options = self.scenario.model, study.options
        self.tp = cp.cluster.tp
        self.G = cp.cluster.spec.num_gpus
        self.R = self.G // self.tp
        self.gpn = cp.cluster.spec.gpus_per_node
        self.train = train_options(cfg, cp.cluster.spec.gpu.gemm_backward)
        self.timer = CollectiveTimer(cp.topology, rate_tolerance=self.options.rate_tolerance, a2a=self.options.a2a)
        self.slow = comm_slowdown(cp.topology, self.options) if cfg.overlap == "dualpipe" else 1.0
        assert cp.workload is not None and cp.problem is not None
        self.work = cp.workload
        self.batches = self.work.layout.batch_indices()
        self.layers = range(self.model.num_layers)
        self.expert_params = 3.0 * self.model.d_model * self.model.d_ff
        self.ep = cfg.ep or self.R
        # the simulated layers stand for the whole stage's (training.model_layers)
        self.scale = -(-cfg.model_layers // cfg.pp) / len(self.layers) if cfg.model_layers else 1.0
        if self.R % self.ep:
            raise InputError(f"ep={self.ep} must divide the stage's {self.R} EP ranks on cluster {cp.cluster.name}",
                             source=self.scenario.source, field="training.ep")

    def step_loads(self, b: int) -> np.ndarray:
        """[layers, experts] token-expert pairs of step ``b``."""
        picks = self.work.trace.experts[self.batches[b]]
        E = self.model.num_experts
        return np.stack([np.bincount(picks[:, l][picks[:, l] >= 0].ravel(), minlength=E)
                         for l in self.layers]).astype(float)

    def traffic(self, b: int, placement: Placement,
                rule: str) -> list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Per layer of step ``b``: home tokens [G], expert rows [G, E], and the four all-to-alls' matrices."""
        idx = self.batches[b]
        home = self.work.layout.home[idx]
        held_tokens = np.bincount(home, minlength=self.G)
        chooser = ReplicaChooser(rule, placement, self.gpn // self.tp)
        hier = self.options.a2a == "hierarchical" and self.cp.cluster.spec.nodes > 1
        dedup = self.options.dedup and self.options.a2a != "low_latency"
        m = self.model
        out = []
        for l in self.layers:
            picks = self.work.trace.experts[idx, l, :]
            tr = layer_traffic(picks, home, idx, placement.gpus[l], num_gpus=self.G, tp=self.tp,
                               num_experts=m.num_experts, dedup=dedup, gpus_per_node=self.gpn if hier else None,
                               replica_ranks=chooser.ranks(l, picks, home // self.tp))

            def mat(per_copy: float) -> np.ndarray:
                if hier:
                    assert tr.node_copies is not None
                    return hierarchical_bytes(tr.copies, tr.node_copies, self.gpn, per_copy)
                return tr.copies * per_copy

            grads = m.dispatch_bytes if self.cfg.fp8_gradient_dispatch else m.combine_bytes
            mats = {"dispatch": mat(m.dispatch_bytes), "combine": mat(m.combine_bytes).T,
                    "combine_bwd": mat(grads), "dispatch_bwd": mat(m.combine_bytes).T}
            out.append((held_tokens, tr.expert_tokens, mats))
        return out

    def layer_steps(self, b: int, placement: Placement, rule: str) -> tuple[list[LayerStep], list[np.ndarray]]:
        """The layers of step ``b`` ready to time, and each layer's expert rows per rank [R, E]."""
        steps, rows_by_rank = [], []
        rank_of_gpu = np.arange(self.G) // self.tp
        for l, (home, ranks_rows, mats) in zip(self.layers, self.traffic(b, placement, rule)):
            rows = ranks_rows[rank_of_gpu]
            attention = self.scenario.attention
            fwd = layer_kernels(home, rows, self.model, self.cp.topology, layer=l, tp=self.tp, options=self.options,
                                attention=attention)
            core = None if attention is None else {"attn_core": attention_backward_time(
                home, self.model, self.cp.cluster.spec.gpu, attention, layer=self.model.moe_layer_index(l))}
            bwd = backward_kernels(fwd, self.train.gemm_backward, core)
            steps.append(LayerStep(fwd=fwd, bwd=bwd, mats=mats))
            rows_by_rank.append(ranks_rows)
        return steps, rows_by_rank

    def grad_sync_s(self, expert_dp_params: float) -> float:
        """Ring all-reduces of the non-expert gradients over data parallelism (per TP lane) and of the expert
        gradients over the expert-data-parallel groups; one after the other."""
        dense = non_expert_params(self.model, self.layers) / self.tp * self.train.grad_bytes
        t = float(self.timer.durations(allreduce_bytes(self.G, self.gpn, self.tp, dense), "grad_allreduce").max())
        if expert_dp_params > 0 and self.R // self.ep > 1:
            nbytes = allreduce_bytes(self.G, self.gpn, self.ep * self.tp,
                                     expert_dp_params * self.train.grad_bytes)
            t += float(self.timer.durations(nbytes, "expert_grad_allreduce").max())
        return t

    def memory(self, expert_params: float, max_rows: float, expert_dp: int = 1) -> Memory:
        home = float(self.work.trace.num_tokens) / max(self.work.layout.num_batches * self.G, 1)
        mem = memory_per_gpu(self.model, self.layers, self.train, tp=self.tp, dp=self.G // self.tp,
                             expert_params=expert_params, capacity_GB=self.cp.cluster.spec.gpu.memory_GB,
                             home_tokens=home, max_rows=max_rows, shard_optimizer=self.cfg.shard_optimizer)
        if expert_dp > 1 and self.cfg.shard_optimizer:  # expert optimizer states sharded over the groups too
            saved = expert_params * self.train.optimizer_bytes * (1 - 1 / expert_dp)
            mem = replace(mem, optimizer=mem.optimizer - saved)
        k = self.scale
        return replace(mem, params=mem.params * k, grads=mem.grads * k, optimizer=mem.optimizer * k,
                       activations=mem.activations * k)

    def scaled(self, parts: dict[str, float]) -> dict[str, float]:
        """A step's parts for the whole stage (:attr:`scale` times the simulated layers')."""
        return {k: v * self.scale for k, v in parts.items()}

    def optimizer_s(self, expert_params: float, expert_dp: int = 1) -> float:
        own = expert_params / expert_dp if self.cfg.shard_optimizer else expert_params
        return adam_seconds(local_params(self.model, self.layers, tp=self.tp, dp=self.G // self.tp, expert_params=own,
                                         shard_optimizer=self.cfg.shard_optimizer), self.cp.topology)

    def tokens_per_step(self) -> float:
        return float(self.work.trace.num_tokens) / self.work.layout.num_batches * self.train.micro_batches

    def group_of(self, entry: LayoutEntry) -> int:
        """EP ranks per group the layout plans over (``training.ep``, or an fssdp layout's ``group``)."""
        size = (entry.group or self.R) if entry.kind == "fssdp" else self.ep
        if self.R % size:
            raise InputError(f"{size} must divide the stage's {self.R} EP ranks on cluster {self.cp.cluster.name}",
                             source=self.scenario.source, field=f"training.layouts.{entry.name}")
        return size

    def static_placement(self, entry: LayoutEntry) -> Placement:
        """The layout's placement planned on the profile (over one group, copied to every group)."""
        size = self.group_of(entry)
        if size == self.R:
            return self.cp.placement(entry.name)
        assert self.cp.problem is not None
        group = make_placement(entry.placement, group_problem(self.cp.problem, size), **entry.options)
        return expand_groups(group, self.R)

    def replan(self, entry: LayoutEntry, load: np.ndarray, num_ranks: int) -> Placement:
        assert self.cp.problem is not None
        problem = replace(self.cp.problem, load=load, routing=None)
        if num_ranks != self.R:
            return expand_groups(make_placement(entry.placement, group_problem(problem, num_ranks), **entry.options),
                                 self.R)
        return make_placement(entry.placement, problem, **entry.options)


def run_ep(st: StageRunner, entry: LayoutEntry, progress: Progress | None = None) -> LayoutRun:
    """A static or periodically rearranged expert-parallel layout, step by step."""
    run = LayoutRun(st.cp.cluster.name, entry.name, entry.kind, tokens_per_step=st.tokens_per_step())
    placement = st.static_placement(entry)
    rule = "local" if st.ep < st.R else st.options.replica_rule  # local: the copy in the token's own group
    copies_max = float(placement.copies_per_gpu().sum(axis=0).max())
    expert_dp = st.R // st.ep
    per_gpu = copies_max * st.expert_params / st.tp
    history: list[np.ndarray] = []
    peak_rows = 0.0
    for b in range(len(st.batches)):
        stall = 0.0
        if entry.kind == "rearrange" and b > 0 and b % entry.every_steps == 0:
            new = st.replan(entry, np.sum(history[-entry.window_steps:], axis=0), st.ep)
            nbytes, moved = migration_bytes(placement, new, tp=st.tp, ranks_per_node=st.gpn // st.tp,
                                            expert_bytes=st.expert_params * (st.train.param_bytes
                                                                            + st.train.optimizer_bytes))
            stall = float(st.timer.durations(nbytes, "migration").max())
            run.migrations += 1
            run.migrated_bytes += float(nbytes.sum())
            placement = new
        layers, rows = st.layer_steps(b, placement, rule)
        mb = time_micro_batch(st, layers)
        run.micro.append(mb)
        run.imbalance.append(float(np.mean([imbalance(r.sum(axis=1)) for r in rows])))
        peak_rows = max(peak_rows, max(float(r.sum(axis=1).max()) for r in rows))
        run.step_s.append(st.scaled(step_seconds(mb, st.train, grad_sync_s=st.grad_sync_s(per_gpu), stall_s=stall,
                                                 optimizer_s=st.optimizer_s(per_gpu, expert_dp))))
        history.append(st.step_loads(b))
        if progress is not None:
            progress(entry.name)
    run.memory = st.memory(per_gpu, peak_rows, expert_dp)
    return run


def time_micro_batch(st: StageRunner, layers: list[LayerStep], rematerialize: bool = False) -> MicroBatch:
    """One micro-batch of ``layers`` on the stage's fabric (:func:`moesim.sim.training.run_micro_batch`)."""
    return run_micro_batch(layers, st.timer, st.train, slowdown=st.slow, rematerialize=rematerialize)


def _fssdp_collectives(st: StageRunner, layers: list[LayerStep], rows: list[np.ndarray], mat: Placement,
                       shards: np.ndarray, sparse: bool) -> tuple[float, np.ndarray]:
    """Attach each layer's SparseAllGather and SparseReduceScatter; return the bytes per GPU and the
    materialised parameters [layers, R] each rank holds beyond its own shard."""
    mask_all = held(mat)
    W = st.expert_params
    total = 0.0
    extra = np.zeros((len(layers), st.R))
    for l, (lp, r) in enumerate(zip(layers, rows)):
        mask = mask_all[l] & (r.T > 0) if sparse else mask_all[l]  # [E, R]
        gather = sparse_allgather_bytes(mask, shards[l], W * st.train.param_bytes)
        reduce = sparse_reduce_scatter_bytes(mask, shards[l], W * st.train.grad_bytes)
        lp.gather, lp.reduce = lanes(gather, st.tp), lanes(reduce, st.tp)
        total += float(gather.sum() + reduce.sum()) / st.G
        extra[l] = (mask * (1.0 - shards[l])).sum(axis=0) * W / st.tp
    return total, extra


def run_fssdp(st: StageRunner, entry: LayoutEntry, progress: Progress | None = None) -> LayoutRun:
    """Hecate's FSSDP, step by step (module docstring)."""
    run = LayoutRun(st.cp.cluster.name, entry.name, entry.kind, tokens_per_step=st.tokens_per_step())
    reference = st.static_placement(entry) if entry.placement != "everywhere" else st.cp.placement(entry.name)
    size = st.group_of(entry)
    shards = make_shards(entry.sharding, reference, st.gpn // st.tp)
    m = st.model
    owned = float(shards.sum(axis=(0, 1)).max()) * st.expert_params / st.tp
    assert st.cp.problem is not None
    load = st.cp.problem.load
    peak_mat = peak_layer = peak_rows = 0.0
    for b in range(len(st.batches)):
        if entry.predict == "current":
            load = st.step_loads(b)
        mat = (everywhere(m.num_layers, m.num_experts, st.R) if entry.placement == "everywhere"
               else st.replan(entry, load, size))
        layers, rows = st.layer_steps(b, mat, entry.replica_rule)
        nbytes, extra = _fssdp_collectives(st, layers, rows, mat, shards, entry.sparse)
        mb = time_micro_batch(st, layers, entry.rematerialize)
        run.micro.append(mb)
        run.fssdp_bytes.append(nbytes)
        run.imbalance.append(float(np.mean([imbalance(r.sum(axis=1)) for r in rows])))
        peak_rows = max(peak_rows, max(float(r.sum(axis=1).max()) for r in rows))
        at_once = extra.max(axis=0).max() * 2 if entry.rematerialize else extra.sum(axis=0).max()
        peak_mat, peak_layer = max(peak_mat, float(at_once)), max(peak_layer, float(extra.max()))
        run.step_s.append(st.scaled(step_seconds(mb, st.train, grad_sync_s=st.grad_sync_s(0.0),
                                                 optimizer_s=st.optimizer_s(owned))))
        load = st.step_loads(b)
        if progress is not None:
            progress(entry.name)
    mem = st.memory(owned, peak_rows)
    per_step = peak_mat * (1.0 if entry.rematerialize else st.scale)  # all layers' materialised copies, or two
    run.memory = replace(mem, materialised=per_step * st.train.param_bytes + peak_layer * st.train.grad_bytes)
    return run


def run_training(scenario: Scenario, *, progress: Progress | None = None,
                 layouts: list[str] | None = None) -> TrainingResult:
    """Every layout of the scenario's training section (or those named) on every cluster."""
    cfg = scenario.training
    if cfg is None:
        raise ValueError(f"scenario {scenario.name} has no training section (workload.phase: train)")
    study = prepare(stage_scenario(scenario))
    runs = []
    for cp in study.clusters:
        st = StageRunner(study, cp, cfg)
        for entry in cfg.layouts:
            if layouts is not None and entry.name not in layouts:
                continue
            runs.append(run_fssdp(st, entry, progress) if entry.kind == "fssdp" else run_ep(st, entry, progress))
    return TrainingResult(scenario, runs)


def verdict(result: TrainingResult) -> list[str]:
    """Per cluster: the fastest layout that fits memory, by how much against the baseline, and why."""
    lines = []
    base = result.scenario.training.baseline_name if result.scenario.training else ""
    for cluster in dict.fromkeys(r.cluster for r in result.runs):
        runs = [r for r in result.runs if r.cluster == cluster]
        ref = next(r for r in runs if r.name == base)
        fits = [r for r in runs if r.memory is not None and r.memory.fits]
        oom = [f"{r.name} ({r.memory.total / 1e9:.0f} GB > {r.memory.capacity / 1e9:.0f} GB)" for r in runs
               if r.memory is not None and not r.memory.fits]
        if not fits:
            lines.append(f"{cluster}: no layout fits in GPU memory: {', '.join(oom)}")
            continue
        best = min(fits, key=lambda r: r.mean_step_s)
        t_best, t_ref = best.terms_ms(), ref.terms_ms()
        fssdp = 1e3 * float(np.mean([s["fssdp"] for s in best.step_s]))
        why = (f"straggler wait per micro-batch {t_ref.get('wait', 0):.1f} -> {t_best.get('wait', 0):.1f} ms, "
               f"all-to-alls {_a2a(t_ref):.1f} -> {_a2a(t_best):.1f} ms, FSSDP collectives exposed {fssdp:.1f} ms "
               "per step")
        line = (f"{cluster}: {best.name} is fastest, {ref.mean_step_s / best.mean_step_s:.3f}x vs {base} "
                f"({ref.mean_step_s * 1e3:.1f} -> {best.mean_step_s * 1e3:.1f} ms per step, "
                f"{best.tokens_per_s:,.0f} tokens/s); {why}")
        lines.append(line + (f"; does not fit: {', '.join(oom)}" if oom else ""))
    return lines


def _a2a(terms: dict[str, float]) -> float:
    return sum(terms.get(k, 0.0) for k in ("dispatch", "combine", "combine_bwd", "dispatch_bwd"))
