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
its own tokens on all heads. The prefill core's kernel family (``Attention.kernel``, ``engine.attention_kernel``):
``fa2``, the fit above, or one of ``GPUSpec.attention_kernels`` with its own efficiency, fixed keys and fixed cost
(``cudnn``: cuDNN's Hopper-native fused attention, measured on an H200 by ``moesim bench attention-kernels``: 0.63 of
peak against FlashAttention-2's 0.31); decode keeps its kernels whatever the family. In training the core's backward
(:func:`attention_backward_time`) is 2.5 times the forward's FLOPs (QK^T recomputed, then dV, dP, dQ and dK) plus
fixed keys per query row, at the family's measured backward share of peak, plus a fixed cost.
Multi-head latent attention (``model.kv_lora_rank``; DeepSeek-V2/V3, Kimi-K2), per token, with ``H`` heads,
``n`` = qk_nope_head_dim, ``p`` = qk_rope_head_dim, ``v`` = v_head_dim, ``r`` = kv_lora_rank, ``c`` keys of
context, ``k0`` = ``attention_fixed_keys``, ``b`` = dtype bytes:

- projections (both phases): 2 FLOPs per weight of q_a, q_b, kv_a, kv_b and o
  (:attr:`~moesim.traces.model.ModelSpec.projection_params`; the decode kernels' weight absorption moves kv_b
  into the query and output sides without changing its FLOPs);
- prefill core (not absorbed: K and V decompressed per head): FLOPs ``2 H (n + p + v) (c + k0)`` (QK^T over
  ``n + p`` = 192 dimensions, PV over ``v`` = 128); bytes ``2 H (n + p + v) b`` (Q and K of ``n + p``, V and O
  of ``v`` per head); FlashAttention-2 (``fa2``) takes one head size, so V is padded to ``n + p`` (``v`` = 192
  there, as engines running MLA on it pad; the measured kernel did the padded work); with a cached prefix
  (``Attention.prefix``, ``P`` tokens before each prompt's ``S`` computed ones) the context ``c`` counts it, the
  core also reads the prefix's keys and values (``H (n + p + v) b`` per prefix token) and the projections first
  decompress them from the cached latent (:func:`prefix_work`);
- decode core (weight-absorbed, as FlashMLA): every query head attends over the one latent KV cache of
  ``r + p`` = 576 elements per token shared by all heads: FLOPs ``H (2 (r + p) + 2 r) (c + k0)`` (2 x 576 + 2 x
  512 per head per context token); bytes ``H (2 r + p) b`` (the absorbed query and the latent output of every
  head) plus the cache ``(r + p) b c``, read once per sequence (shared by its ``queries`` tokens in speculative
  decoding); at FlashMLA's published rates, 580 TFLOP/s
  and 3000 GB/s on an H800 (``GPUSpec.mla_decode_efficiency`` and ``mla_decode_hbm_efficiency``, the same shares
  of peak assumed on other GPUs), not the FlashAttention-2 fit of the other attention cores.

Shared experts and the dense layers' MLP are plain SwiGLU GEMMs (:func:`swiglu_time`): the gate-up GEMM
``[T, d] x [d, 2f]`` and the down GEMM ``[T, f] x [f, d]`` as :func:`moesim.sim.kernels.plain_gemm_time` times
them (tile-padded waves against their weight and activation bytes, plus a fixed cost per launch, eager or
replayed from a CUDA graph; fitted on plain GEMMs of these very shapes measured on an H200,
benchmarks/validation/moe_h200/dense.py), and the activation's ``3 T f b`` bytes at ``hbm_efficiency`` of HBM;
nothing without tokens. A dense layer (:func:`dense_layers_time`) is the attention above plus that MLP of width
``dense_d_ff``; both run data-parallel: every GPU holds their whole weights and runs its resident tokens (with
``tp`` > 1 the dense layers' and shared experts' weights are not split and no TP collective is charged for them).
The layer's memory-bound glue (:func:`glue_bytes`, :func:`glue_time`; charged with the attention whenever the
engine runs a kernel pipeline and the model has a head shape): the input and post-attention RMSNorms and the two
residual adds, the rotary embedding of Q and K, and for MLA the query and KV-latent norms, Q and K assembled to
``n + p`` per head (V padded on FlashAttention-2) and, eager, the core's output copied to token-major. Eager
(``torch_reference``: PyTorch op by op, fp32 temporaries in the norms, rotate-half in six ops) or fused (the serving
pipelines: each tensor read and written once), at the HBM rate of the pipeline's own measured elementwise step
(``activation``). Checked, not fitted, on DeepSeek-V3's whole attention block measured on an H200
and Mixtral's GQA block (benchmarks/validation/attention_h200/compare_mla_block.py): MLA blocks within a median
2.8%, GQA blocks 12.6% long (the glue over-counted there); 35% short without it.
Deliberately ignored: the router's share outside the MoE pipeline, the LM head and embeddings, the glue's per-kernel
fixed costs, and K/V re-reads between query tiles (left to the fitted efficiency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.hardware.spec import AttentionKernelSpec, GPUSpec
from moesim.traces.model import ModelSpec
from moesim.sim.kernels import plain_gemm_time

BACKWARD_FLOPS = 2.5  # an attention core's backward / forward FLOPs: QK^T recomputed, then dV, dP, dQ and dK


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
    """How much context each token attends to. ``prefill``: the batch is prompts of ``length`` computed tokens and
    each token attends causally to the ones before it, ``prefix`` tokens of a prefix-cache hit included (already in
    the KV cache: attended to, not computed; :func:`prefix_work`); ``decode``: each token is one of the ``queries`` next
    tokens of a sequence with ``length`` tokens already in its KV cache (more than one in speculative decoding:
    the sequence's token and its draft tokens, verified in one forward, each attending causally to the ones before
    it; the kernel reads the sequence's cache once for all of them)."""

    phase: Literal["prefill", "decode"]
    length: int
    kernel: str = "fa2"  # the prefill core's kernel family: fa2 or one of GPUSpec.attention_kernels
    queries: int = 1  # decode: query tokens per sequence per forward (1 + draft tokens)
    prefix: int = 0  # prefill: cached tokens before each prompt's computed ones

    def __post_init__(self) -> None:
        if self.phase not in ("prefill", "decode"):
            raise ValueError(f"attention phase must be prefill or decode, got {self.phase!r}")
        if self.length < 1:
            raise ValueError(f"attention length must be positive, got {self.length}")
        if self.queries < 1 or (self.queries > 1 and self.phase != "decode"):
            raise ValueError(f"queries per sequence must be 1, or more in decode, got {self.queries}")
        if self.prefix < 0 or (self.prefix > 0 and self.phase != "prefill"):
            raise ValueError(f"a cached prefix must be 0, or more in prefill, got {self.prefix}")

    def mean_context(self, window: int | None = None) -> float:
        """Keys each token attends to, averaged over the batch's tokens (itself included)."""
        if self.phase == "decode":  # query i of q sees the cache and queries 0..i
            mean = self.length + (self.queries + 1) / 2
            return float(min(mean, window or mean))
        S, P = self.length, self.prefix
        W = window or P + S
        n = min(max(W - P, 0), S)  # computed tokens whose whole context fits the window
        return (n * P + n * (n + 1) / 2 + (S - n) * W) / S  # computed token i sees min(P + i, W) keys (1-based i)

    @property
    def prefix_share(self) -> float:
        """Cached prefix tokens per computed token (0 without a prefix)."""
        return self.prefix / self.length


def dense_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, *, tp: int = 1,
               attention: Attention | None = None, layer: int | None = None, dtype: str = "bf16",
               pipeline: str | None = None) -> np.ndarray:
    """Seconds of non-expert work per GPU for ``tokens`` resident tokens: the attention projections and,
    with ``attention`` and a model attention shape, the attention core (of transformer layer ``layer``, which
    sets its window; None: the model's ``sliding_window``). ``dtype`` fp8: the projections read 1-byte weights
    and run at the FP8 peak (same share of it). With a kernel ``pipeline`` (and an attention shape) the layer's
    memory-bound glue too (:func:`glue_time`)."""
    tokens = np.asarray(tokens, dtype=float)
    core = attention_time(tokens, model, gpu, attention, layer=layer) if attention is not None else 0.0
    if pipeline is not None:
        core = core + glue_time(tokens, model, gpu, pipeline=pipeline,
                                kernel=attention.kernel if attention is not None else "fa2")
    if model.dense_flops == 0 and model.dense_bytes == 0:
        return np.zeros_like(tokens) + core
    weights = model.dense_bytes / tp
    extra_flops, extra_bytes = prefix_work(tokens, model, attention)
    flops = tokens * model.dense_flops + extra_flops
    if dtype == "fp8":
        weights /= model.dtype_bytes
        flops = flops * gpu.bf16_tflops / (gpu.fp8_tflops or 2 * gpu.bf16_tflops)
    nbytes = weights + tokens * 2.0 * model.d_model * model.dtype_bytes + extra_bytes
    return gemm_time(flops, nbytes, gpu) + gpu.ffn_overhead_us * 1e-6 + core


def prefix_work(tokens: np.ndarray, model: ModelSpec, attention: Attention | None) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs and bytes of the projections a cached prefix adds to a prefill forward of ``tokens`` computed tokens:
    with multi-head latent attention the cache holds the compressed latent, so every prefix token is decompressed
    by kv_b to its heads' keys and values before the core reads them (as vLLM's and SGLang's MLA prefill with a
    cached context do): ``2 r H (n + v)`` FLOPs, its latent read and the keys and values written,
    ``((r + p) + H (n + v)) b`` bytes, per prefix token. Other attention caches keys and values as they are:
    nothing (the core reads them, :func:`attention_time`)."""
    tokens = np.asarray(tokens, dtype=float)
    if attention is None or attention.prefix == 0 or not model.is_mla:
        return np.zeros_like(tokens), np.zeros_like(tokens)
    assert model.num_heads and model.kv_lora_rank and model.qk_nope_head_dim and model.qk_rope_head_dim
    assert model.v_head_dim
    H, r, p = model.num_heads, model.kv_lora_rank, model.qk_rope_head_dim
    nv = model.qk_nope_head_dim + model.v_head_dim
    cached = tokens * attention.prefix_share
    return cached * 2.0 * r * H * nv, cached * ((r + p) + H * nv) * model.dtype_bytes


def gemm_time(flops: np.ndarray | float, nbytes: np.ndarray | float, gpu: GPUSpec) -> np.ndarray:
    """GPU-side seconds of plain GEMMs (the attention projections): FLOPs at ``dense_efficiency`` of peak
    against bytes at the HBM rate, no launch cost."""
    return np.maximum(np.asarray(flops, dtype=float) / gpu.dense_flops_per_s, np.asarray(nbytes) / gpu.hbm_bytes_per_s)


def attention_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, attention: Attention, *,
                   layer: int | None = None) -> np.ndarray:
    """Seconds of attention core (softmax(QK^T)V) per GPU for ``tokens`` resident tokens; zero without a
    model attention shape (``num_heads``). ``layer`` (over all transformer layers) picks its window."""
    rate, keys, overhead = gpu.attention_flops_per_s, gpu.attention_fixed_keys, gpu.attention_overhead_us
    if attention.phase == "prefill" and attention.kernel != "fa2":
        family = attention_kernel(gpu, attention.kernel)
        rate, keys, overhead = gpu.bf16_tflops * 1e12 * family.efficiency, family.fixed_keys, family.overhead_us
    return _core_time(tokens, model, gpu, attention, layer, rate, keys, overhead)


def attention_backward_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, attention: Attention, *,
                            layer: int | None = None) -> np.ndarray:
    """Seconds of the attention core's backward in training: its kernel family's backward fit (2.5 times the
    forward's FLOPs at its own share of peak, fixed keys and fixed cost), or 2.5 times the forward's time where the
    GPU has none (module docstring)."""
    spec = gpu.attention_backward if attention.kernel == "fa2" else attention_kernel(gpu, attention.kernel).backward
    if spec is None or attention.phase != "prefill":
        return BACKWARD_FLOPS * attention_time(tokens, model, gpu, attention, layer=layer)
    rate = gpu.bf16_tflops * 1e12 * spec.efficiency / BACKWARD_FLOPS
    return _core_time(tokens, model, gpu, attention, layer, rate, spec.fixed_keys, spec.overhead_us)


def _core_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, attention: Attention, layer: int | None,
               rate: float, keys: float, overhead_us: float) -> np.ndarray:
    """The attention core at ``rate`` FLOP/s with ``keys`` fixed key positions per query row and a fixed cost."""
    tokens = np.asarray(tokens, dtype=float)
    if model.num_heads is None:
        return np.zeros_like(tokens)
    ctx = attention.mean_context(model.sliding_window if layer is None else model.window_at(layer))
    if model.is_mla:
        flops, nbytes = mla_core_work(tokens, model, attention, ctx, keys)
        if attention.phase == "decode":  # FlashMLA's published rates (GPUSpec.mla_decode_*)
            peak = gpu.bf16_tflops * 1e12 * gpu.mla_decode_efficiency
            hbm = gpu.hbm_GBps * 1e9 * gpu.mla_decode_hbm_efficiency
            busy = np.maximum(flops / peak, nbytes / hbm)
        else:
            busy = np.maximum(flops / rate, nbytes / gpu.attention_hbm_bytes_per_s)
        return (busy + overhead_us * 1e-6) * (tokens > 0)
    hd, b = model.head_size, model.dtype_bytes
    q_width, kv_width = model.num_heads * hd, model.kv_heads * hd
    flops = tokens * 4.0 * q_width * (ctx + keys)
    if attention.phase == "prefill":  # Q in, O out, K and V once, the cached prefix's K and V too
        nbytes = tokens * (2 * q_width + 2 * kv_width * (1 + attention.prefix_share)) * b
    else:  # every sequence's queries read its whole KV cache once
        nbytes = tokens * (2 * q_width * b + 2 * kv_width * b * ctx / attention.queries)
    busy = np.maximum(flops / rate, nbytes / gpu.attention_hbm_bytes_per_s)
    return (busy + overhead_us * 1e-6) * (tokens > 0)


def glue_bytes(model: ModelSpec, *, eager: bool, kernel: str = "fa2") -> float:
    """Bytes of HBM traffic per token of one transformer layer's memory-bound glue (module docstring): its two
    RMSNorms and two residual adds, the rotary embedding, and for MLA the query and KV-latent norms and the
    assembly of Q and K (and V padded, on FlashAttention-2), with PyTorch's eager op-by-op temporaries (``eager``)
    or as serving engines' fused kernels move each tensor once."""
    if model.num_heads is None:
        return 0.0
    d, H = model.d_model, model.num_heads
    norm, rope = (26.0, 18.0) if eager else (4.0, 4.0)  # per element: fp32 temporaries; rotate-half in six ops
    residual = 6.0 * d if eager else 4.0 * d  # x + y (fused: folded into the next norm's read and write)
    total = 2 * (norm * d + residual)
    if model.is_mla:
        assert model.qk_nope_head_dim and model.qk_rope_head_dim and model.v_head_dim and model.kv_lora_rank
        n, p, v = model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim
        total += norm * (model.q_lora_rank or 0) + norm * model.kv_lora_rank
        total += rope * (H * p + p) + 2 * 4.0 * H * (n + p)  # RoPE of q_pe and k_pe; Q and K assembled to n + p
        if kernel == "fa2":
            total += 2.0 * H * v + 2.0 * H * (n + p)  # V padded to n + p
        if eager:
            total += 4.0 * H * v  # the core's [batch, heads, seq, v] output copied to [tokens, heads x v]
        return total
    hd = model.head_size
    total += rope * (H + model.kv_heads) * hd
    if eager:
        total += 4.0 * H * hd
    return total


def glue_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, *, pipeline: str,
              kernel: str = "fa2") -> np.ndarray:
    """Seconds of a transformer layer's memory-bound glue (:func:`glue_bytes`) on ``tokens`` tokens: eager with the
    ``torch_reference`` pipeline (PyTorch op by op), fused with the serving engines' pipelines; at the HBM rate the
    pipeline's own elementwise step (``activation``) was measured at."""
    tokens = np.asarray(tokens, dtype=float)
    spec = gpu.moe_pipelines.get(pipeline)
    step = spec.steps.get("activation") if spec is not None else None
    rate = gpu.hbm_GBps * 1e9 * (step.hbm_efficiency if step is not None else gpu.hbm_efficiency)
    return tokens * glue_bytes(model, eager=pipeline == "torch_reference", kernel=kernel) / rate


def attention_kernel(gpu: GPUSpec, name: str) -> AttentionKernelSpec:
    """The GPU's prefill attention kernel family ``name`` (not fa2, whose fit is the GPU's own attention fields)."""
    if name not in gpu.attention_kernels:
        known = ", ".join(["fa2", *gpu.attention_kernels])
        raise ValueError(f"attention kernel {name!r} is not fitted for GPU {gpu.name} (it has: {known})")
    return gpu.attention_kernels[name]


def mla_core_work(tokens: np.ndarray, model: ModelSpec, attention: Attention, ctx: float,
                  fixed_keys: float) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs and bytes of the multi-head latent attention core for ``tokens`` tokens attending to ``ctx`` keys
    each (the module docstring's closed forms): not absorbed in prefill, weight-absorbed in decode."""
    assert model.num_heads and model.kv_lora_rank and model.qk_nope_head_dim and model.qk_rope_head_dim
    assert model.v_head_dim
    H, r, p, b = model.num_heads, model.kv_lora_rank, model.qk_rope_head_dim, model.dtype_bytes
    if attention.phase == "prefill":  # per head: QK^T over n + p dims, PV over v; Q, K, V, O in and out
        v = model.v_head_dim
        if attention.kernel == "fa2":  # FlashAttention-2 takes one head size: V padded to Q and K's
            v = max(v, model.qk_nope_head_dim + p)
        width = model.qk_nope_head_dim + p + v
        prefix = tokens * attention.prefix_share * H * (model.qk_nope_head_dim + p + model.v_head_dim) * b  # K, V
        return tokens * 2.0 * H * width * (ctx + fixed_keys), tokens * 2.0 * H * width * b + prefix
    flops = tokens * H * (2.0 * (r + p) + 2.0 * r) * (ctx + fixed_keys)
    return flops, tokens * (H * (2.0 * r + p) * b + (r + p) * b * ctx / attention.queries)


def swiglu_time(tokens: np.ndarray, d_model: int, d_ff: int, gpu: GPUSpec, dtype_bytes: float, *,
                launch: str = "eager", dtype: str = "bf16") -> np.ndarray:
    """Seconds of one dense SwiGLU MLP (``d_model x d_ff``, three matrices) on ``tokens`` tokens per GPU: two plain
    GEMMs and the activation (the module docstring), zero without tokens."""
    tokens = np.asarray(tokens, dtype=float)
    gemms = (plain_gemm_time(tokens, 2 * d_ff, d_model, gpu, dtype=dtype, launch=launch, act_bytes=dtype_bytes)
             + plain_gemm_time(tokens, d_model, d_ff, gpu, dtype=dtype, launch=launch, act_bytes=dtype_bytes))
    activation = 3.0 * tokens * d_ff * dtype_bytes / gpu.hbm_bytes_per_s
    return (gemms + activation) * (tokens > 0)


def shared_expert_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, *, launch: str = "eager",
                       dtype: str = "bf16") -> np.ndarray:
    """Seconds of an MoE layer's shared experts (one SwiGLU MLP ``shared_experts x shared_d_ff`` wide) on each GPU's
    ``tokens`` resident tokens; zero without shared experts."""
    tokens = np.asarray(tokens, dtype=float)
    if model.shared_ff == 0:
        return np.zeros_like(tokens)
    return swiglu_time(tokens, model.d_model, model.shared_ff, gpu, model.dtype_bytes, launch=launch, dtype=dtype)


def dense_layers_time(tokens: np.ndarray, model: ModelSpec, gpu: GPUSpec, layers: range, *,
                      attention: Attention | None = None, launch: str = "eager", dtype: str = "bf16",
                      pipeline: str | None = None) -> np.ndarray:
    """Seconds of the dense transformer layers ``layers`` (indices over all layers) on each GPU's ``tokens``
    resident tokens: per layer its attention (:func:`dense_time`, the layer's own window) and its SwiGLU MLP of
    ``dense_d_ff``, data-parallel (module docstring)."""
    tokens = np.asarray(tokens, dtype=float)
    total = np.zeros_like(tokens)
    if not len(layers):
        return total
    assert model.dense_d_ff is not None  # ModelSpec requires it when there are dense layers
    mlp = swiglu_time(tokens, model.d_model, model.dense_d_ff, gpu, model.dtype_bytes, launch=launch, dtype=dtype)
    for layer in layers:
        total = total + dense_time(tokens, model, gpu, attention=attention, layer=layer, dtype=dtype,
                                   pipeline=pipeline) + mlp
    return total * (tokens > 0)
