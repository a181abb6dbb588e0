"""The latency-throughput curve of a scenario: its serving figures over a sweep of the batch size.

Each point is the scenario run as it is (:func:`moesim.study.run_study`: the same engine, placements planned on
that point's own profile) with the synthetic workload's ``tokens_per_gpu`` set to the point's batch: tokens per
GPU per forward in prefill, requests per GPU in decode (one token each; ``1 + draft_tokens`` with speculative
decoding). A point's row holds its
:class:`moesim.metrics.serving.ServingMetrics` per cluster and placement. Every point is checked
(:func:`moesim.study.prepare` without building) before the first is simulated. Deliberately ignored: trace
workloads (their batches are the trace's), and what the serving figures ignore (queueing, arrival).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from moesim.errors import InputError
from moesim.study.config import MAX_COUNT, Scenario
from moesim.study.plan import prepare
from moesim.study.runner import run_study

# the columns of a sweep row (serving.csv), in order; a figure that does not apply to the phase is left empty
ROW_FIELDS = ("cluster", "placement", "phase", "batch", "tokens_per_gpu", "forward_ms", "forward_ms_p99",
              "tokens_per_s_per_gpu", "tokens_per_s_per_node", "prompt_len", "prefix_len", "kv_len", "tpot_ms",
              "output_tokens_per_s_per_request", "gpus", "gpus_per_node")


def parse_batches(text: str, flag: str = "--batch") -> list[int]:
    """``32,64,128`` -> [32, 64, 128] (sorted, each once); anything but positive integers is an InputError
    naming ``flag``."""
    parts = [v.strip() for v in str(text).split(",")]
    try:
        values = [int(v) for v in parts if v]
    except ValueError:
        raise InputError(f"must be comma-separated positive integers (tokens or requests per GPU), got {text!r}",
                         field=flag) from None
    if not values or any(not 1 <= v <= MAX_COUNT for v in values):
        raise InputError(f"must be comma-separated integers from 1 to {MAX_COUNT}, got {text!r}", field=flag)
    return sorted(set(values))


def at_batch(scenario: Scenario, batch: int) -> Scenario:
    """The scenario with ``batch`` tokens per GPU per forward (requests per GPU in decode)."""
    syn, spec = scenario.workload.synthetic, scenario.workload.speculative
    if syn is None:
        raise InputError("a serving sweep sets the synthetic workload's tokens_per_gpu; a trace workload's batches "
                         "are the trace's (generate a synthetic or fitted workload)", source=scenario.source,
                         field="workload.trace")
    tokens = batch * (spec.queries if spec is not None else 1)
    work = scenario.workload.model_copy(update={"synthetic": syn.model_copy(update={"tokens_per_gpu": tokens})})
    return scenario.model_copy(update={"workload": work})


def _selected(scenario: Scenario, placement: str | None, cluster: str | None) -> Scenario:
    """The scenario cut to one placement and/or one cluster (unknown names are InputErrors naming the flag)."""
    update: dict[str, Any] = {}
    if placement is not None:
        entries = tuple(p for p in scenario.placements if p.name == placement)
        if not entries:
            names = ", ".join(p.name for p in scenario.placements)
            raise InputError(f"no placement {placement!r}; valid: {names}", source=scenario.source,
                             field="--placement")
        update.update(placements=entries, baseline=placement)
    if cluster is not None:
        clusters = tuple(c for c in scenario.clusters if c.name == cluster)
        if not clusters:
            names = ", ".join(c.name for c in scenario.clusters)
            raise InputError(f"no cluster {cluster!r}; valid: {names}", source=scenario.source, field="--cluster")
        update["clusters"] = clusters
    update["rebalance"] = None  # a sweep point is one plan per placement, not a study over time
    return scenario.model_copy(update=update)


def serving_sweep(scenario: Scenario, batches: Sequence[int], *, placement: str | None = None,
                  cluster: str | None = None, progress: Callable[[int], object] | None = None) -> list[dict[str, Any]]:
    """One row per (batch, cluster, placement): the batch swept (tokens per GPU in prefill, requests per GPU in
    decode) and the run's serving figures (:data:`ROW_FIELDS`). ``progress(1)`` is called after each batch."""
    base = _selected(scenario, placement, cluster)
    points = [at_batch(base, b).model_copy(update={"engine": base.engine.model_copy(update={"progress": False})})
              for b in batches]
    for b, point in zip(batches, points):  # every check of every point before simulating any
        try:
            prepare(point, build=False)
        except InputError as exc:
            raise InputError(f"{exc.detail} (at --batch {b})", source=exc.source, field=exc.field) from None
    rows = []
    for b, point in zip(batches, points):
        result = run_study(point, progress=False)
        for run in result.runs:
            s = run.metrics.serving
            assert s is not None
            figures = s.to_json()
            rows.append({k: figures.get(k) for k in ROW_FIELDS} | {"cluster": run.cluster.name,
                                                                    "placement": run.name, "batch": b})
        if progress is not None:
            progress(1)
    return rows
