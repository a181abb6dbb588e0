"""The MoE layer's kernel pipeline on one GPU, kernel by kernel: what each step reads, writes and computes.

Three pipelines (``engine.moe_kernels``):

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
a2a_issue       the host issuing the dispatch's all_to_all_single calls      fixed cost only
                (rows, expert ids) after permute's sync: the GPU is idle
(dispatch)      all_to_all_single - the engine's network model
regroup         sort received rows by local expert, gather                  2 R d b
gemm_gate_up    ``torch._grouped_mm``: rows x W13 [d, 2f]                   grouped GEMM (below)
activation      SiLU(gate) x up                                             3 R f b
gemm_down       ``torch._grouped_mm``: h x W2 [f, d]                        grouped GEMM (below)
unregroup       scatter rows back to receive order                          2 R d b
(combine)       all_to_all_single back - the engine's network model
reduce          multiply by the gate weights, ``index_add_`` into [T, d]   (3 S d + 2 T d) b
==============  ==========================================================  ===============================

``fused`` - permutation folded into the grouped GEMMs and the top-k sum fused, as vLLM's fused_moe Triton kernels
run it (their GEMMs fitted on vLLM's own kernels, benchmarks/validation/aiconfigurator): ``router``, ``align``
(sort the picks by expert and pad each expert to the GEMM tile: one kernel on S ids), ``gemm_gate_up`` reading
its A rows through the sorted ids, ``activation``, ``gemm_down`` writing weighted rows in token order, ``reduce``
(sum of the k rows per token, ``S d b + T d b``). No permute, regroup or unregroup copies. With DeepEP's low-latency
all-to-all (``expert_major``) there is no ``align`` either: its dispatch writes the received rows expert by
expert (a ``[local experts, max tokens, hidden]`` buffer that masked grouped GEMMs such as DeepGEMM's read).

``deepgemm`` - the same steps with DeepGEMM's FP8 grouped GEMMs (contiguous after DeepEP's normal dispatch, masked
after its low-latency one), as SGLang's wide-EP stack and DeepSeek's serving run them; their GEMM terms fitted on
SGLang's DeepEP MoE kernels as AIConfigurator timed them. DeepGEMM's FP8 kernels reach about twice the share of the
FP8 peak that vLLM's block-FP8 Triton kernels do, so the two are separate pipelines. (TensorRT-LLM's CUTLASS MoE
has not been measured: choose the closer of the two.)

Every step but the GEMMs costs ``fixed_us + bytes / (HBM rate x hbm_efficiency)`` (``GPUSpec.moe_pipelines[
pipeline].steps``): the fixed cost holds its kernel launches and host work (eager PyTorch launches every op from
Python; ``permute`` waits for the split sizes on the host), and each step has its own bandwidth share because a
gather, a scatter and an atomic ``index_add_`` reach very different fractions of a plain copy. The grouped GEMMs
follow the work: each expert's rows are padded to the kernel's M tile (``tile_m``), an expert's tiles are
``ceil(r_e / tile_m) x ceil(N / tile_n)``, tiles run in waves over the SMs (the last wave costs a full one),
and the weights of every expert with rows are read once (at ``gemm_hbm_efficiency``; experts with no rows cost
nothing): ``max(waves x tile time, bytes / rate) + gemm_fixed_us``. So 256 experts with a few rows each cost
far more than one expert with all of them, and small-M GEMMs are bound by reading weights. FP8 experts
(``expert_dtype: fp8``) read 1-byte weights and activations, run at the FP8 peak times
``fp8_gemm_efficiency``, and add a ``quant`` step before each GEMM (``quant``, ``quant_down``). With expert
tensor parallelism ``tp`` each GPU runs every row of its rank on 1/tp of f. All parameters are fitted per GPU by
``moesim calibrate`` on ``moesim bench moe`` timings (:mod:`moesim.calibration.moe`).

Launch (``engine.launch``): ``eager`` (the default) charges the fixed costs fitted on eager PyTorch, where the
host launches every op from Python and small layers are bound by it; ``cuda_graph`` charges those fitted on the
same steps replayed from CUDA graphs (``PipelineSpec.graph_steps``, ``graph_gemm_fixed_us``; measured by
benchmarks/validation/moe_h200/graphs.py), as serving engines replay decode steps: only the GPU's own time per
kernel. A step that syncs with the host (``torch_reference``'s ``permute`` sends its split sizes to the host)
has no graph cost, so ``cuda_graph`` needs a fused pipeline (``fused`` or ``deepgemm``). The replay's own launch
(about 4 us per graph, once per forward) is not charged.

Deliberately ignored: L2 reuse between steps, the overlap of one step's tail with the next step's launch,
split-K, stream-K and other schedulers that break the wave quantisation, and the gate's bias terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moesim.hardware.spec import GemmSpec, GPUSpec
from moesim.traces.model import ModelSpec

Pipeline = Literal["torch_reference", "fused", "deepgemm"]
PIPELINES: tuple[str, ...] = ("torch_reference", "fused", "deepgemm")
Launch = Literal["eager", "cuda_graph"]
LAUNCHES: tuple[str, ...] = ("eager", "cuda_graph")
BEFORE_DISPATCH = ("router", "permute", "a2a_issue", "align")  # on the tokens at home, before the dispatch all-to-all
AFTER_COMBINE = ("reduce",)  # on the tokens at home, after the combine all-to-all


@dataclass(frozen=True)
class LayerWork:
    """What one GPU handles in one MoE layer: ``home`` tokens routed from it, ``sent`` copies it sends
    (T x k picks), ``rows[..., e]`` rows it runs for each expert (0 for experts it does not hold)."""

    home: np.ndarray  # [...]
    sent: np.ndarray  # [...]
    rows: np.ndarray  # [..., E]


def gemm_work(rows: np.ndarray, n: int, k: int, spec: GemmSpec, *, weight_bytes: float, act_bytes: float,
              out_bytes: float, fp8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tiles (``ceil(r_e / tile_m) x ceil(n / tile_n)`` summed over experts, at the FP8 kernel's tile with
    ``fp8``) and bytes (the touched experts' weights, the rows in and out) of one grouped GEMM over
    ``rows[..., e]`` rows per expert."""
    rows = np.asarray(rows, dtype=float)
    tm, tn = spec.tile(fp8)
    tiles = (np.ceil(rows / tm) * np.ceil(n / tn)).sum(-1)
    touched = (rows > 0).sum(-1)
    nbytes = touched * float(k * n) * weight_bytes + rows.sum(-1) * (k * act_bytes + n * out_bytes)
    return tiles, nbytes


def grouped_gemm_time(rows: np.ndarray, n: int, k: int, gpu: GPUSpec, spec: GemmSpec, *, weight_bytes: float,
                      act_bytes: float, out_bytes: float, fp8: bool = False, launch: str = "eager") -> np.ndarray:
    """Seconds of one grouped GEMM (``[r_e, k] x [k, n]`` per expert), its fixed cost included: tile-padded
    waves over the SMs against the bytes of the touched experts' weights and the rows' activations."""
    tiles, nbytes = gemm_work(rows, n, k, spec, weight_bytes=weight_bytes, act_bytes=act_bytes, out_bytes=out_bytes,
                              fp8=fp8)
    peak = (gpu.fp8_tflops or 2 * gpu.bf16_tflops) if fp8 else gpu.bf16_tflops
    eff, meff, fixed = ((spec.fp8_gemm_efficiency, spec.fp8_gemm_hbm_efficiency, spec.fp8_gemm_fixed_us) if fp8 else
                        (spec.gemm_efficiency, spec.gemm_hbm_efficiency, spec.gemm_fixed_us))
    if launch == "cuda_graph":
        graph = spec.graph_fp8_gemm_fixed_us if fp8 else spec.graph_gemm_fixed_us
        fixed = fixed if graph is None else graph
    tm, tn = spec.tile(fp8)
    tile_s = 2.0 * tm * tn * k / (peak * 1e12 * eff / gpu.sms)
    busy = np.maximum(np.ceil(tiles / gpu.sms) * tile_s, nbytes / (gpu.hbm_GBps * 1e9 * meff))
    return (busy + fixed * 1e-6) * (tiles > 0)


def plain_gemm_time(tokens: np.ndarray, n: int, k: int, gpu: GPUSpec, *, dtype: str = "bf16", launch: str = "eager",
                    act_bytes: float = 2.0) -> np.ndarray:
    """Seconds of one plain GEMM ``[T, k] x [k, n]`` (a shared expert's, a dense layer's, a projection's) for
    ``tokens`` rows: :func:`grouped_gemm_time` of one expert holding every row, at the GPU's plain-GEMM fit
    (``GPUSpec.plain_gemm``, measured by benchmarks/validation/moe_h200/dense.py); fp8 reads 1-byte weights and
    activations, bf16 ``act_bytes``-byte ones; the output is bf16."""
    fp8 = dtype == "fp8"
    b = 1.0 if fp8 else float(act_bytes)
    return grouped_gemm_time(np.asarray(tokens, dtype=float)[..., None], n, k, gpu, gpu.plain_gemm, weight_bytes=b,
                             act_bytes=b, out_bytes=2.0, fp8=fp8, launch=launch)


def step_bytes(work: LayerWork, model: ModelSpec, *, pipeline: str, tp: int = 1, dtype: str = "bf16",
               expert_major: bool = False) -> dict[str, np.ndarray]:
    """Bytes each non-GEMM step of ``pipeline`` moves (the module docstring's table)."""
    d, f, E, b = model.d_model, model.d_ff // tp, model.num_experts, model.dtype_bytes
    T, S = np.asarray(work.home, dtype=float), np.asarray(work.sent, dtype=float)
    R = np.asarray(work.rows, dtype=float).sum(-1)
    out = {"router": T * d * b + d * E * b + 12.0 * T * E}
    if pipeline == "torch_reference":
        out["permute"] = 2.0 * S * d * b + 16.0 * S
        out["a2a_issue"] = 0.0 * T  # the host issuing the dispatch calls after the split-size sync (GPU idle)
        out["regroup"] = 2.0 * R * d * b + 16.0 * R
        out["activation"] = 5.0 * R * f * b  # chunk, SiLU (read f, write f), multiply (read 2f, write f)
        out["unregroup"] = 2.0 * R * d * b
        out["reduce"] = (3.0 * S * d + T * d) * b  # weigh the returned rows, index_add_ them into [T, d]
    else:
        if not expert_major:  # the dispatch delivers rows in token order: sort and pad them per expert
            out["align"] = 16.0 * S
            if pipeline == "deepgemm":  # DeepGEMM's contiguous layout: the rows are copied into it (ep_scatter)
                out["align"] = out["align"] + 2.0 * R * d * (1.0 if dtype == "fp8" else b)
        out["activation"] = 3.0 * R * f * b
        out["reduce"] = (S * d + T * d) * b
    if dtype == "fp8" and pipeline == "torch_reference":  # fused stacks quantise inside the dispatch and activation
        out["quant"] = R * d * (2.0 * b + 1.0)  # amax, scale, cast
        out["quant_down"] = R * f * (2.0 * b + 1.0)
    return out


def step_times(work: LayerWork, model: ModelSpec, gpu: GPUSpec, *, pipeline: str, tp: int = 1,
               dtype: str = "bf16", launch: str = "eager", expert_major: bool = False) -> dict[str, np.ndarray]:
    """Seconds of every step of ``pipeline`` (see the module docstring), fixed costs included; a step with no
    work (no tokens at home, no rows) costs nothing."""
    if pipeline not in gpu.moe_pipelines:
        raise ValueError(f"no MoE kernel pipeline {pipeline!r} on {gpu.name}; valid: {', '.join(gpu.moe_pipelines)}")
    if launch not in LAUNCHES:
        raise ValueError(f"launch must be {' or '.join(LAUNCHES)}, got {launch!r}")
    spec = gpu.moe_pipelines[pipeline]
    costs = spec.graph_steps if launch == "cuda_graph" else spec.steps
    d, f, E, b = model.d_model, model.d_ff // tp, model.num_experts, model.dtype_bytes
    T = np.asarray(work.home, dtype=float)
    rows = np.asarray(work.rows, dtype=float)
    R = rows.sum(-1)
    hbm = gpu.hbm_GBps * 1e9
    out: dict[str, np.ndarray] = {}
    for name, nbytes in step_bytes(work, model, pipeline=pipeline, tp=tp, dtype=dtype,
                                   expert_major=expert_major).items():
        cost = costs.get(name)
        if cost is None:
            how = "CUDA-graph cost (it syncs with the host, or was not measured under graphs)" \
                if launch == "cuda_graph" else "cost"
            raise ValueError(f"pipeline {pipeline!r} on {gpu.name} has no {how} for step {name!r}")
        active = T if name in BEFORE_DISPATCH + AFTER_COMBINE else R
        out[name] = (cost.fixed_us * 1e-6 + nbytes / (hbm * cost.hbm_efficiency)) * (active > 0)
    out["router"] = np.maximum(out["router"], 2.0 * T * d * E / gpu.dense_flops_per_s * (T > 0))
    fp8 = dtype == "fp8"
    wb = 1.0 if fp8 else float(b)
    out["gemm_gate_up"] = grouped_gemm_time(rows, 2 * f, d, gpu, spec, weight_bytes=wb, act_bytes=wb, out_bytes=b,
                                            fp8=fp8, launch=launch)
    out["gemm_down"] = grouped_gemm_time(rows, d, f, gpu, spec, weight_bytes=wb, act_bytes=wb, out_bytes=b, fp8=fp8,
                                         launch=launch)
    return out


def phase_times(work: LayerWork, model: ModelSpec, gpu: GPUSpec, *, pipeline: str, tp: int = 1,
                dtype: str = "bf16", launch: str = "eager",
                expert_major: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds before the dispatch (router, permutation), between dispatch and combine (the experts' side),
    and after the combine (the top-k reduction)."""
    steps = step_times(work, model, gpu, pipeline=pipeline, tp=tp, dtype=dtype, launch=launch,
                       expert_major=expert_major)
    zero = np.zeros(np.shape(work.home))
    before = sum((steps[s] for s in BEFORE_DISPATCH if s in steps), zero)
    after = sum((steps[s] for s in AFTER_COMBINE if s in steps), zero)
    experts = sum((v for s, v in steps.items() if s not in BEFORE_DISPATCH and s not in AFTER_COMBINE), zero)
    return before, experts, after
