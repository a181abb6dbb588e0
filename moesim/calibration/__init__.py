"""Calibration layer: read micro-benchmarks, fit the hardware model, report its error on held-out points."""

from moesim.calibration.bench import BenchData, load_bench
from moesim.calibration.fit import Calibration, Prediction, calibrate, predict_ffn, predict_transfer, predictions

__all__ = ["BenchData", "Calibration", "Prediction", "calibrate", "load_bench", "predict_ffn", "predict_transfer",
           "predictions"]
