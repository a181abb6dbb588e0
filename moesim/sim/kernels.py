"""The MoE layer's kernel pipeline on one GPU, kernel by kernel: what each step reads, writes and computes.

Two pipelines (``engine.moe_kernels``):

``torch_reference`` - the plain PyTorch expert-parallel layer (what ``moesim bench moe`` measures, and what
Megatron-style or hand-written EP code without fused kernels runs):

==============  ==========================================================  ===============================
step            what runs                                                   FLOPs / bytes (T tokens at home,
                                                                            S = T x k copies sent, R rows
                                                                            received, r_e rows of expert e)
==============  ==========================================================  ===============================
router          logits = x @ W_gate, softmax (fp32), top-k, renormalise     2 T d E / (T d + d E) b + 12 T E
permute         sort the T x k picks by destination, ``x[idx]``, split      2 S d b
                sizes to the host (a sync)
(dispatch)      all_to_all_single - the engine's network model
regroup         sort received rows by local expert, gather                  2 R d b
gemm_gate_up    ``torch._grouped_mm``: rows x W13 [d, 2f]                   grouped GEMM (below)
activation      SiLU(gate) x up                                             3 R f b
gemm_down       ``torch._grouped_mm``: h x W2 [f, d]                        grouped GEMM (below)
unregroup       scatter rows back to receive order                          2 R d b
(combine)       all_to_all_single back - the engine's network model
reduce          multiply by the gate weights, ``index_add_`` into [T, d]   (3 S d + 2 T d) b
==============  ==========================================================  ===============================

``fused`` - permutation folded into the grouped GEMMs and the top-k sum fused (vLLM's fused_moe Triton kernel,
SGLang with DeepEP and DeepGEMM, TensorRT-LLM's CUTLASS MoE): ``router``, ``align`` (sort the picks by expert
and pad each expert to the GEMM tile: a few small kernels on S ids), ``gemm_gate_up`` reading its A rows
through the sorted ids, ``activation``, ``gemm_down`` writing weighted rows in token order, ``reduce`` (sum of
the k rows per token, ``S d b + T d b``). No permute, regroup or unregroup copies.

Every step costs ``max(FLOPs / rate, bytes / HBM rate) + its fixed cost`` (``GPUSpec.moe.step_us``: kernel
launches, host work such as the split-size sync, small sorts). The grouped GEMMs follow the work: each
expert's rows are padded to the kernel's M tile (``tile_m``), an expert's tiles are ``ceil(r_e / tile_m) x
ceil(N / tile_n)``, tiles run in waves over the SMs (the last wave costs as much as a full one), and the
weights of every expert with rows are read once (experts with no rows cost nothing). So 256 experts with a
few rows each cost far more than one expert with all of them, and small-M GEMMs are bound by reading weights.
FP8 experts (``dtype: fp8``, block- or row-scaled e4m3 as DeepSeek-V3 serves) read 1-byte weights and
activations, run at the GPU's FP8 peak times ``fp8_gemm_efficiency``, and add a ``quant`` step before each
GEMM (read R d b, write R d bytes). With expert tensor parallelism ``tp`` each GPU runs every row of its rank
on 1/tp of f.

Deliberately ignored: L2 reuse between steps, the overlap of one step's tail with the next step's launch
(the fixed costs are fitted on whole-pipeline timings, which include it), split-K, stream-K and other
schedulers that break the wave quantisation, and the gate's shared-expert or bias terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.hardware.spec import GPUSpec
from moesim.traces.model import ModelSpec

Pipeline = Literal["torch_reference", "fused"]
PIPELINES: tuple[str, ...] = ("torch_reference", "fused")
STEPS: dict[str, tuple[str, ...]] = {
    "torch_reference": ("router", "permute", "regroup", "gemm_gate_up", "activation", "gemm_down", "unregroup",
                        "reduce"),
    "fused": ("router", "align", "gemm_gate_up", "activation", "gemm_down", "reduce"),
}
BEFORE_DISPATCH = ("router", "permute", "align")  # on the tokens at home, before the dispatch all-to-all
AFTER_COMBINE = ("reduce",)  # on the tokens at home, after the combine all-to-all


@dataclass(frozen=True)
class LayerWork:
    """What one GPU handles in one MoE layer: ``home`` tokens routed from it, ``sent`` copies it sends
    (T x k picks), ``rows[..., e]`` rows it runs for each expert (0 for experts it does not hold)."""

    home: np.ndarray  # [...]
    sent: np.ndarray  # [...]
    rows: np.ndarray  # [..., E]


def grouped_gemm_time(rows: np.ndarray, n: int, k: int, gpu: GPUSpec, *, weight_bytes: float,
                      act_bytes: float, out_bytes: float, fp8: bool = False) -> np.ndarray:
    """Seconds of one grouped GEMM over ``rows[..., e]`` rows per expert, each ``[r_e, k] x [k, n]``, without
    the fixed cost: tile-padded waves over the SMs against the bytes of the touched experts' weights and the
    rows' activations."""
    spec = gpu.moe
    rows = np.asarray(rows, dtype=float)
    tiles = (np.ceil(rows / spec.tile_m) * np.ceil(n / spec.tile_n)).sum(-1)
    waves = np.ceil(tiles / spec.sms)
    peak = gpu.fp8_tflops if fp8 else gpu.bf16_tflops
    eff = spec.fp8_gemm_efficiency if fp8 else spec.gemm_efficiency
    tile_s = 2.0 * spec.tile_m * spec.tile_n * k / (peak * 1e12 * eff / spec.sms)
    touched = (rows > 0).sum(-1)
    nbytes = touched * float(k * n) * weight_bytes + rows.sum(-1) * (k * act_bytes + n * out_bytes)
    return np.maximum(waves * tile_s, nbytes / (gpu.hbm_GBps * 1e9 * spec.memory_efficiency))


def step_times(work: LayerWork, model: ModelSpec, gpu: GPUSpec, *, pipeline: str, tp: int = 1,
               dtype: str = "bf16") -> dict[str, np.ndarray]:
    """Seconds of every step of ``pipeline`` (see the module docstring), fixed costs included; a step with no
    work (no tokens at home, no rows) costs nothing."""
    if pipeline not in STEPS:
        raise ValueError(f"unknown MoE kernel pipeline {pipeline!r}; valid: {', '.join(PIPELINES)}")
    spec = gpu.moe
    d, f, E, b = model.d_model, model.d_ff // tp, model.num_experts, model.dtype_bytes
    home, sent = np.asarray(work.home, dtype=float), np.asarray(work.sent, dtype=float)
    rows = np.asarray(work.rows, dtype=float)
    R = rows.sum(-1)
    mem = gpu.hbm_GBps * 1e9 * spec.memory_efficiency
    fp8 = dtype == "fp8"
    wb = 1.0 if fp8 else float(b)

    def fixed(name: str, active: np.ndarray) -> np.ndarray:
        return spec.step_us.get(name, 0.0) * 1e-6 * (active > 0)

    router_flops = 2.0 * home * d * E
    router_bytes = home * d * b + d * E * b + 12.0 * home * E
    out: dict[str, np.ndarray] = {
        "router": np.maximum(router_flops / (gpu.bf16_tflops * 1e12 * spec.gemm_efficiency),
                             router_bytes / mem) * (home > 0) + fixed("router", home),
    }
    if pipeline == "torch_reference":
        out["permute"] = 2.0 * sent * d * b / mem + fixed("permute", home)
        out["regroup"] = 2.0 * R * d * b / mem + fixed("regroup", R)
    else:
        out["align"] = 8.0 * sent / mem + fixed("align", home)
    if fp8:
        out["quant"] = 2.0 * R * (d * b + d) / mem + fixed("quant", R)
    out["gemm_gate_up"] = grouped_gemm_time(rows, 2 * f, d, gpu, weight_bytes=wb, act_bytes=wb, out_bytes=b,
                                            fp8=fp8) + fixed("gemm_gate_up", R)
    out["activation"] = 3.0 * R * f * b / mem + fixed("activation", R)
    out["gemm_down"] = grouped_gemm_time(rows, d, f, gpu, weight_bytes=wb, act_bytes=wb, out_bytes=b,
                                         fp8=fp8) + fixed("gemm_down", R)
    if pipeline == "torch_reference":
        out["unregroup"] = 2.0 * R * d * b / mem + fixed("unregroup", R)
        out["reduce"] = (3.0 * sent * d + 2.0 * home * d) * b / mem + fixed("reduce", home)
    else:
        out["reduce"] = (sent * d + home * d) * b / mem + fixed("reduce", home)
    return out


def phase_times(work: LayerWork, model: ModelSpec, gpu: GPUSpec, *, pipeline: str, tp: int = 1,
                dtype: str = "bf16") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds before the dispatch (router, permutation), between dispatch and combine (the experts' side),
    and after the combine (the top-k reduction)."""
    steps = step_times(work, model, gpu, pipeline=pipeline, tp=tp, dtype=dtype)
    zero = np.zeros(np.shape(work.home))
    before = sum((steps[s] for s in BEFORE_DISPATCH if s in steps), zero)
    after = sum((steps[s] for s in AFTER_COMBINE if s in steps), zero)
    experts = sum((v for s, v in steps.items() if s not in BEFORE_DISPATCH and s not in AFTER_COMBINE), zero)
    return before, experts, after
