"""Traces layer: the routing-trace format and a synthetic generator."""

from moesim.traces.format import Layout, Trace, TraceMeta, load_trace, save_trace
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import model_preset, model_preset_names
from moesim.traces.synthetic import SyntheticParams, generate_trace

__all__ = ["Layout", "ModelSpec", "SyntheticParams", "Trace", "TraceMeta", "generate_trace", "load_trace",
           "model_preset", "model_preset_names", "save_trace"]
