"""The prefill attention kernel families in ``moesim calibrate``: ``moesim bench attention-kernels`` (format
``moesim.bench.attention_kernels/1``, :mod:`moesim.measure.attention_kernels`) against the engine's attention core.

Every record is a causal prefill core, forward or backward, of one backend on one shape, predicted by the engine's own
:func:`moesim.sim.compute.attention_time` (GQA shapes as GQA models; the ``mla-prefill`` shape as a multi-head latent
attention model of its head sizes, whose prefill core is not absorbed), on the GPU-side kernel time
(``gpu_kernel_ms``; the event-timed ``median_ms`` of a run without the profiler, on the CPU).

- ``flash`` (PyTorch's FlashAttention-2): the forward is FlashAttention-2's fit on the GPU's own ``attention_*`` fields
  (``moesim bench attention``), not refitted here: every forward is a held-out check of it on new shapes (MLA's
  192-wide heads; V padded to Q's). Fitted: ``GPUSpec.attention_backward``, its backward: 2.5 times the forward's
  FLOPs plus fixed keys per query row at its own share of peak, plus a fixed cost.
- Any other backend (``cudnn``: cuDNN's fused attention, Hopper-native): a family of its own
  (``GPUSpec.attention_kernels[name]``): efficiency, fixed keys per query row and fixed cost per kernel, by a grid
  search for the smallest mean |log error| (the objective of :mod:`moesim.calibration.attention`), and its backward
  the same way.

Two thirds of each (backend, shape)'s sizes fit (every third, ordered by tokens and sequence length, is held out, the
forward and backward of a size together); the errors of the rest are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from moesim.calibration.schema import items, number
from moesim.errors import InputError
from moesim.hardware.spec import AttentionBackwardSpec, AttentionKernelSpec, GPUSpec
from moesim.sim.compute import Attention, attention_backward_time, attention_time
from moesim.traces.model import ModelSpec

FORMAT = "moesim.bench.attention_kernels/1"
FLASH = "flash"  # the bench's name for FlashAttention-2, the GPU's own attention_* fit (engine name fa2)
EFFICIENCIES = np.round(np.arange(0.20, 0.951, 0.01), 2)
FIXED_KEYS = tuple(range(0, 1025, 32))
OVERHEADS_US = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0)
FIELDS = ("seq_len", "batch", "heads", "kv_heads", "dk", "dv")


@dataclass(frozen=True)
class KernelPoint:
    backend: str
    shape: str
    seq_len: int
    batch: int
    model: ModelSpec
    fwd_s: float
    bwd_s: float

    @property
    def label(self) -> str:
        return f"{self.backend} {self.shape} s={self.seq_len} prompts={self.batch}"


def _model(r: dict) -> ModelSpec:
    """A model of the record's attention shape: GQA, or MLA (Q/K wider than V) with 64 rotary dimensions."""
    if r["dk"] != r["dv"] or r["shape"].startswith("mla"):
        return ModelSpec(name=r["shape"], num_layers=1, num_experts=1, top_k=1, d_model=7168, d_ff=1,
                         num_heads=r["heads"], q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                         qk_nope_head_dim=r["dk"] - 64, v_head_dim=r["dv"])
    return ModelSpec(name=r["shape"], num_layers=1, num_experts=1, top_k=1, d_model=r["heads"] * r["dk"], d_ff=1,
                     num_heads=r["heads"], num_kv_heads=r["kv_heads"], head_dim=r["dk"])


def check_kernels(raw: dict, src: str) -> list[KernelPoint]:
    """The measured points of a file, a forward and a backward each; one-line errors naming a malformed field."""
    found: dict[tuple, dict[str, float]] = {}
    meta: dict[tuple, dict] = {}
    for i, r in enumerate(items(raw, "records", src, required=True)):
        where = f"records[{i}]"
        if "skipped" in r:
            continue
        for name in FIELDS:
            number(r, name, src, where, integer=True)
        if r.get("direction") not in ("fwd", "bwd"):
            raise InputError(f"must be fwd or bwd, got {r.get('direction')!r}", source=src, field=f"{where}.direction")
        if not isinstance(r.get("backend"), str) or not isinstance(r.get("shape"), str):
            raise InputError("backend and shape must be names", source=src, field=where)
        if r["shape"].startswith("mla") and r["dk"] <= 64:
            raise InputError("an MLA shape's Q/K heads hold 64 rotary dimensions and more", source=src,
                             field=f"{where}.dk")
        timing = "gpu_kernel_ms" if r.get("gpu_kernel_ms") is not None else "median_ms"  # a CPU run has no profiler
        ms = number(r, timing, src, where)
        key = (r["backend"], r["shape"], r["seq_len"], r["batch"])
        found.setdefault(key, {})[r["direction"]] = ms * 1e-3
        meta[key] = r
    points = []
    for key, t in found.items():
        if len(t) == 2:
            r = meta[key]
            points.append(KernelPoint(r["backend"], r["shape"], r["seq_len"], r["batch"], _model(r), t["fwd"],
                                      t["bwd"]))
    return points


def held_out(points: list[KernelPoint]) -> list[bool]:
    """Every third size of each (backend, shape), ordered by tokens then sequence length."""
    held = [False] * len(points)
    for group in {(p.backend, p.shape) for p in points}:
        idx = sorted((i for i, p in enumerate(points) if (p.backend, p.shape) == group),
                     key=lambda i: (points[i].batch * points[i].seq_len, points[i].seq_len))
        for j, i in enumerate(idx):
            held[i] = j % 3 == 1
    return held


def forward_s(p: KernelPoint, gpu: GPUSpec, kernel: str) -> float:
    """The engine's forward seconds for point ``p`` with kernel family ``kernel`` (fa2 or one of the GPU's)."""
    tokens = np.array([float(p.batch * p.seq_len)])
    return float(attention_time(tokens, p.model, gpu, Attention("prefill", p.seq_len, kernel))[0])


def backward_s(p: KernelPoint, gpu: GPUSpec, kernel: str) -> float:
    """The engine's backward seconds for point ``p`` (:func:`moesim.sim.compute.attention_backward_time`)."""
    tokens = np.array([float(p.batch * p.seq_len)])
    return float(attention_backward_time(tokens, p.model, gpu, Attention("prefill", p.seq_len, kernel))[0])


def _grid(points: list[KernelPoint], measured: np.ndarray, gpu: GPUSpec,
          probe: Callable[[GPUSpec, float], Callable[[KernelPoint], float]]) -> tuple[float, float, float]:
    """(efficiency, fixed keys, fixed cost in us) with the smallest mean |log error|: ``probe(gpu, keys)`` is a
    point's seconds at a peak of 1 FLOP/s, efficiency 1 and no fixed cost, linear in the keys."""
    one = gpu.model_copy(update={"bf16_tflops": 1e-12})
    f0 = np.array([probe(one, 0.0)(p) for p in points])
    f1 = np.array([probe(one, 1.0)(p) for p in points])
    keys = np.asarray(FIXED_KEYS, dtype=float)
    flops = f0[None, :] + keys[:, None] * (f1 - f0)[None, :]  # [keys, points]
    rate = gpu.bf16_tflops * 1e12 * EFFICIENCIES
    t = flops[None, :, None, :] / rate[:, None, None, None] + np.asarray(OVERHEADS_US)[None, None, :, None] * 1e-6
    err = np.abs(np.log(t / measured)).mean(-1)
    i, j, k = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(EFFICIENCIES[i]), float(FIXED_KEYS[j]), float(OVERHEADS_US[k])


def fit_backward(points: list[KernelPoint], gpu: GPUSpec, kernel: str) -> AttentionBackwardSpec:
    """The backward of kernel family ``kernel`` (fa2 or one of ``gpu``'s), by grid search on the backwards."""
    def probe(g: GPUSpec, keys: float) -> Callable[[KernelPoint], float]:
        spec = AttentionBackwardSpec(efficiency=1.0, fixed_keys=keys)
        if kernel == "fa2":
            g = g.model_copy(update={"attention_backward": spec})
        else:
            g = g.model_copy(update={"attention_kernels": {kernel: AttentionKernelSpec(efficiency=1.0,
                                                                                       backward=spec)}})
        return lambda p: backward_s(p, g, kernel)

    eff, keys, over = _grid(points, np.array([p.bwd_s for p in points]), gpu, probe)
    return AttentionBackwardSpec(efficiency=eff, fixed_keys=keys, overhead_us=over)


def fit_family(points: list[KernelPoint], gpu: GPUSpec, name: str) -> AttentionKernelSpec:
    """Kernel family ``name``'s forward (grid search on the forwards) and backward."""
    if not points:
        raise InputError(f"every point of attention kernel {name!r} is held out: measure more sizes", field="records")

    def probe(g: GPUSpec, keys: float) -> Callable[[KernelPoint], float]:
        g = g.model_copy(update={"attention_kernels": {name: AttentionKernelSpec(efficiency=1.0, fixed_keys=keys)}})
        return lambda p: forward_s(p, g, name)

    eff, keys, over = _grid(points, np.array([p.fwd_s for p in points]), gpu, probe)
    family = AttentionKernelSpec(efficiency=eff, fixed_keys=keys, overhead_us=over)
    with_family = gpu.model_copy(update={"attention_kernels": {**gpu.attention_kernels, name: family}})
    return family.model_copy(update={"backward": fit_backward(points, with_family, name)})


def fit_kernels(points: list[KernelPoint], held: list[bool], gpu: GPUSpec) -> dict:
    """The GPU fields this benchmark fits: ``attention_backward`` (FlashAttention-2's, from the flash records) and
    ``attention_kernels`` (one family per other backend), as a partial GPU dict."""
    out: dict = {}
    train = [p for p, h in zip(points, held) if not h]
    flash = [p for p in train if p.backend == FLASH]
    if flash:
        out["attention_backward"] = fit_backward(flash, gpu, "fa2").model_dump()
    families = {backend: fit_family([p for p in train if p.backend == backend], gpu, backend).model_dump()
                for backend in sorted({p.backend for p in points} - {FLASH})}
    if families:
        out["attention_kernels"] = families
    return out


def kernel_predictions(points: list[KernelPoint], held: list[bool],
                       gpu: GPUSpec) -> list[tuple[str, str, float, float, bool]]:
    """(kind, label, measured ms, predicted ms, held out) of every forward and backward; the flash forwards are all
    held out (not fitted here)."""
    rows = []
    for p, h in zip(points, held):
        kernel = "fa2" if p.backend == FLASH else p.backend
        if kernel != "fa2" and kernel not in gpu.attention_kernels:
            continue
        rows.append((f"attention-{kernel}-fwd", p.label, p.fwd_s * 1e3, forward_s(p, gpu, kernel) * 1e3,
                     h or kernel == "fa2"))
        rows.append((f"attention-{kernel}-bwd", p.label, p.bwd_s * 1e3, backward_s(p, gpu, kernel) * 1e3, h))
    return rows
