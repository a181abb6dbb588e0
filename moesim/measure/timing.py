"""Timing helpers: CUDA events on a GPU, a wall clock on the CPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class _WallEvent:
    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_WallEvent") -> float:
        return (other.t - self.t) * 1e3


def event(cpu: bool):
    return _WallEvent() if cpu else torch.cuda.Event(enable_timing=True)


def sync(cpu: bool) -> None:
    if not cpu:
        torch.cuda.synchronize()


def times_ms(fn: Callable[[], object], cpu: bool, warm: int = 3, iters: int = 15,
             before: Callable[[], object] | None = None) -> list[float]:
    """Milliseconds of each of ``iters`` timed runs of ``fn`` after ``warm`` untimed ones; ``before`` runs
    (untimed) ahead of every timed run, e.g. to flush the L2 cache.

    A CPU dry run times 1 + 3 runs: it checks the plumbing, not the numbers.
    """
    if cpu:
        warm, iters = 1, 3
    for _ in range(warm):
        fn()
    sync(cpu)
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        sync(cpu)
        a, b = event(cpu), event(cpu)
        a.record()
        fn()
        b.record()
        b.synchronize()
        sync(cpu)
        times.append(a.elapsed_time(b))
    return times


def median_ms(fn: Callable[[], object], cpu: bool, warm: int = 3, iters: int = 15,
              before: Callable[[], object] | None = None) -> tuple[float, float, float]:
    """Median, min and max milliseconds of ``fn`` (see :func:`times_ms`)."""
    times = times_ms(fn, cpu, warm, iters, before)
    return statistics.median(times), min(times), max(times)
