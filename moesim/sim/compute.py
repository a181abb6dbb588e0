"""GPU compute time: a roofline of FLOPs against weight and activation bytes, plus a fixed launch cost.

Expert FFN (SwiGLU): 2 x 3 x d_model x d_ff FLOPs per token; weights 3 x d_model x d_ff x dtype bytes,
read once per kernel; activations read and written once. A kernel takes
``max(ffn_floor, roofline + ffn_overhead)``: large experts pay a launch cost on top of the roofline, small
ones bottom out at a launch-bound floor (both fitted to H200 measurements). With expert tensor parallelism ``tp``, each
GPU of an EP rank runs every token of the rank on 1/tp of each expert. ``grouped`` runs all of a GPU's
experts in one grouped GEMM (one launch); otherwise one kernel per expert with tokens. Experts with no
tokens cost nothing. Deliberately ignored: tile quantisation, wave effects, and overlap of compute with
communication.

Non-expert work per layer (:func:`dense_time`): the attention projections as a roofline of their FLOPs (at
``GPUSpec.dense_efficiency`` of peak: plain GEMMs run faster than the SwiGLU experts the compute efficiency was
fitted on) and weight bytes, and - when the model has an attention shape and the workload says how long its sequences
are (:class:`Attention`) - the attention core (:func:`attention_time`): FlashAttention-style, 4 x heads x
head_dim FLOPs per token per context token at ``GPUSpec.attention_efficiency`` of peak, against the bytes
of Q, K, V and O (prefill) or of the whole KV cache (decode) at ``attention_hbm_efficiency`` of HBM
bandwidth; each query row also costs ``GPUSpec.attention_fixed_keys`` key positions of work, and each kernel
a fixed ``attention_overhead_us`` (all four fitted to FlashAttention-2 timings on the GPU,
benchmarks/validation/attention_h100 and attention_h200). With tensor
parallelism each GPU runs ``tp`` times its tokens on ``1/tp`` of the heads, which costs the same FLOPs as
its own tokens on all heads.
Deliberately ignored: norms, rotary embeddings, the router, the LM head, and K/V re-reads between query
tiles (left to the fitted efficiency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


@dataclass(frozen=True)
class Attention:
    """How much context each token attends to. ``prefill``: the batch is prompts of ``length`` tokens and
    each token attends causally to the ones before it; ``decode``: each token is the next token of a
    sequence with ``length`` tokens already in its KV cache."""

    phase: Literal["prefill", "decode"]
    length: int

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode"):
            raise ValueError(f"attention phase must be prefill or decode, got {self.phase!r}")
        if self.length < 1:
            raise ValueError(f"attention length must be positive, got {self.length}")

    def mean_context(self, window: int | None = None) -> float:
        """Keys each token attends to, averaged over the batch's tokens (itself included)."""
        if self.phase == "decode":
            return float(min(self.length + 1, window or self.length + 1))
        S = self.length
        W = min(window or S, S)
        return (W * (W + 1) / 2 + (S - W) * W) / S  # position i sees min(i, W) keys


def dense_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, *, tp: int = 1,
               attention: Attention | None = None) -> np.ndarray:
    """Seconds of non-expert work per GPU for ``tokens`` resident tokens: the attention projections and,
    with ``attention`` and a model attention shape, the attention core."""
    tokens = np.asarray(tokens, dtype=float)
    core = attention_time(tokens, model, gpu, attention) if attention is not None else 0.0
    if model.dense_flops == 0 and model.dense_bytes == 0:
        return np.zeros_like(tokens) + core
    flops = tokens * model.dense_flops
    nbytes = model.dense_bytes / tp + tokens * 2.0 * model.d_model * model.dtype_bytes
    return gemm_time(flops, nbytes, gpu) + gpu.ffn_overhead_us * 1e-6 + core


def gemm_time(flops: np.ndarray | float, nbytes: np.ndarray | float, gpu: GPUSpec) -> np.ndarray:
    """GPU-side seconds of plain GEMMs (the attention projections): FLOPs at ``dense_efficiency`` of peak
    against bytes at the HBM rate, no launch cost."""
    return np.maximum(np.asarray(flops, dtype=float) / gpu.dense_flops_per_s, np.asarray(nbytes) / gpu.hbm_bytes_per_s)


def attention_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, attention: Attention) -> np.ndarray:
    """Seconds of attention core (softmax(QK^T)V) per GPU for ``tokens`` resident tokens; zero without a
    model attention shape (``num_heads``)."""
    tokens = np.asarray(tokens, dtype=float)
    if model.num_heads is None:
        return np.zeros_like(tokens)
    hd, b = model.head_size, model.dtype_bytes
    q_width, kv_width = model.num_heads * hd, model.kv_heads * hd
    ctx = attention.mean_context(model.sliding_window)
    flops = tokens * 4.0 * q_width * (ctx + gpu.attention_fixed_keys)
    if attention.phase == "prefill":  # Q in, O out, K and V once
        nbytes = tokens * (2 * q_width + 2 * kv_width) * b
    else:  # every token reads its sequence's whole KV cache
        nbytes = tokens * (2 * q_width * b + 2 * kv_width * b * ctx)
    busy = np.maximum(flops / gpu.attention_flops_per_s, nbytes / gpu.attention_hbm_bytes_per_s)
    return (busy + gpu.attention_overhead_us * 1e-6) * (tokens > 0)
