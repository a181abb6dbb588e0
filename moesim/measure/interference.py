"""Compute beside a communication kernel that holds SMs: how much slower a prefill layer's kernels run while an
all-to-all kernel occupies 24 of the GPU's SMs (DeepEP's normal kernels as DeepSeek's and SGLang's prefill run them,
``Buffer.set_num_sms(24)``), against the same kernels alone. What
``benchmarks/validation/power_h200/measure_interference.py`` measures.

The communication kernel is a stand-in written in Triton, launched on a side stream with one block of 1,024 threads on
each of ``comm_sms`` SMs (the block scheduler spreads blocks over SMs first), relaunched back to back for as long
as the compute runs; two kinds:

- ``spin``: every block spins on arithmetic and touches no memory (DeepEP's kernels poll flags most of the time);
- ``copy``: every block streams a 256 MiB buffer through HBM as fast as it can (an upper bound of the memory traffic
  an all-to-all kernel makes on its own GPU).

The compute: one DeepSeek-V3 MoE layer of one EP32 prefill GPU and micro-batch (8,192 tokens, balanced routing over 8
local experts), with the activations quantised beforehand as fused engines do: RMSNorm, the five FP8 projections
(rowwise-scaled cuBLAS), cuDNN's causal attention (2 prompts of 4,096 tokens, 192/128), the router, the shared expert
and the 8 experts' FP8 GEMMs and SwiGLUs. It runs back to back for ``seconds`` per case (the median per-layer time
over the last 60% of chunks is ``steady_ms``), and a single FP8 GEMM is timed the same way. Cases: alone; beside
``spin``; beside ``copy``; and, where PyTorch has it, beside ``spin`` with cuBLAS told to leave the ``comm_sms`` SMs
free (``torch._C._set_sm_carveout_experimental``, as DeepGEMM's ``set_num_sms`` does for DeepSeek and SGLang).
Nothing here changes the GPU's settings.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

FORMAT = "moesim.bench.interference/1"


def _fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12) / 448.0
    return (x / scale).to(torch.float8_e4m3fn), scale


def _comm_kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def spin(out_ptr, iters, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32) + tl.program_id(0).to(tl.float32)
        for _ in range(iters):
            acc = acc * 0.999999 + 0.5
        tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)

    @triton.jit
    def copy(src, dst, n, rounds, BLOCK: tl.constexpr):
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        for _ in range(rounds):
            for start in range(pid * BLOCK, n, nprog * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                tl.store(dst + offs, tl.load(src + offs))

    return spin, copy


class _Comm:
    """A stand-in communication kernel on ``sms`` SMs, sized to about 10 ms a launch."""

    def __init__(self, kind: str, sms: int) -> None:
        spin, copy = _comm_kernels()
        self.stream = torch.cuda.Stream()
        if kind == "spin":
            out = torch.empty(sms * 1024, device="cuda", dtype=torch.float32)
            self.launch_n = lambda n: spin[(sms,)](out, n, BLOCK=1024, num_warps=32)
        else:
            src = torch.randn(128 << 20, device="cuda", dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            self.launch_n = lambda n: copy[(sms,)](src, dst, src.numel(), n, BLOCK=8192, num_warps=32)
        self.n = self._size(1)

    def _ms(self, n: int) -> float:
        self.launch_n(n)  # Triton specialises on the argument: compile first, then time
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        self.launch_n(n)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    def _size(self, n: int) -> int:
        while (ms := self._ms(n)) < 2.0:
            if n > 1 << 28:
                raise RuntimeError("the stand-in communication kernel does not lengthen with its argument")
            n *= 4
        n = max(2, int(n * 10.0 / ms)) // 2 * 2 + 16  # even, and past Triton's specialisation of small values
        self.ms = self._ms(n)
        return n

    def cover(self, seconds: float) -> None:
        """Queue launches on the side stream for about ``seconds``."""
        with torch.cuda.stream(self.stream):
            for _ in range(int(seconds * 1e3 / self.ms) + 2):
                self.launch_n(self.n)


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _linear(rows: int, k: int, n: int) -> Callable[[], torch.Tensor]:
    """An FP8 GEMM [rows, k] x [k, n] on inputs quantised once (rowwise scales, bf16 out)."""
    xq, xs = _fp8(_bf16(rows, k))
    wq, ws = _fp8(_bf16(n, k) * k ** -0.5)
    wt, wst = wq.t(), ws.t().contiguous()
    return lambda: torch._scaled_mm(xq, wt, xs, wst, out_dtype=torch.bfloat16, use_fast_accum=True)


def _swiglu(h: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    return run


def layer_parts(tokens: int = 8192, seq: int = 4096, experts: int = 8) -> dict[str, Callable[[], object]]:
    """One DeepSeek-V3 MoE layer's compute on one EP32 prefill GPU, activations quantised beforehand, as named parts
    in execution order (the names of :data:`moesim.calibration.sustained.TENSOR_PARTS` are the GEMMs and the core)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d, H, rq, rkv, n, p, v, f = 7168, 128, 1536, 512, 128, 64, 128, 2048
    b = tokens // seq
    q, k, vv = _bf16(b, H, seq, n + p), _bf16(b, H, seq, n + p), _bf16(b, H, seq, v)
    x, wn = _bf16(tokens, d), torch.ones(d, device="cuda", dtype=torch.bfloat16)
    router = _bf16(256, d) * d ** -0.5
    qa, qb, kvb, o = _linear(tokens, d, rq + rkv + p), _linear(tokens, rq, H * (n + p)), \
        _linear(tokens, rkv, H * (n + v)), _linear(tokens, H * v, d)
    shared = [_linear(tokens, d, 2 * f), _linear(tokens, f, d)]
    ups = [_linear(tokens, d, 2 * f) for _ in range(experts)]
    downs = [_linear(tokens, f, d) for _ in range(experts)]
    swiglu = _swiglu(_bf16(tokens, 2 * f))

    def core() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, vv, is_causal=True)

    return {"rmsnorm": lambda: F.rms_norm(x, (d,), wn), "q_a+kv_a": qa, "q_b": qb, "kv_b": kvb, "core": core,
            "o": o, "router": lambda: torch.topk(F.linear(x, router).float().sigmoid(), 8, dim=-1),
            "shared": lambda: [g() for g in shared], "swiglu": lambda: [swiglu() for _ in range(experts + 1)],
            "experts_up": lambda: [g() for g in ups], "experts_down": lambda: [g() for g in downs]}


def decode_parts(requests: int = 128, kv: int = 4096, experts: int = 2) -> dict[str, Callable[[], object]]:
    """One DeepSeek-V3 MoE layer's compute on one EP128 decode GPU (DeepSeek's profiled decode: 128 requests over
    4,096 cached tokens, 2 local experts under balanced routing): FP8 projections, the weight-absorbed MLA core as
    batched matmuls over the latent cache (576 wide, 128 heads), the experts' and the shared expert's FP8 GEMMs."""
    d, H, rq, r, p, f = 7168, 128, 1536, 512, 64, 2048
    T, rows = requests, requests * 8 * 128 // 256
    qa, qb, o = _linear(T, d, rq + r + p), _linear(T, rq, H * (128 + p)), _linear(T, H * 128, d)
    q, cache, values = _bf16(T, H, r + p), _bf16(T, kv, r + p), _bf16(T, kv, r)
    w_uk, w_uv, qn, lat = _bf16(H, 128, r), _bf16(H, r, 128), _bf16(H, T, 128), _bf16(H, T, r)
    shared = [_linear(T, d, 2 * f), _linear(T, f, d)]
    ups = [_linear(rows, d, 2 * f) for _ in range(experts)]
    downs = [_linear(rows, f, d) for _ in range(experts)]

    def core() -> torch.Tensor:
        scores = torch.bmm(q, cache.transpose(1, 2)).softmax(-1)
        return torch.bmm(scores, values)

    return {"q_a+kv_a": qa, "q_b": qb, "absorb": lambda: (torch.bmm(qn, w_uk), torch.bmm(lat, w_uv)),
            "core_decode": core, "o": o, "shared": lambda: [g() for g in shared],
            "experts_up": lambda: [g() for g in ups], "experts_down": lambda: [g() for g in downs]}


def layer(tokens: int = 8192, seq: int = 4096, experts: int = 8) -> Callable[[], object]:
    """:func:`layer_parts` run in order."""
    parts = list(layer_parts(tokens, seq, experts).values())
    return lambda: [part() for part in parts]


def one_gemm() -> Callable[[], object]:
    xq, xs = _fp8(torch.randn(8192, 7168, device="cuda", dtype=torch.bfloat16))
    wq, ws = _fp8(torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16) * 7168 ** -0.5)
    wt, wst = wq.t(), ws.t().contiguous()
    return lambda: torch._scaled_mm(xq, wt, xs, wst, out_dtype=torch.bfloat16, use_fast_accum=True)


def _steady(fn: Callable[[], object], seconds: float, per_chunk: int) -> tuple[float, list[float]]:
    events = [torch.cuda.Event(enable_timing=True)]
    events[0].record()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(per_chunk):
            fn()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append(e)
        if len(events) % 8 == 0:
            events[-4].synchronize()
    events[-1].synchronize()
    ms = [a.elapsed_time(b) / per_chunk for a, b in zip(events, events[1:])]
    return statistics.median(ms[int(len(ms) * 0.4):] or ms), ms


def _carveout(sms: int) -> bool:
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if setter is None:
        return False
    setter(sms if sms else None)
    return True


def run(out: str | Path, *, comm_sms: int = 24, seconds: float = 5.0, rest: float = 2.0,
        log: Callable[[str], None] = print) -> Path:
    """Every case (module docstring); writes ``interference.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    doc: dict = {"format": FORMAT, "host": platform.node(), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "comm_sms": comm_sms, "seconds": seconds, "cases": []}
    comms = {kind: _Comm(kind, comm_sms) for kind in ("spin", "copy")}
    for kind, c in comms.items():
        doc[f"{kind}_launch_ms"] = c.ms
        log(f"{kind} kernel: {c.ms:.2f} ms a launch on {comm_sms} SMs")
    fns = {"layer": (layer(), 2), "fp8_gemm": (one_gemm(), 50)}
    cases = [("alone", None, False), ("spin", "spin", False), ("copy", "copy", False), ("spin+carveout", "spin", True),
             ("alone+carveout", None, True)]
    for name, (fn, per_chunk) in fns.items():
        for _ in range(3):
            fn()
        for case, comm, carve in cases:
            if carve and not _carveout(comm_sms):
                log(f"{name:9s} {case:15s} skipped: no SM carveout in this PyTorch")
                continue
            torch.cuda.synchronize()
            time.sleep(rest)
            if comm is not None:
                comms[comm].cover(seconds + 1.0)
            steady, ms = _steady(fn, seconds, per_chunk)
            torch.cuda.synchronize()
            if carve:
                _carveout(0)
            doc["cases"].append({"kernel": name, "case": case, "steady_ms": steady, "first_ms": ms[0],
                                 "chunks_ms": [round(v, 5) for v in ms]})
            log(f"{name:9s} {case:15s} steady {steady:8.3f} ms  first chunk {ms[0]:8.3f} ms")
    path = out / "interference.json"
    path.write_text(json.dumps(doc, indent=1))
    return path
