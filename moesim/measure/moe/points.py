"""The points of ``moesim bench moe``: the model shapes, the sweep (shape, expert-parallel degree, pipeline,
dtype, routing, tokens), most important first, and a rough H200 time of each to plan the time budget."""

from __future__ import annotations

from dataclasses import dataclass

# d_model, d_ff (one routed expert's intermediate size), routed experts and top_k from each model's published
# config.json (Hugging Face):
SHAPES: dict[str, dict[str, int]] = {
    # deepseek-ai/DeepSeek-V3: hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 256,
    # num_experts_per_tok 8
    "deepseek-v3": {"d_model": 7168, "d_ff": 2048, "num_experts": 256, "top_k": 8},
    # moonshotai/Kimi-K2-Instruct: hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 384,
    # num_experts_per_tok 8
    "kimi-k2": {"d_model": 7168, "d_ff": 2048, "num_experts": 384, "top_k": 8},
    # Qwen/Qwen3-235B-A22B: hidden_size 4096, moe_intermediate_size 1536, num_experts 128, num_experts_per_tok 8
    "qwen3-235b-a22b": {"d_model": 4096, "d_ff": 1536, "num_experts": 128, "top_k": 8},
    # Qwen/Qwen3-30B-A3B: hidden_size 2048, moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8
    "qwen3-30b-a3b": {"d_model": 2048, "d_ff": 768, "num_experts": 128, "top_k": 8},
    # openai/gpt-oss-120b: hidden_size 2880, intermediate_size 2880, num_local_experts 128, num_experts_per_tok 4
    "gpt-oss-120b": {"d_model": 2880, "d_ff": 2880, "num_experts": 128, "top_k": 4},
    # deepseek-ai/DeepSeek-V2-Lite: hidden_size 2048, moe_intermediate_size 1408, n_routed_experts 64,
    # num_experts_per_tok 6
    "deepseek-v2-lite": {"d_model": 2048, "d_ff": 1408, "num_experts": 64, "top_k": 6},
    # allenai/OLMoE-1B-7B-0924: hidden_size 2048, intermediate_size 1024, num_experts 64, num_experts_per_tok 8
    "olmoe-1b-7b": {"d_model": 2048, "d_ff": 1024, "num_experts": 64, "top_k": 8},
    # mistralai/Mixtral-8x7B-v0.1: hidden_size 4096, intermediate_size 14336, num_local_experts 8,
    # num_experts_per_tok 2
    "mixtral-8x7b": {"d_model": 4096, "d_ff": 14336, "num_experts": 8, "top_k": 2},
}
CPU_SHAPES: dict[str, dict[str, int]] = {  # --cpu: tiny stand-ins (one with an EP8 slice, one without)
    "tiny-64e": {"d_model": 64, "d_ff": 32, "num_experts": 64, "top_k": 4},
    "tiny-8e": {"d_model": 48, "d_ff": 64, "num_experts": 8, "top_k": 2},
}
QUICK_SHAPES = ("qwen3-30b-a3b", "deepseek-v3")
TOKENS = (32, 128, 512, 2048, 8192, 16384)
ROUTINGS = ("uniform", "zipf1.0", "zipf2.0")
PIPELINES = ("torch_reference", "fused")
DTYPES = ("bf16", "fp8")
EP_SLICE = 8  # the expert-parallel slice recorded on one GPU for models with at least 64 experts
BUDGET_S = 380.0  # default: points not started this many seconds after the start are recorded as skipped


@dataclass(frozen=True)
class Point:
    """One measured point (a record)."""

    shape: str
    ep: int
    pipeline: str
    dtype: str
    routing: str
    tokens: int


def _eps(sh: dict[str, int], world: int) -> list[int]:
    if world > 1:
        return [world]
    E = sh["num_experts"]
    return [1, EP_SLICE] if E >= 64 and E % EP_SLICE == 0 else [1]


def sweep(shapes: dict[str, dict[str, int]], *, world: int = 1, quick: bool = False, cpu: bool = False,
          dtypes: tuple[str, ...] = DTYPES, pipelines: tuple[str, ...] = PIPELINES) -> list[Point]:
    """The points, most important first (a time budget cuts from the end): torch_reference bf16 at every token
    count and routing (EP1 and, for E >= 64, the EP8 slice); fp8 at T 128/2048/16384 with uniform and zipf1.0
    routing; fused (bf16, EP1) at every token count with uniform routing and at 2048/16384 with zipf1.0.
    ``quick``: T 128 and 2048, uniform routing. ``cpu``: T 8 and 32, uniform and zipf2.0, fused only at T 8."""
    tok: tuple[int, ...]
    routes: tuple[str, ...]
    tok8: tuple[int, ...]
    routes8: tuple[str, ...]
    fused_tok: tuple[tuple[int, str], ...]
    if cpu:
        tok, routes, tok8, routes8, fused_tok = (8, 32), ("uniform", "zipf2.0"), (32,), ("uniform",), ((8, "uniform"),)
    elif quick:
        tok, routes, tok8, routes8 = (128, 2048), ("uniform",), (128, 2048), ("uniform",)
        fused_tok = ((128, "uniform"), (2048, "uniform"))
    else:
        tok, routes, tok8, routes8 = TOKENS, ROUTINGS, (128, 2048, 16384), ("uniform", "zipf1.0")
        fused_tok = tuple((t, "uniform") for t in TOKENS) + ((2048, "zipf1.0"), (16384, "zipf1.0"))
    points: list[Point] = []
    if "bf16" in dtypes and "torch_reference" in pipelines:
        points += [Point(n, ep, "torch_reference", "bf16", r, t) for n, sh in shapes.items() for ep in _eps(sh, world)
                   for r in routes for t in tok]
    if "fp8" in dtypes and "torch_reference" in pipelines:
        points += [Point(n, ep, "torch_reference", "fp8", r, t) for n, sh in shapes.items() for ep in _eps(sh, world)
                   for r in routes8 for t in tok8]
    if "bf16" in dtypes and "fused" in pipelines and world == 1:
        points += [Point(n, 1, "fused", "bf16", r, t) for n in shapes for t, r in fused_tok]
    return points


def estimate_ms(sh: dict[str, int], pt: Point) -> float:
    """A rough H200 time of one run of a point's pipeline (uniform routing), to plan the sweep: launch floor +
    max(GEMM FLOPs at 600 (bf16) / 1000 (fp8) TFLOP/s, touched expert weights at 3.5 TB/s) + row copies at
    3 TB/s."""
    d, f, E, k = sh["d_model"], sh["d_ff"], sh["num_experts"], sh["top_k"]
    L, R = E // pt.ep, pt.tokens * k
    touched = L * (1 - (1 - k / E) ** (pt.tokens * pt.ep))
    fp8 = pt.dtype == "fp8"
    gemm = max(6 * R * d * f / (1.0e15 if fp8 else 0.6e15), touched * 3 * d * f * (1 if fp8 else 2) / 3.5e12)
    copies = (2 * R * d * (12 if pt.pipeline == "torch_reference" else 4) + 10 * R * f) / 3.0e12
    return (0.7 if pt.pipeline == "torch_reference" else 0.4) + (gemm + copies) * 1e3


def estimate_seconds(shapes: dict[str, dict[str, int]], points: list[Point], warmup: int, reps: int) -> float:
    """Estimated wall time of the sweep on an H200: every point's runs (two per repetition, plus 0.3 ms of L2
    flush and synchronisation each), 0.1 s of set-up per point, the weights' initialisation per shape and
    2.5 s per Triton kernel compiled."""
    runs = 2 * (warmup + reps)
    total = sum(runs * (estimate_ms(shapes[p.shape], p) + 0.3) / 1e3 + 0.1 for p in points)
    total += sum(0.2 + 3 * s["num_experts"] * s["d_model"] * s["d_ff"] * 2 / 5e11 for s in shapes.values())
    return total + (7 * 2.5 if any(p.pipeline == "fused" for p in points) else 0.0)
