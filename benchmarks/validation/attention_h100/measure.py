"""Measure the non-expert (attention) block of a transformer layer on one GPU, bf16, tensor-parallel slices.

For each attention shape and TP degree the GPU holds nh/tp query heads, nkv/tp KV heads and the matching
column slice of W_qkv and row slice of W_o, and processes all tokens of its TP group (no all-reduce timed).

Prefill (seq_len x total tokens): the QKV projection, the causal SDPA core, the O projection, and the three
as one region (with the reshapes between them). Decode (batch x context, one new token per sequence):
the SDPA core over a KV cache, the QKV and O projections on b tokens, and the block. Every part is timed
with CUDA events, one synchronised repetition at a time, median over ``--reps`` after ``--warmup`` untimed
runs; L2 is flushed (bitwise_not_ of a 256 MiB buffer) before every repetition. Also: device ceilings (8192^3 bf16
matmul, 2 GiB device copy). Needs only torch; writes ``attention_h100.json`` into ``--out``.

    python benchmarks/validation/attention_h100/measure.py --out $OUT
    python benchmarks/validation/attention_h100/measure.py --quick --out /tmp/att   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = {
    "mixtral-8x7b": {"d_model": 4096, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128},
    "qwen3-30b-a3b": {"d_model": 2048, "n_heads": 32, "n_kv_heads": 4, "head_dim": 128},
}
EL = 2  # bytes per bf16 element


class _Wall:
    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_Wall") -> float:
        return (other.t - self.t) * 1e3


class Timer:
    def __init__(self, dev: torch.device, warmup: int, reps: int, flush: bool) -> None:
        self.cpu = dev.type != "cuda"
        self.warmup, self.reps = warmup, reps
        self.flush_buf = torch.empty(256 * 2**20 if not self.cpu else 2**20, dtype=torch.uint8, device=dev) \
            if flush else None

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()

    def event(self):
        return _Wall() if self.cpu else torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, int]:
        """Median ms, min ms and number of timed repetitions of ``fn``."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.flush_buf is not None:
                self.flush_buf.bitwise_not_()
            self.sync()
            a, b = self.event(), self.event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times), min(times), len(times)


def kernel_profile(fn: Callable[[], object], cpu: bool, flush: torch.Tensor | None, n: int = 5) -> dict:
    """GPU kernels of ``fn`` from the torch profiler over ``n`` calls (L2 flushed before each): their names
    (to see which SDPA backend really ran), kernels per call, and the summed kernel time per call
    (gpu_kernel_ms: the GPU busy time, without the host launch gaps that the event timing includes)."""
    if cpu:
        return {}
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

    def __init__(self) -> None:
        self.mode: tuple[str, str] | None = None  # (backend requested, gqa mode)

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


def make(dev, gen, *dims, scale=1.0):
    return torch.randn(*dims, device=dev, dtype=torch.bfloat16, generator=gen) * scale


def record(base: dict, part: str, t: tuple[float, float, int] | None, flops: float, nbytes: float, **extra) -> dict:
    r = dict(base, part=part, flops=flops, bytes=nbytes, **extra)
    if t is None:
        r.update(median_ms=None, min_ms=None, reps=0)
    else:
        med, mn, n = t
        r.update(median_ms=med, min_ms=mn, reps=n, tflops=flops / med / 1e9 if med > 0 else None,
                 GBps=nbytes / med / 1e6 if med > 0 else None)
    return r


def measure_parts(base, parts, timer, cpu, profile_kernels) -> list[dict]:
    out = []
    for name, fn, flops, nbytes, info in parts:
        t = timer(fn)
        prof = kernel_profile(fn, cpu, timer.flush_buf) if profile_kernels else {}
        extra = dict(info)
        if name == "core" and prof.get("kernels"):
            extra.update(sdpa_backend_ran=backend_from_kernels(prof["kernels"]))
        r = record(base, name, t, flops, nbytes, **extra, **prof)
        if r.get("gpu_kernel_ms"):
            r["tflops_kernel"] = flops / r["gpu_kernel_ms"] / 1e9
            r["GBps_kernel"] = nbytes / r["gpu_kernel_ms"] / 1e6
        out.append(r)
    return out


def prefill_point(sh, tp, s, T, dev, gen, timer, core, cpu, profile_kernels) -> list[dict]:
    d, hd = sh["d_model"], sh["head_dim"]
    h, hk = sh["n_heads"] // tp, sh["n_kv_heads"] // tp
    b = T // s
    nqkv = (h + 2 * hk) * hd
    x = make(dev, gen, T, d)
    wqkv = make(dev, gen, d, nqkv, scale=d ** -0.5)
    wo = make(dev, gen, h * hd, d, scale=(h * hd) ** -0.5)
    y = make(dev, gen, T, h * hd)
    q = make(dev, gen, b, h, s, hd)
    k = make(dev, gen, b, hk, s, hd)
    v = make(dev, gen, b, hk, s, hd)
    backend, gqa = core.probe(q, k, v, True)
    run = core.fn(backend, True)
    kq, vq = (k, v) if gqa == "enable_gqa" else (k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1))

    def qkv_part():
        return x @ wqkv

    def core_part():
        return run(q, kq, vq, "enable_gqa" if gqa == "enable_gqa" else "none")

    def o_part():
        return y @ wo

    def block():
        qkv = (x @ wqkv).view(b, s, h + 2 * hk, hd)
        qq, kk, vv = qkv.split([h, hk, hk], dim=2)
        o = run(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), gqa)
        return o.transpose(1, 2).reshape(T, h * hd) @ wo

    f_qkv = 2 * T * d * nqkv
    f_o = 2 * T * h * hd * d
    f_core = 4 * b * h * hd * s * (s + 1) / 2
    by_qkv = (d * nqkv + T * d + T * nqkv) * EL
    by_o = (h * hd * d + T * h * hd + T * d) * EL
    by_core = (q.numel() * 2 + k.numel() + v.numel()) * EL  # q, k, v read; o (same size as q) written
    base = dict(seq_len=s, tokens=T, batch=b)
    info = dict(sdpa_backend_requested=backend, gqa_mode=gqa)
    parts = [("qkv", qkv_part, f_qkv, by_qkv, {}), ("core", core_part, f_core, by_core, info),
             ("o", o_part, f_o, by_o, {}), ("block", block, f_qkv + f_core + f_o, by_qkv + by_core + by_o, info)]
    return measure_parts(base, parts, timer, cpu, profile_kernels)


def decode_point(sh, tp, b, c, dev, gen, timer, core, cpu, profile_kernels) -> list[dict]:
    d, hd = sh["d_model"], sh["head_dim"]
    h, hk = sh["n_heads"] // tp, sh["n_kv_heads"] // tp
    nqkv = (h + 2 * hk) * hd
    x = make(dev, gen, b, d)
    wqkv = make(dev, gen, d, nqkv, scale=d ** -0.5)
    wo = make(dev, gen, h * hd, d, scale=(h * hd) ** -0.5)
    y = make(dev, gen, b, h * hd)
    q = make(dev, gen, b, h, 1, hd)
    kc = make(dev, gen, b, hk, c, hd)
    vc = make(dev, gen, b, hk, c, hd)
    backend, gqa = core.probe(q, kc, vc, False)
    run = core.fn(backend, False)
    kq, vq = (kc, vc) if gqa == "enable_gqa" else (kc.repeat_interleave(h // hk, 1), vc.repeat_interleave(h // hk, 1))

    def qkv_part():
        return x @ wqkv

    def core_part():
        return run(q, kq, vq, "enable_gqa" if gqa == "enable_gqa" else "none")

    def o_part():
        return y @ wo

    def block():
        qkv = x @ wqkv
        qq = qkv[:, : h * hd].view(b, h, 1, hd)  # the new token's k, v would be appended to the cache here
        o = run(qq, kc, vc, gqa)
        return o.reshape(b, h * hd) @ wo

    f_qkv = 2 * b * d * nqkv
    f_o = 2 * b * h * hd * d
    f_core = 4 * b * h * hd * c
    by_qkv = (d * nqkv + b * d + b * nqkv) * EL
    by_o = (h * hd * d + b * h * hd + b * d) * EL
    by_core = (q.numel() * 2 + kc.numel() + vc.numel()) * EL
    base = dict(context=c, batch=b, tokens=b)
    info = dict(sdpa_backend_requested=backend, gqa_mode=gqa)
    parts = [("qkv", qkv_part, f_qkv, by_qkv, {}), ("core", core_part, f_core, by_core, info),
             ("o", o_part, f_o, by_o, {}), ("block", block, f_qkv + f_core + f_o, by_qkv + by_core + by_o, info)]
    return measure_parts(base, parts, timer, cpu, profile_kernels)


def ceilings(dev, timer, cpu) -> dict:
    n = 256 if cpu else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    bm = torch.randn_like(a)
    med, mn, reps = timer(lambda: a @ bm)
    res = {"matmul_n": n, "bf16_matmul_ms": med, "bf16_tflops": 2 * n**3 / med / 1e9}
    del a, bm
    size = 2**20 if cpu else 2**31
    src = torch.empty(size, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    med, mn, reps = timer(lambda: dst.copy_(src))
    res.update(copy_bytes=size, copy_ms=med, copy_GBps_rw=2 * size / med / 1e6)
    return res


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
    "repetition, synchronised, warm-up runs untimed, L2 flushed (bitwise_not_ of a 256 MiB buffer) before every repetition; "
    "median_ms and min_ms over reps. flops: qkv 2*T*d*(nh+2nkv)*hd/tp, o 2*T*nh*hd*d/tp, causal core "
    "4*b*(nh/tp)*hd*s*(s+1)/2, decode core 4*b*(nh/tp)*hd*c, block the sum. bytes: weights + input + output "
    "of a projection; q,k,v,o tensor bytes for the core (k/v at nkv/tp heads); block the sum of the three. "
    "tflops = flops/median, GBps = bytes/median. gpu_kernel_ms: summed duration of the part's GPU kernels "
    "per call from the torch profiler (mean of 5 calls, L2 flushed before each), i.e. GPU busy time without "
    "the host launch gaps that the event-timed median_ms includes; tflops_kernel/GBps_kernel use it. Ceilings: 8192^3 bf16 matmul, 2 GiB device-to-device "
    "copy (read+write counted), same timer."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (checks plumbing, not numbers)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 before each repetition")
    ap.add_argument("--no-profile", action="store_true", help="do not record SDPA kernel names")
    ap.add_argument("--max-seconds", type=float, default=230.0, help="skip remaining points after this")
    args = ap.parse_args()

    t_start = time.time()
    cpu = args.quick or not torch.cuda.is_available()
    dev = torch.device("cpu" if cpu else "cuda")
    if cpu:
        shapes = {n: dict(s, d_model=s["d_model"] // 16, head_dim=16) for n, s in SHAPES.items()}
        tps, seqs, totals, batches, contexts = (1, 2, 4), (32, 128), (256,), (4, 16), (64,)
        warmup, reps = 1, 3
    else:
        shapes = SHAPES
        tps, seqs, totals, batches, contexts = (1, 2, 4), (512, 2048, 8192), (4096, 16384), (16, 128, 512), (1024, 4096)
        warmup, reps = args.warmup, args.reps
    timer = Timer(dev, warmup, reps, flush=not args.no_flush)
    gen = torch.Generator(device=dev).manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False

    out = {
        "device": "cpu (quick smoke run)" if cpu else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warmup": warmup, "reps": reps, "l2_flush": not args.no_flush,
        "shapes": shapes,
        "ceilings": {},
        "method": METHOD,
        "records": [],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention_h100.json")

    def dump() -> None:
        out["elapsed_s"] = round(time.time() - t_start, 1)
        with open(path + ".tmp", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(path + ".tmp", path)

    out["ceilings"] = ceilings(dev, timer, cpu)
    print(f"ceilings: {out['ceilings']['bf16_tflops']:.0f} TFLOP/s, {out['ceilings']['copy_GBps_rw']:.0f} GB/s",
          flush=True)
    dump()
    core = Core()

    points = []
    for name, sh in shapes.items():
        for tp in tps:
            for T in totals:
                for s in seqs:
                    if T >= s:
                        points.append((name, tp, "prefill", s, T))
            for b in batches:
                for c in contexts:
                    points.append((name, tp, "decode", c, b))
    for name, tp, phase, a, bT in points:
        sh = shapes[name]
        head = dict(shape=name, tp=tp, phase=phase)
        if phase == "prefill":
            skip_base = dict(head, seq_len=a, tokens=bT, batch=bT // a)
        else:
            skip_base = dict(head, context=a, batch=bT, tokens=bT)
        if time.time() - t_start > args.max_seconds:
            out["records"].append(dict(skip_base, skipped="time budget of the run exhausted"))
            continue
        try:
            if phase == "prefill":
                recs = prefill_point(sh, tp, a, bT, dev, gen, timer, core, cpu, not args.no_profile)
            else:
                recs = decode_point(sh, tp, bT, a, dev, gen, timer, core, cpu, not args.no_profile)
            recs = [dict(head, **r) for r in recs]
            out["records"].extend(recs)
            print(f"{name:14s} tp{tp} {phase:7s} {a:5d} {bT:6d} " + "  ".join(
                f"{r['part']} {r['median_ms']:.3f}/{r.get('gpu_kernel_ms') or 0:.3f}ms {r['tflops']:.0f}TF {r['GBps']:.0f}GB/s"
                for r in recs)
                + f"  [{recs[1].get('sdpa_backend_requested')}/{recs[1].get('gqa_mode')}"
                f"/{recs[1].get('sdpa_backend_ran')}]", flush=True)
        except torch.cuda.OutOfMemoryError as e:
            out["records"].append(dict(skip_base, skipped="out of memory: " + str(e).splitlines()[0][:200]))
            print(f"skip {skip_base}: OOM", flush=True)
        except RuntimeError as e:
            out["records"].append(dict(skip_base, skipped="error: " + str(e).splitlines()[0][:300]))
            print(f"skip {skip_base}: {e}", flush=True)
        if not cpu:
            torch.cuda.empty_cache()
        dump()
    dump()
    print(f"wrote {path} ({len(out['records'])} records, {out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
