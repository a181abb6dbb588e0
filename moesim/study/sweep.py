"""Running a sweep's points: one after another, in local worker processes, or as tasks on a Ray cluster.

Each point (:class:`moesim.study.grid.SweepPoint`) is one whole study (:func:`moesim.study.run_study`); what it
returns is flat rows, one per (cluster, placement), every metric of :class:`moesim.metrics.summary.RunMetrics`
as a column (nested ones joined by ``_``: ``e2e_ms_mean``), plus the cluster's size. Points run in any order and
are handed back as each finishes (``on_done``), so the caller can keep them before the next one ends; a point
that raises is handed back with its error and the others go on. A local worker process that dies (killed, out
of memory) breaks its pool: the points it was running are tried again in a fresh pool, and counted failed the
second time. Ray retries a task whose worker died (``max_retries``) on its own.

Deliberately ignored: scheduling by cost (points are handed out in grid order), and sharing work between points
(each builds its own workload and placements: two points differ in what would be shared). Ray is optional: the
``ray`` extra.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from moesim.errors import InputError
from moesim.study.config import Scenario
from moesim.study.grid import SweepPoint

BACKENDS = ("local", "ray")
RAY_RETRIES = 3  # times Ray re-runs a point whose worker died


@dataclass(frozen=True)
class PointOutcome:
    """What one point gave: its rows, or the error that stopped it (one line), and its wall time."""

    index: int
    digest: str
    rows: tuple[dict[str, Any], ...] | None
    error: str | None
    seconds: float


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}_{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = float(f"{value:.6g}") if isinstance(value, float) else value


def point_rows(scenario: Scenario) -> list[dict[str, Any]]:
    """Simulate one point's scenario; one flat row per (cluster, placement), in the study's order."""
    from moesim.study.runner import run_study

    result = run_study(scenario.model_copy(update={"engine": scenario.engine.model_copy(update={"progress": False})}),
                       progress=False)
    rows = []
    for run in result.runs:
        row: dict[str, Any] = {"cluster": run.cluster.name, "gpus": run.cluster.spec.num_gpus,
                               "nodes": run.cluster.spec.nodes, "ep": run.cluster.ep, "tp": run.cluster.tp}
        metrics = run.metrics.to_json()
        row["placement"] = metrics.pop("placement")
        metrics.pop("cluster")
        _flat("", metrics, row)
        rows.append(row)
    return rows


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return str(exc)
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return " ".join(f"{type(exc).__name__}: {exc}{where}".split())


def run_one(index: int, digest: str, scenario: Scenario) -> PointOutcome:
    """One point, its error caught: what every backend runs (a module-level function, so workers import it)."""
    t0 = time.perf_counter()
    try:
        rows: tuple[dict[str, Any], ...] | None = tuple(point_rows(scenario))
        error = None
    except Exception as exc:  # noqa: BLE001 - any failure of one point is reported, the others go on
        rows, error = None, _one_line(exc)
    return PointOutcome(index, digest, rows, error, time.perf_counter() - t0)


def run_points(points: Sequence[SweepPoint], *, jobs: int = 1, backend: str = "local", address: str | None = None,
               on_done: Callable[[PointOutcome], None] | None = None) -> list[PointOutcome]:
    """Run ``points`` and return their outcomes in the points' order; ``on_done`` is called in this process as
    each one finishes (in the order they finish). ``jobs``: worker processes (local; 1 runs here, one after
    another) or CPUs of the Ray instance started here (ray without ``address``)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}", field="--backend")
    if address is not None and backend != "ray":
        raise InputError("only with --backend ray", field="--address")
    if backend == "ray":
        outcomes = _ray(points, jobs, address)
    elif jobs <= 1 or len(points) <= 1:
        outcomes = (run_one(p.index, p.digest, p.scenario) for p in points)
    else:
        outcomes = _processes(points, jobs)
    done: dict[int, PointOutcome] = {}
    for outcome in outcomes:
        done[outcome.index] = outcome
        if on_done is not None:
            on_done(outcome)
    return [done[p.index] for p in points if p.index in done]


def _processes(points: Sequence[SweepPoint], jobs: int) -> Iterator[PointOutcome]:
    """Points in ``jobs`` worker processes (spawned: no state shared with this one), at most ``jobs`` in flight;
    after a worker dies the points in flight go to a fresh pool, and a point in flight at two deaths fails."""
    queue = list(points)
    crashes: dict[int, int] = {}
    with _thread_share(jobs):
        yield from _pool_rounds(queue, crashes, jobs)


@contextmanager
def _thread_share(jobs: int) -> Iterator[None]:
    """Spawned workers inherit this process's environment: while they start, cap each one's threads (the sampler's,
    BLAS's) at its share of the CPUs, so ``jobs`` workers do not oversubscribe them; variables the user set are
    kept."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    share = str(max(1, cpus // max(jobs, 1)))
    names = ("MOESIM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    added = [n for n in names if n not in os.environ]
    os.environ.update({n: share for n in added})
    try:
        yield
    finally:
        for n in added:
            os.environ.pop(n, None)


def _pool_rounds(queue: list[SweepPoint], crashes: dict[int, int], jobs: int) -> Iterator[PointOutcome]:
    """The worker-pool rounds of :func:`_processes` (a fresh pool after a worker dies)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    while queue:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        flying: dict[Future[PointOutcome], SweepPoint] = {}
        broken = False
        try:
            while queue or flying:
                while queue and len(flying) < jobs and not broken:
                    p = queue.pop(0)
                    flying[pool.submit(run_one, p.index, p.digest, p.scenario)] = p
                if not flying:
                    break
                finished, _ = wait(flying, return_when=FIRST_COMPLETED)
                for fut in finished:
                    p = flying.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        broken = True
                        crashes[p.index] = crashes.get(p.index, 0) + 1
                        if crashes[p.index] >= 2:
                            yield PointOutcome(p.index, p.digest, None, "its worker process died twice (killed, or "
                                               "out of memory)", 0.0)
                        else:
                            queue.insert(0, p)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _ray(points: Sequence[SweepPoint], jobs: int, address: str | None) -> Iterator[PointOutcome]:
    """Points as Ray tasks, on the cluster at ``address`` or on a Ray instance started here with ``jobs`` CPUs;
    handed back as each finishes. A task whose worker dies is re-run by Ray (:data:`RAY_RETRIES` times)."""
    try:
        import ray
    except ImportError:
        raise InputError("needs Ray, which is not installed: pip install -e \".[ray]\" (or pip install \"ray>=2.9\")",
                         field="--backend ray") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, num_cpus=None if address else max(jobs, 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot reach a Ray cluster there ({' '.join(str(exc).split())[:200]})",
                             field="--address") from None
    try:
        task = ray.remote(max_retries=RAY_RETRIES, num_cpus=1)(run_one)
        pending = {task.remote(p.index, p.digest, p.scenario): p for p in points}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as exc:  # retries used up: the worker kept dying
                    yield PointOutcome(p.index, p.digest, None, _one_line(exc)[:600], 0.0)
    finally:
        if started:
            ray.shutdown()


def merge(points: Iterable[SweepPoint], outcomes: dict[str, PointOutcome]) -> tuple[list[dict[str, Any]],
                                                                                 list[dict[str, Any]]]:
    """The merged table, in grid order: each point's rows with its swept values in front (``point``, then one
    column per swept key), and the failures (point, values, error). ``outcomes`` is keyed by digest."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for p in points:
        outcome = outcomes.get(p.digest)
        if outcome is None:
            continue
        if outcome.rows is None:
            failures.append({"point": p.index, "digest": p.digest, **dict(p.values), "error": outcome.error})
            continue
        for row in outcome.rows:
            rows.append({"point": p.index, "digest": p.digest, **dict(p.values), **row})
    return rows, failures
