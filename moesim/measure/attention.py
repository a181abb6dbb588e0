"""Attention-block timings on one GPU, bf16, tensor-parallel slices: what ``moesim bench attention`` measures.

For each attention shape and TP degree the GPU holds nh/tp query heads, nkv/tp KV heads and the matching
column slice of W_qkv and row slice of W_o, and processes all tokens of its TP group. Prefill (seq_len x
total tokens): the QKV projection, the causal SDPA core, the O projection, and the three as one region
(``block``, with the reshapes between them). Decode (batch x context, one new token per sequence): the SDPA
core over a KV cache, the QKV and O projections on ``batch`` tokens, and the block. Every part is timed
with CUDA events, one synchronised repetition at a time (:func:`moesim.measure.timing.times_ms`), median over
``reps`` after ``warmup`` untimed runs, L2 flushed (bitwise_not_ of a 256 MiB buffer) before every
repetition; the torch profiler adds each part's summed GPU kernel time (``gpu_kernel_ms``) and the SDPA
kernels that really ran. Also the device ceilings (8192^3 bf16 matmul, 2 GiB device copy).

Ignored: the TP all-reduce, RoPE, norms, appending the new token's K/V to the cache, and any attention
kernel but PyTorch's SDPA (flash backend forced where it runs). ``cpu=True`` runs tiny shapes, 1 + 3 runs per
part and no profiler: it checks the plumbing, not the numbers.

The JSON (``attention.json``; benchmarks/validation/attention_h100/measure.py writes the same as
``attention_h100.json``): device/torch/cuda/cudnn/python/date, warmup/reps/l2_flush, ``shapes`` {name:
d_model, n_heads, n_kv_heads, head_dim}, ``ceilings``, ``method`` (the text :data:`METHOD`) and ``records``,
one per shape, tp, phase, size and part: shape/tp/phase, seq_len (prefill) or context (decode), tokens,
batch, part (qkv/core/o/block), flops, bytes, median_ms/min_ms/reps, tflops/GBps and, on a GPU,
gpu_kernel_ms/kernels_per_call/kernels/tflops_kernel/GBps_kernel; a point that could not run is one record
with ``skipped`` instead of a part. ``moesim calibrate`` fits the attention core to the ``core`` records
(:mod:`moesim.calibration.attention`). The file is rewritten (atomically) after every point.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from moesim.measure.timing import times_ms
from moesim.errors import InputError
from moesim.fileio import atomic_write

SHAPES = {
    "mixtral-8x7b": {"d_model": 4096, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128},
    "qwen3-30b-a3b": {"d_model": 2048, "n_heads": 32, "n_kv_heads": 4, "head_dim": 128},
}
EL = 2  # bytes per bf16 element
TPS = (1, 2, 4)  # tensor parallel degrees: every shape's n_heads and n_kv_heads must divide by each

METHOD = (
    "bf16, one GPU. Tensor parallelism tp: the GPU holds n_heads/tp query heads, n_kv_heads/tp KV heads, "
    "W_qkv[d, (nh+2nkv)*hd/tp] and W_o[nh*hd/tp, d], and processes all tokens of its TP group; no "
    "all-reduce and no RoPE/norms are timed. Prefill parts: qkv = x[T,d] @ W_qkv; core = "
    "F.scaled_dot_product_attention(q[b,nh/tp,s,hd], k/v[b,nkv/tp,s,hd], is_causal=True) on contiguous "
    "tensors; o = y[T,nh*hd/tp] @ W_o; block = x @ W_qkv, view/split/transpose into [b,heads,s,hd] "
    "(strided views, no copy), SDPA, transpose+reshape (a copy) and @ W_o, timed as one region. Decode parts: "
    "same, with q[b,nh/tp,1,hd] over a KV cache k/v[b,nkv/tp,c,hd], non-causal; block = qkv on b tokens, "
    "q sliced from it, SDPA over the cache (the new k/v is not appended), o. SDPA: flash backend forced with "
    "torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION), default dispatch if that errors "
    "(sdpa_backend_requested); GQA through enable_gqa=True if supported, else k/v repeat_interleave'd "
    "outside the timed core region (inside block) (gqa_mode); the kernels one core call launches are "
    "recorded from the torch profiler (kernels, sdpa_backend_ran). Timing: CUDA events around each "
    "repetition, synchronised, warm-up runs untimed, L2 flushed (bitwise_not_ of a 256 MiB buffer) before every "
    "repetition; "
    "median_ms and min_ms over reps. flops: qkv 2*T*d*(nh+2nkv)*hd/tp, o 2*T*nh*hd*d/tp, causal core "
    "4*b*(nh/tp)*hd*s*(s+1)/2, decode core 4*b*(nh/tp)*hd*c, block the sum. bytes: weights + input + output "
    "of a projection; q,k,v,o tensor bytes for the core (k/v at nkv/tp heads); block the sum of the three. "
    "tflops = flops/median, GBps = bytes/median. gpu_kernel_ms: summed duration of the part's GPU kernels "
    "per call from the torch profiler (mean of 5 calls, L2 flushed before each), i.e. GPU busy time without "
    "the host launch gaps that the event-timed median_ms includes; tflops_kernel/GBps_kernel use it. Ceilings: "
    "8192^3 bf16 matmul, 2 GiB device-to-device "
    "copy (read+write counted), same timer."
)


@dataclass
class _Bench:
    """What every measured point shares: device, random generator, timing settings, the SDPA caller."""

    dev: torch.device
    cpu: bool
    warmup: int
    reps: int
    flush_buf: torch.Tensor | None
    profile: bool
    gen: torch.Generator
    core: "Core"

    def time(self, fn: Callable[[], object]) -> tuple[float, float, int]:
        """Median ms, min ms and number of timed repetitions of ``fn`` (L2 flushed before each)."""
        flush = self.flush_buf.bitwise_not_ if self.flush_buf is not None else None
        times = times_ms(fn, self.cpu, self.warmup, self.reps, before=flush)
        return statistics.median(times), min(times), len(times)

    def make(self, *dims: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*dims, device=self.dev, dtype=torch.bfloat16, generator=self.gen) * scale


def kernel_profile(fn: Callable[[], object], flush: torch.Tensor | None, n: int = 5) -> dict:
    """GPU kernels of ``fn`` from the torch profiler over ``n`` calls (L2 flushed before each): their names
    (to see which SDPA backend really ran), kernels per call, and the summed kernel time per call
    (gpu_kernel_ms: the GPU busy time, without the host launch gaps that the event timing includes)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                if flush is not None:
                    flush.bitwise_not_()  # its kernel is recognised by name and left out below
                torch.cuda.synchronize()
                fn()
                torch.cuda.synchronize()
        kern = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA
                and "bitwise_not" not in e.name and not e.name.startswith(("Memcpy", "Memset"))]
        busy_us = sum(e.time_range.end - e.time_range.start for e in kern)
        return {"gpu_kernel_ms": busy_us / n / 1e3, "kernels_per_call": len(kern) / n,
                "kernels": sorted(set(e.name[:160] for e in kern))}
    except Exception as e:  # the event timing does not depend on it
        return {"kernels": [f"<profiler failed: {str(e).splitlines()[0][:200]}>"]}


def backend_from_kernels(names: list[str]) -> str:
    low = " ".join(names).lower()
    if "cudnn" in low:
        return "cudnn"
    if "flash" in low:
        return "flash"
    if "fmha" in low or "efficient" in low or "cutlass" in low:
        return "mem_efficient"
    return "math" if names else "unknown"


class Core:
    """SDPA call with the flash backend forced if it works, GQA native if the installed torch has it."""

    @staticmethod
    def _call(q, k, v, causal, backend, gqa):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if gqa == "repeat" and k.shape[1] != q.shape[1]:
            r = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        kw = {"enable_gqa": True} if gqa == "enable_gqa" else {}
        if backend == "flash":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)

    def probe(self, q, k, v, causal) -> tuple[str, str]:
        """The first (backend, GQA mode) that runs: flash before default dispatch, enable_gqa before repeat."""
        errors = []
        for backend in ("flash", "default"):
            for gqa in ("enable_gqa", "repeat"):
                try:
                    self._call(q, k, v, causal, backend, gqa)
                    return backend, gqa
                except (RuntimeError, TypeError) as e:  # unsupported backend / keyword
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        raise
                    errors.append(f"{backend}/{gqa}: {str(e).splitlines()[0][:200]}")
        raise RuntimeError("no SDPA variant ran: " + " | ".join(errors))

    def fn(self, backend: str, causal: bool):
        def run(q, k, v, gqa):
            return self._call(q, k, v, causal, backend, gqa)
        return run


def record(base: dict, part: str, t: tuple[float, float, int] | None, flops: float, nbytes: float, **extra) -> dict:
    r = dict(base, part=part, flops=flops, bytes=nbytes, **extra)
    if t is None:
        r.update(median_ms=None, min_ms=None, reps=0)
    else:
        med, mn, n = t
        r.update(median_ms=med, min_ms=mn, reps=n, tflops=flops / med / 1e9 if med > 0 else None,
                 GBps=nbytes / med / 1e6 if med > 0 else None)
    return r


def measure_parts(base: dict, parts: list, bench: _Bench) -> list[dict]:
    out = []
    for name, fn, flops, nbytes, info in parts:
        t = bench.time(fn)
        prof = kernel_profile(fn, bench.flush_buf) if bench.profile else {}
        extra = dict(info)
        if name == "core" and prof.get("kernels"):
            extra.update(sdpa_backend_ran=backend_from_kernels(prof["kernels"]))
        r = record(base, name, t, flops, nbytes, **extra, **prof)
        if r.get("gpu_kernel_ms"):
            r["tflops_kernel"] = flops / r["gpu_kernel_ms"] / 1e9
            r["GBps_kernel"] = nbytes / r["gpu_kernel_ms"] / 1e6
        out.append(r)
    return out


@dataclass
class _Slice:
    """One GPU's share of a TP group at one point: h query and hk KV heads of size hd, the projections' input
    ``x`` (``tokens`` x d) and weights, the O projection's input ``y``, the core's q/k/v, and the SDPA variant
    that ran on them (``run(q, k, v, gqa)``)."""

    tokens: int
    d: int
    hd: int
    h: int
    hk: int
    x: torch.Tensor
    wqkv: torch.Tensor
    wo: torch.Tensor
    y: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    backend: str
    gqa: str
    run: Callable


def _slice(sh: dict, tp: int, tokens: int, batch: int, q_len: int, kv_len: int, causal: bool,
           bench: _Bench) -> _Slice:
    d, hd = sh["d_model"], sh["head_dim"]
    h, hk = sh["n_heads"] // tp, sh["n_kv_heads"] // tp
    nqkv = (h + 2 * hk) * hd
    x = bench.make(tokens, d)
    wqkv = bench.make(d, nqkv, scale=d ** -0.5)
    wo = bench.make(h * hd, d, scale=(h * hd) ** -0.5)
    y = bench.make(tokens, h * hd)
    q = bench.make(batch, h, q_len, hd)
    k = bench.make(batch, hk, kv_len, hd)
    v = bench.make(batch, hk, kv_len, hd)
    backend, gqa = bench.core.probe(q, k, v, causal)
    return _Slice(tokens, d, hd, h, hk, x, wqkv, wo, y, q, k, v, backend, gqa, bench.core.fn(backend, causal))


def _measure(sl: _Slice, block: Callable[[], object], core_flops: float, base: dict, bench: _Bench) -> list[dict]:
    """Time the four parts of ``sl``: qkv, core, o and ``block`` (which does the three as one region)."""
    T, d, hd, h, hk = sl.tokens, sl.d, sl.hd, sl.h, sl.hk
    nqkv = (h + 2 * hk) * hd
    # the timed core gets K and V as they are, or repeated to the query heads outside the timing
    kq, vq = (sl.k, sl.v) if sl.gqa == "enable_gqa" else (sl.k.repeat_interleave(h // hk, 1),
                                                          sl.v.repeat_interleave(h // hk, 1))

    def qkv_part():
        return sl.x @ sl.wqkv

    def core_part():
        return sl.run(sl.q, kq, vq, "enable_gqa" if sl.gqa == "enable_gqa" else "none")

    def o_part():
        return sl.y @ sl.wo

    f_qkv = 2 * T * d * nqkv
    f_o = 2 * T * h * hd * d
    by_qkv = (d * nqkv + T * d + T * nqkv) * EL
    by_o = (h * hd * d + T * h * hd + T * d) * EL
    by_core = (sl.q.numel() * 2 + sl.k.numel() + sl.v.numel()) * EL  # q, k, v read; o (same size as q) written
    info = dict(sdpa_backend_requested=sl.backend, gqa_mode=sl.gqa)
    parts = [("qkv", qkv_part, f_qkv, by_qkv, {}), ("core", core_part, core_flops, by_core, info),
             ("o", o_part, f_o, by_o, {}),
             ("block", block, f_qkv + core_flops + f_o, by_qkv + by_core + by_o, info)]
    return measure_parts(base, parts, bench)


def prefill_point(sh: dict, tp: int, s: int, T: int, bench: _Bench) -> list[dict]:
    """Causal prefill of T tokens in prompts of s tokens."""
    b = T // s
    sl = _slice(sh, tp, T, b, s, s, True, bench)
    h, hk, hd = sl.h, sl.hk, sl.hd

    def block():
        qkv = (sl.x @ sl.wqkv).view(b, s, h + 2 * hk, hd)
        qq, kk, vv = qkv.split([h, hk, hk], dim=2)
        o = sl.run(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), sl.gqa)
        return o.transpose(1, 2).reshape(T, h * hd) @ sl.wo

    return _measure(sl, block, 4 * b * h * hd * s * (s + 1) / 2, dict(seq_len=s, tokens=T, batch=b), bench)


def decode_point(sh: dict, tp: int, b: int, c: int, bench: _Bench) -> list[dict]:
    """One new token for each of b sequences over a KV cache of c tokens."""
    sl = _slice(sh, tp, b, b, 1, c, False, bench)
    h, hd = sl.h, sl.hd

    def block():
        qkv = sl.x @ sl.wqkv
        qq = qkv[:, : h * hd].view(b, h, 1, hd)  # the new token's k, v would be appended to the cache here
        o = sl.run(qq, sl.k, sl.v, sl.gqa)
        return o.reshape(b, h * hd) @ sl.wo

    return _measure(sl, block, 4 * b * h * hd * c, dict(context=c, batch=b, tokens=b), bench)


def _matmul_ms(bench: _Bench, n: int) -> float:
    a = torch.randn(n, n, device=bench.dev, dtype=torch.bfloat16)
    bm = torch.randn_like(a)
    return bench.time(lambda: a @ bm)[0]


def ceilings(bench: _Bench) -> dict:
    n = 256 if bench.cpu else 8192
    med = _matmul_ms(bench, n)
    res = {"matmul_n": n, "bf16_matmul_ms": med, "bf16_tflops": 2 * n**3 / med / 1e9}
    size = 2**20 if bench.cpu else 2**31
    src = torch.empty(size, device=bench.dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    med, _, _ = bench.time(lambda: dst.copy_(src))
    res.update(copy_bytes=size, copy_ms=med, copy_GBps_rw=2 * size / med / 1e6)
    return res


def sweep(shapes: dict[str, dict[str, int]], cpu: bool) -> list[tuple[str, int, str, int, int]]:
    """The measured points, in order: (shape, tp, "prefill", seq_len, tokens) or (shape, tp, "decode",
    context, batch). On a GPU: tp 1/2/4 (those that divide the shape's query and KV heads), prefill seq_len
    512/2048/8192 x tokens 4096/16384 (seq_len <= tokens),
    decode batch 16/128/512 x context 1024/4096; on the CPU a tiny version of the same."""
    seqs: tuple[int, ...]
    totals: tuple[int, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    if cpu:
        seqs, totals, batches, contexts = (32, 128), (256,), (4, 16), (64,)
    else:
        seqs, totals, batches, contexts = (512, 2048, 8192), (4096, 16384), (16, 128, 512), (1024, 4096)
    points = []
    for name, sh in shapes.items():
        for tp in TPS:
            if sh["n_heads"] % tp or sh["n_kv_heads"] % tp:
                continue  # this shape's heads do not split over tp GPUs
            for T in totals:
                for s in seqs:
                    if T >= s:
                        points.append((name, tp, "prefill", s, T))
            for b in batches:
                for c in contexts:
                    points.append((name, tp, "decode", c, b))
    return points


def run(out: str | Path, *, cpu: bool = False, warmup: int = 5, reps: int = 20, flush: bool = True,
        profile: bool = True, max_seconds: float | None = None, filename: str = "attention.json",
        shapes: dict[str, dict[str, int]] | None = None, log: Callable[[str], None] | None = print) -> Path:
    """Measure the sweep and write ``out/filename`` (rewritten after every point); return its path.

    ``cpu``: tiny shapes (d_model / 16, head_dim 16) unless ``shapes`` is given, 1 + 3 runs per part.
    ``max_seconds``: points not started by then are recorded as skipped. ``log`` gets one line per point.
    """
    t_start = time.time()
    if not cpu and not torch.cuda.is_available():
        raise InputError("no CUDA GPU visible to torch; --cpu runs tiny shapes on the CPU", field="--cpu")
    dev = torch.device("cpu" if cpu else "cuda")
    if shapes is None:
        shapes = {n: dict(s, d_model=s["d_model"] // 16, head_dim=16) for n, s in SHAPES.items()} if cpu else SHAPES
    if cpu:
        warmup, reps = 1, 3
    say = log or (lambda line: None)
    flush_buf = torch.empty(2**20 if cpu else 256 * 2**20, dtype=torch.uint8, device=dev) if flush else None
    bench = _Bench(dev, cpu, warmup, reps, flush_buf, profile and not cpu,
                   torch.Generator(device=dev).manual_seed(0), Core())
    torch.backends.cuda.matmul.allow_tf32 = False

    res: dict = {
        "device": "cpu (quick smoke run)" if cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": warmup, "reps": reps, "l2_flush": flush,
        "shapes": shapes,
        "ceilings": {},
        "method": METHOD,
        "records": [],
    }
    path = Path(out) / filename

    def dump() -> None:
        res["elapsed_s"] = round(time.time() - t_start, 1)
        atomic_write(path, lambda fh: json.dump(res, fh, indent=1))

    res["ceilings"] = ceilings(bench)
    say(f"ceilings: {res['ceilings']['bf16_tflops']:.0f} TFLOP/s, {res['ceilings']['copy_GBps_rw']:.0f} GB/s")
    dump()
    for name, tp, phase, a, bT in sweep(shapes, cpu):
        sh = shapes[name]
        head = dict(shape=name, tp=tp, phase=phase)
        if phase == "prefill":
            skip_base = dict(head, seq_len=a, tokens=bT, batch=bT // a)
        else:
            skip_base = dict(head, context=a, batch=bT, tokens=bT)
        if max_seconds is not None and time.time() - t_start > max_seconds:
            res["records"].append(dict(skip_base, skipped="time budget of the run exhausted"))
            continue
        try:
            if phase == "prefill":
                recs = prefill_point(sh, tp, a, bT, bench)
            else:
                recs = decode_point(sh, tp, bT, a, bench)
            recs = [dict(head, **r) for r in recs]
            res["records"].extend(recs)
            say(f"{name:14s} tp{tp} {phase:7s} {a:5d} {bT:6d} " + "  ".join(
                f"{r['part']} {r['median_ms']:.3f}/{r.get('gpu_kernel_ms') or 0:.3f}ms {r['tflops']:.0f}TF "
                f"{r['GBps']:.0f}GB/s"
                for r in recs)
                + f"  [{recs[1].get('sdpa_backend_requested')}/{recs[1].get('gqa_mode')}"
                f"/{recs[1].get('sdpa_backend_ran')}]")
        except torch.cuda.OutOfMemoryError as e:
            res["records"].append(dict(skip_base, skipped="out of memory: " + str(e).splitlines()[0][:200]))
            say(f"skip {skip_base}: OOM")
        except RuntimeError as e:
            res["records"].append(dict(skip_base, skipped="error: " + str(e).splitlines()[0][:300]))
            say(f"skip {skip_base}: {e}")
        if not cpu:
            torch.cuda.empty_cache()
        dump()
    dump()
    say(f"{len(res['records'])} records in {res['elapsed_s']} s")
    return path
