"""The workload of a study: the evaluation trace and the profiling trace, laid out for one cluster.

A synthetic workload is generated (plain or fitted generator), a trace workload is loaded (memory-mapped
where stored uncompressed) and checked against the model; a sequence of trace files is replayed as one
trace. One ``numpy.random.Generator`` per purpose is derived from the workload seed, so the same scenario
gives the same tokens on every machine. Deliberately ignored: traces larger than memory when compressed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from moesim.errors import InputError
from moesim.study.config import ClusterEntry, Scenario
from moesim.study.fitted_config import fitted_params, model_groups
from moesim.traces.fitted_generator import generate_fitted
from moesim.traces.format import Layout, Trace, load_trace
from moesim.traces.stats import expert_counts
from moesim.traces.synthetic import SyntheticParams, drift_trace, generate_trace


class Workload:
    """The evaluation trace and the profiling trace, laid out for one cluster. A generated profile is made on
    first use (:attr:`profile`): a study whose placements read no profile (contiguous, placement files)
    never generates it; ``profile_tokens`` is known without it."""

    def __init__(self, trace: Trace, layout: Layout, profile: Trace | Callable[[], Trace], profile_in_sample: bool,
                 profile_tokens: int | None = None) -> None:
        self.trace, self.layout, self.profile_in_sample = trace, layout, profile_in_sample
        self._profile = profile
        if profile_tokens is None:
            assert isinstance(profile, Trace), "a profile made later needs its token count"
            profile_tokens = profile.num_tokens
        self.profile_tokens = profile_tokens

    @property
    def profile(self) -> Trace:
        """The profiling trace (generated now if it was not yet)."""
        if not isinstance(self._profile, Trace):
            self._profile = self._profile()
        return self._profile


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
    key = "workload.trace.file" if tw.files is None else "workload.trace.files"
    for i, path in enumerate(tw.paths):
        try:
            part = load_trace(path, mmap=True)  # stored (uncompressed) traces are memory-mapped, not read
            _check_trace(part, scenario, str(path))
        except InputError as exc:
            raise exc.via(scenario.source, key if tw.files is None else f"{key}[{i}]") from None
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


def check_home_layout(trace: Trace, cluster: ClusterEntry, source: str) -> None:
    """A trace whose tokens have home GPUs must have been laid out for this cluster: one imported for 8 GPUs
    and replayed on 16 would leave GPUs 8-15 without tokens of their own, without a word. Refused when some
    GPU has no home tokens and the trace does not say it was packed for this many GPUs (a few requests packed
    onto more GPUs may leave some empty). More homes than GPUs is :meth:`Trace.layout`'s error; a trace
    without homes is laid out for any cluster."""
    if trace.home is None or not trace.num_tokens:
        return
    G = cluster.spec.num_gpus
    used = int(np.max(trace.home)) + 1
    stated = [v.get("num_gpus") for k, v in trace.meta.extra.items() if k in ("packing", "fitted", "synthetic")
              and isinstance(v, dict)]  # what moesim trace import / generate and the generators record
    if used < G and G not in stated:
        idle = f"GPU {used}" if used == G - 1 else f"GPUs {used}-{G - 1}"
        raise InputError(f"the trace's tokens have home GPUs 0-{used - 1}, but cluster {cluster.name} has {G} GPUs: "
                         f"{idle} would get no tokens of their own; import it again with --gpus {G}, or without "
                         "--gpus so that workload.trace.tokens_per_gpu lays it out for any cluster", source=source,
                         field="home")


def build_workload(scenario: Scenario, cluster: ClusterEntry, trace: Trace | None = None) -> Workload:
    m, G = scenario.model, cluster.spec.num_gpus
    syn = scenario.workload.synthetic
    if syn is not None and syn.fitted is not None:  # a generator fitted to real routing (moesim.study.fitted_config)
        fitted = fitted_params(syn.fitted, m, syn.seed)
        groups = model_groups(m)

        def gen_fitted(batches: int, stream: int) -> Trace:
            return generate_fitted(fitted, num_gpus=G, tokens_per_gpu=syn.tokens_per_gpu, batches=batches,
                                   rng=np.random.default_rng([syn.seed, stream]), model=m.name, weights=False,
                                   groups=groups)

        evaluation = gen_fitted(syn.batches, 1)
        return Workload(evaluation, evaluation.layout(G, syn.tokens_per_gpu),
                        lambda: gen_fitted(syn.profile_batches, 2), False, syn.profile_batches * G * syn.tokens_per_gpu)
    if syn is not None:
        params = SyntheticParams(zipf_alpha=syn.zipf_alpha, gpu_mix_sigma=syn.gpu_mix_sigma,
                                 affinity=syn.affinity, affinity_fanout=syn.affinity_fanout,
                                 groups=syn.groups, topk_groups=syn.topk_groups)

        def gen(batches: int, stream: int) -> Trace:
            return generate_trace(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, num_gpus=G,
                                  tokens_per_gpu=syn.tokens_per_gpu, batches=batches, params=params,
                                  rng=np.random.default_rng([syn.seed, stream]),
                                  structure_rng=np.random.default_rng(syn.seed), model=m.name, weights=False)

        evaluation = gen(syn.batches, 1)
        if syn.drift_swaps_per_batch > 0:  # the evaluation drifts away from what the profile saw
            evaluation = drift_trace(evaluation, swaps_per_batch=syn.drift_swaps_per_batch,
                                     rng=np.random.default_rng([syn.seed, 3]))
        return Workload(evaluation, evaluation.layout(G, syn.tokens_per_gpu), lambda: gen(syn.profile_batches, 2),
                        False, syn.profile_batches * G * syn.tokens_per_gpu)
    tw = scenario.workload.trace
    assert tw is not None
    trace = trace if trace is not None else load_workload_trace(scenario)
    assert trace is not None
    check_home_layout(trace, cluster, tw.label)
    layout = trace.layout(G, tw.tokens_per_gpu, source=tw.label)
    if tw.profile_batches is None:
        return Workload(trace, layout, trace, True)
    keep = layout.batch < tw.profile_batches
    profile = Trace(experts=trace.experts[keep], meta=trace.meta)
    return Workload(trace, layout, profile, False)


