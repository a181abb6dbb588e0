"""Metrics layer: summaries of simulated runs (pure functions of the records)."""

from moesim.metrics.serving import ServingMetrics, serving_metrics
from moesim.metrics.summary import RunMetrics, skew, summarize, with_speedups

__all__ = ["RunMetrics", "ServingMetrics", "serving_metrics", "skew", "summarize", "with_speedups"]
