"""Kernels under sustained load: how a GPU's rate on a kernel run back to back for seconds (as a prefill forward or a
training step keeps it busy) compares with the isolated launches a micro-benchmark times.

A data-centre GPU caps its board power (700 W on an H100/H800/H200 SXM): tensor-core work drawn back to back pulls
the SM clock below its boost within tens of milliseconds, while a micro-benchmark that flushes the L2 and synchronises
between launches lets the GPU idle between them. What ``benchmarks/validation/power_h200/measure_sustained.py``
measures, per kernel:

- ``burst_ms``: the median of isolated launches after two idle seconds (L2 flushed before each, synchronised), the way
  every moesim calibration file was timed;
- ``chunks``: the kernel repeated back to back for ``seconds``, timed in chunks of about 20 ms by CUDA events (no
  synchronisation in between): per chunk its start (seconds from the first) and the mean ms per launch;
- ``steady_ms``: the median per-launch time over the last 40% of the chunks.

Kernels (one GPU of DeepSeek-V3's EP32 prefill, one micro-batch of 8,192 tokens): an FP8 GEMM (rowwise-scaled
``torch._scaled_mm``, the expert gate-up shape 8192 x 7168 x 4096), the same GEMM in bf16, cuDNN's fused causal
attention on DeepSeek-V3's MLA prefill shape (2 prompts of 4,096 tokens, 128 heads, 192/128), an HBM copy, and a
whole layer's compute (``layer``: RMSNorm, the five FP8 projections, the core, the router, 8 local experts' FP8 GEMMs
with their SwiGLU, the shared expert), whose parts are also timed one by one in bursts (``layer_parts``).
``nvidia-smi`` is sampled every 50 ms meanwhile (SM clock, power, temperature, throttle reasons) when present, with
the wall-clock time each kernel's run started, so the clocks can be matched to the chunks. Nothing here changes the
GPU's settings.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

FORMAT = "moesim.bench.sustained/1"
SMI_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"


def _fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12) / 448.0
    return (x / scale).to(torch.float8_e4m3fn), scale


class _Kit:
    """Weights and inputs for the kernels, on ``device`` (cpu: tiny shapes, float32, for a plumbing check)."""

    def __init__(self, device: str, scale: int) -> None:
        self.device, self.scale = device, scale
        self.cpu = device == "cpu"
        self.dtype = torch.float32 if self.cpu else torch.bfloat16

    def t(self, *shape: int, s: float = 1.0) -> torch.Tensor:
        shape = tuple(max(1, v // self.scale) for v in shape)
        return torch.randn(*shape, device=self.device, dtype=self.dtype) * s

    def linear(self, k: int, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """y = x @ W^T for a [n, k] weight: FP8 rowwise-scaled on a GPU, plain on the CPU."""
        w = self.t(n, k, s=k ** -0.5)
        if self.cpu:
            return lambda x: F.linear(x, w)
        wq, ws = _fp8(w)
        wt, wst = wq.t(), ws.t().contiguous()

        def run(x: torch.Tensor) -> torch.Tensor:
            xq, xs = _fp8(x)
            return torch._scaled_mm(xq, wt, xs, wst, out_dtype=torch.bfloat16, use_fast_accum=True)
        return run

    def gemm_only(self, m: int, k: int, n: int, fp8: bool) -> Callable[[], object]:
        """One GEMM on inputs made (and quantised) once."""
        x, w = self.t(m, k), self.t(n, k, s=k ** -0.5)
        if self.cpu or not fp8:
            return lambda: F.linear(x, w)
        xq, xs = _fp8(x)
        wq, ws = _fp8(w)
        wt, wst = wq.t(), ws.t().contiguous()
        return lambda: torch._scaled_mm(xq, wt, xs, wst, out_dtype=torch.bfloat16, use_fast_accum=True)

    def attention(self, prompts: int, seq: int, heads: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                         torch.Tensor]:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.cpu:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w


def layer_parts(kit: _Kit, tokens: int = 8192, seq: int = 4096, experts: int = 8) -> dict[str, Callable[[], object]]:
    """One DeepSeek-V3 MoE layer's compute on one EP32 prefill GPU (``tokens`` per micro-batch, balanced routing:
    each of its ``experts`` local experts runs ``tokens`` rows), as callables in execution order."""
    d, H, rq, rkv, n, p, v, f = 7168, 128, 1536, 512, 128, 64, 128, 2048
    S, Hs, b = max(1, seq // kit.scale), max(1, H // kit.scale), max(1, tokens // seq)
    x, wn = kit.t(tokens, d), kit.t(d)
    qa_kva, q_b, kv_b, o = kit.linear(d, rq + rkv + p), kit.linear(rq, H * (n + p)), kit.linear(rkv, H * (n + v)), \
        kit.linear(H * v, d)
    cq, ckv = kit.t(tokens, rq), kit.t(tokens, rkv)
    q = kit.t(b * H * seq, n + p).view(b, Hs, S, -1)
    k = kit.t(b * H * seq, n + p).view(b, Hs, S, -1)
    vv = kit.t(b * H * seq, v).view(b, Hs, S, -1)
    core = kit.attention(b, seq, H)
    att = kit.t(tokens, H * v)
    router = kit.t(256, d, s=d ** -0.5)
    ups = [kit.linear(d, 2 * f) for _ in range(experts)]
    downs = [kit.linear(f, d) for _ in range(experts)]
    h, hd = kit.t(tokens, 2 * f), kit.t(tokens, f)
    shared_up, shared_down = kit.linear(d, 2 * f), kit.linear(f, d)

    def swiglu(a: torch.Tensor) -> torch.Tensor:
        g, u = a.chunk(2, dim=-1)
        return F.silu(g) * u

    return {
        "rmsnorm": lambda: _rms(x, wn),
        "q_a+kv_a": lambda: qa_kva(x),
        "q_b": lambda: q_b(cq),
        "kv_b": lambda: kv_b(ckv),
        "core": lambda: core(q, k, vv),
        "o": lambda: o(att),
        "router": lambda: torch.topk(F.linear(x, router).float().sigmoid(), min(8, router.shape[0]), dim=-1),
        "experts_up": lambda: [up(x) for up in ups],
        "swiglu": lambda: [swiglu(h) for _ in range(experts)],
        "experts_down": lambda: [down(hd) for down in downs],
        "shared": lambda: shared_down(swiglu(shared_up(x))),
        "residual": lambda: x + x,
    }


def composites(kit: _Kit) -> dict[str, dict[str, Callable[[], object]]]:
    """Whole layers as named parts: the eager prefill layer; on a GPU also the fused prefill layer and a decode layer
    (:mod:`moesim.measure.interference`)."""
    out = {"layer": layer_parts(kit)}
    if not kit.cpu:
        from moesim.measure.interference import decode_parts
        from moesim.measure.interference import layer_parts as fused_parts
        out |= {"fused_layer": fused_parts(), "decode_layer": decode_parts()}
    return out


def kernels(kit: _Kit) -> dict[str, Callable[[], object]]:
    """The single kernels and the whole layers."""
    layers = {name: list(parts.values()) for name, parts in composites(kit).items()}
    b, H, S = 2, 128, 4096
    q = kit.t(b * H * S, 192).view(b, max(1, H // kit.scale), max(1, S // kit.scale), -1)
    k = kit.t(b * H * S, 192).view(b, max(1, H // kit.scale), max(1, S // kit.scale), -1)
    v = kit.t(b * H * S, 128).view(b, max(1, H // kit.scale), max(1, S // kit.scale), -1)
    core = kit.attention(b, S, H)
    src, dst = kit.t(1 << 29), kit.t(1 << 29)  # 1 GiB each in bf16
    return {"fp8_gemm": kit.gemm_only(8192, 7168, 4096, fp8=True),
            "bf16_gemm": kit.gemm_only(8192, 7168, 4096, fp8=False),
            "attention": lambda: core(q, k, v),
            "hbm_copy": lambda: dst.copy_(src)} | {
                name: (lambda fns=fns: [part() for part in fns]) for name, fns in layers.items()}


class _Clock:
    """CUDA events (or wall time on the CPU) and an L2 flush."""

    def __init__(self, device: str) -> None:
        self.cpu = device == "cpu"
        self.flush = None if self.cpu else torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()

    def burst(self, fn: Callable[[], object], reps: int) -> float:
        """Median ms of isolated launches, the L2 flushed and the device synchronised before each."""
        out = []
        for _ in range(reps):
            if self.flush is not None:
                self.flush.zero_()
            self.sync()
            if self.cpu:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
                continue
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        return statistics.median(out)

    def sustained(self, fn: Callable[[], object], seconds: float, per_chunk: int) -> list[list[float]]:
        """``fn`` back to back for about ``seconds``: [start s, ms per launch] per chunk of ``per_chunk`` launches."""
        if self.cpu:
            rows, t0 = [], time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                c0 = time.perf_counter()
                for _ in range(per_chunk):
                    fn()
                rows.append([c0 - t0, (time.perf_counter() - c0) * 1e3 / per_chunk])
            return rows
        events = [torch.cuda.Event(enable_timing=True)]
        events[0].record()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(per_chunk):
                fn()
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append(e)
            if len(events) % 8 == 0:  # keep the host at most a few chunks ahead of the GPU
                events[-4].synchronize()
        events[-1].synchronize()
        rows, start = [], 0.0
        for a, b in zip(events, events[1:]):
            ms = a.elapsed_time(b)
            rows.append([start / 1e3, ms / per_chunk])
            start += ms
        return rows


def _smi(path: Path) -> subprocess.Popen | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fh = open(path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([exe, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits", "-lms", "50",
                             "-i", "0"], stdout=fh, stderr=subprocess.DEVNULL)


def run(out: str | Path, *, cpu: bool = False, seconds: float = 6.0, rest: float = 2.0, reps: int = 15,
        log: Callable[[str], None] = print) -> Path:
    """Measure every kernel (bursts, then sustained) and write ``sustained.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if cpu else "cuda"
    kit, clock = _Kit(device, 64 if cpu else 1), _Clock(device)
    smi_path = out / "nvidia_smi.csv"
    smi = None if cpu else _smi(smi_path)
    doc: dict = {"format": FORMAT, "host": platform.node(), "torch": torch.__version__,
                 "device": "cpu" if cpu else torch.cuda.get_device_name(0),
                 "sms": None if cpu else torch.cuda.get_device_properties(0).multi_processor_count,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "seconds": seconds, "rest_s": rest, "reps": reps, "smi_fields": SMI_FIELDS, "kernels": {}}
    try:
        for name, fn in kernels(kit).items():
            for _ in range(3):
                fn()
            clock.sync()
            time.sleep(rest)
            burst = clock.burst(fn, reps)
            per_chunk = max(1, int(20.0 / max(burst, 1e-3)))
            time.sleep(rest)
            wall = time.time()
            chunks = clock.sustained(fn, seconds, per_chunk)
            tail = [ms for _, ms in chunks[int(len(chunks) * 0.6):]] or [chunks[-1][1]]
            steady = statistics.median(tail)
            rec = {"burst_ms": burst, "steady_ms": steady, "per_chunk": per_chunk, "wall_start": wall,
                   "chunks": [[round(t, 4), round(ms, 5)] for t, ms in chunks]}
            doc["kernels"][name] = rec
            log(f"{name:10s} burst {burst:8.3f} ms  steady {steady:8.3f} ms  ratio {steady / burst:5.3f}  "
                f"first chunk {chunks[0][1]:.3f} ms")
        for layer, parts in composites(kit).items():
            rec = doc["kernels"][layer]
            rec["parts"] = {}
            for name, fn in parts.items():
                time.sleep(0.3)
                rec["parts"][name] = clock.burst(fn, reps)
            total = sum(rec["parts"].values())
            log(f"{layer} parts in bursts: {total:.3f} ms summed; steady {rec['steady_ms']:.3f} ms")
        doc["layer_parts"] = doc["kernels"]["layer"]["parts"]  # the first files' place for them
    finally:
        if smi is not None:
            smi.terminate()
            smi.wait()
    path = out / "sustained.json"
    path.write_text(json.dumps(doc, indent=1))
    return path
