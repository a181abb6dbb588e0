"""Metrics layer: summaries of simulated runs (pure functions of the records)."""

from moesim.metrics.summary import RunMetrics, skew, summarize, with_speedups

__all__ = ["RunMetrics", "skew", "summarize", "with_speedups"]
