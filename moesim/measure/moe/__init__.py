"""The whole MoE layer on one GPU, step by step: what ``moesim bench moe`` measures.

Pipeline ``torch_reference`` is the plain PyTorch expert-parallel MoE layer: router, permute, dispatch
all-to-all, regroup, grouped GEMMs (``torch._grouped_mm``; fp8: ``torch._scaled_grouped_mm``), activation,
unregroup, combine all-to-all and the weighted reduce. It runs through torch.distributed (NCCL; world size 1 on
one GPU, so that the one-GPU layer makes the same ``all_to_all_single`` calls and host synchronisations as the
N-GPU one; ``nproc`` > 1 runs N ranks under torchrun). Pipeline ``fused`` is a vLLM fused_moe-style Triton
implementation (:mod:`moesim.measure.fused_moe`). A point is one shape, expert-parallel degree, pipeline, dtype,
routing and token count. Every step is timed with CUDA events recorded between the steps of one run (median
over the repetitions) and the whole layer as one region without events (median, min, max); L2 is flushed before
each repetition. Each record holds the exact rows per local expert, so a model can be evaluated on the exact
load. :data:`METHOD` (written into the JSON) says exactly what each step does.

Ignored: attention and everything else outside the routed experts (shared experts, norms, the router's bias
or auxiliary losses, gpt-oss's clamped SwiGLU: every expert is a plain SiLU(gate)*up SwiGLU), CUDA graphs, and
on one GPU the network: an expert-parallel slice on one GPU is emulated and its all-to-alls are NCCL copies to
itself (see METHOD). ``cpu=True`` runs tiny shapes in float32 with gloo (fp8 points are recorded as skipped; the
fused pipeline runs in Triton's interpreter if Triton is installed): it checks the plumbing and the numerics,
not the timings.

The JSON (``moe.json``, format ``moesim.bench.moe/1``: device/torch/cuda/sms/world_size/date/method,
warmup/reps/l2_flush, ``ceilings``, ``fp8_scaling`` and ``records``) is rewritten atomically after every point;
a point that could not run is a record with ``skipped`` and no timings.

Modules: :mod:`~moesim.measure.moe.points` (shapes and the sweep), :mod:`~moesim.measure.moe.inputs` (routing,
tokens, weights), :mod:`~moesim.measure.moe.pipeline` (the steps), :mod:`~moesim.measure.moe.measure` (timing and
device facts), :mod:`~moesim.measure.moe.method` (the method text) and :mod:`~moesim.measure.moe.driver` (the run,
the JSON, the command line). Like the rest of :mod:`moesim.measure` they import only torch, the standard library,
:mod:`moesim.errors` and :mod:`moesim.fileio`, so that they load without moesim's own dependencies.
"""

from moesim.measure.moe.driver import FORMAT, launch, main, measure_point, open_group, run
from moesim.measure.moe.inputs import (
    FP8_MAX, Plan, Weights, make_plan, make_weights, pick_experts, quant_rows, quant_weights, seed_of,
)
from moesim.measure.moe.measure import Timer, ceilings, probe_blockwise, self_check
from moesim.measure.moe.method import METHOD
from moesim.measure.moe.pipeline import Comm, Step, dense_moe, fused_steps, reference_steps, router_step, run_layer
from moesim.measure.moe.points import (
    BUDGET_S, CPU_SHAPES, DTYPES, EP_SLICE, PIPELINES, QUICK_SHAPES, ROUTINGS, SHAPES, TOKENS, Point,
    estimate_ms, estimate_seconds, sweep,
)

__all__ = [
    "BUDGET_S", "CPU_SHAPES", "DTYPES", "EP_SLICE", "FORMAT", "FP8_MAX", "METHOD", "PIPELINES", "QUICK_SHAPES",
    "ROUTINGS", "SHAPES", "TOKENS", "Comm", "Plan", "Point", "Step", "Timer", "Weights", "ceilings", "dense_moe",
    "estimate_ms", "estimate_seconds", "fused_steps", "launch", "main", "make_plan", "make_weights",
    "measure_point", "open_group", "pick_experts", "probe_blockwise", "quant_rows", "quant_weights",
    "reference_steps", "router_step", "run", "run_layer", "seed_of", "self_check", "sweep",
]
