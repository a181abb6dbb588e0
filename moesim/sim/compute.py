"""GPU compute time: a roofline of FLOPs against weight and activation bytes, plus a fixed launch cost.

Expert FFN (SwiGLU): 2 x 3 x d_model x d_ff FLOPs per token; weights 3 x d_model x d_ff x dtype bytes,
read once per kernel; activations read and written once. A kernel takes
``max(ffn_floor, roofline + ffn_overhead)``: large experts pay a launch cost on top of the roofline, small
ones bottom out at a launch-bound floor (both fitted to H200 measurements). With expert tensor parallelism ``tp``, each
GPU of an EP rank runs every token of the rank on 1/tp of each expert. ``grouped`` runs all of a GPU's
experts in one grouped GEMM (one launch); otherwise one kernel per expert with tokens. Experts with no
tokens cost nothing. Deliberately ignored: tile quantisation, wave effects, and overlap of compute with
communication.
"""

from __future__ import annotations

import numpy as np

from moesim.hardware.spec import GPUSpec
from moesim.traces.model import ModelSpec


def expert_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, *, tp: int = 1,
                grouped: bool = True) -> np.ndarray:
    """Seconds each GPU spends on experts; ``tokens[..., e]`` is the token count of each local expert."""
    tokens = np.asarray(tokens, dtype=float)
    d, f, b = model.d_model, model.d_ff, model.dtype_bytes
    flops = tokens * (6.0 * d * f / tp)
    nbytes = (tokens > 0) * (3.0 * d * f * b / tp) + tokens * b * (2.0 * d + 3.0 * f / tp)
    overhead, floor = gpu.ffn_overhead_us * 1e-6, gpu.ffn_floor_us * 1e-6
    if grouped:
        busy = np.maximum(flops.sum(-1) / gpu.flops_per_s, nbytes.sum(-1) / gpu.hbm_bytes_per_s)
        return np.maximum(busy + overhead, floor) * (tokens.sum(-1) > 0)
    per = np.maximum(flops / gpu.flops_per_s, nbytes / gpu.hbm_bytes_per_s)
    return (np.maximum(per + overhead, floor) * (tokens > 0)).sum(-1)


def dense_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, *, tp: int = 1) -> np.ndarray:
    """Seconds of non-expert work (attention projections) per GPU for ``tokens`` resident tokens."""
    tokens = np.asarray(tokens, dtype=float)
    if model.dense_flops == 0 and model.dense_bytes == 0:
        return np.zeros_like(tokens)
    flops = tokens * model.dense_flops
    nbytes = model.dense_bytes / tp + tokens * 2.0 * model.d_model * model.dtype_bytes
    return np.maximum(flops / gpu.flops_per_s, nbytes / gpu.hbm_bytes_per_s) + gpu.ffn_overhead_us * 1e-6
