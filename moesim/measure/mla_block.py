"""DeepSeek-V3's whole attention block in prefill, as one GPU of DP attention runs it (and a GQA block, Mixtral-8x7B's):
what ``benchmarks/validation/attention_h200/measure_mla_block.py`` measures, to check the engine's non-expert cost of
a layer (projections, core and everything the model leaves out) on the shapes the deployments run.

One layer, bf16, ``tokens`` tokens in prompts of ``seq_len`` (DeepSeek-V3: d 7168, 128 heads, q_lora_rank 1536,
kv_lora_rank 512, Q/K heads of 128 + 64 rotary dimensions, V of 128), in the order of the reference implementation:
RMSNorm of the input; q = q_b(RMSNorm(q_a(x))); [c_kv, k_pe] = kv_a(x); [k_nope, v] = kv_b(RMSNorm(c_kv)); rotary
embedding of q_pe and k_pe (the shared k_pe broadcast to every head); Q and K concatenated to 192 per head; the
causal core (``backend``: cuDNN's fused attention, Hopper-native, or FlashAttention-2 with V padded to 192); the
output projection; the residual add. Parts are timed alone as well (``parts``): the five projections, the core, and
the rest (norms, rotary, concatenations, transposes, residual) as the block minus the others.

Timing as :mod:`moesim.measure.attention`: CUDA events around each synchronised repetition, median of ``reps`` after
``warmup``, L2 flushed before each, and the summed GPU kernel time of one call from the torch profiler
(``gpu_kernel_ms``), which is what a GPU-side model is compared with.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from moesim.fileio import atomic_write
from moesim.measure.attention import _Bench, ceilings, kernel_profile
from moesim.measure.timing import times_ms

FORMAT = "moesim.bench.mla_block/1"
DIMS = {"d_model": 7168, "heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope": 128, "qk_rope": 64,
        "v_head": 128}
SIZES = ((4096, 1024), (4096, 4096), (8192, 2048), (8192, 4096), (16384, 1024), (16384, 4096))  # (tokens, seq_len)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x[..., ::2], x[..., 1::2]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def build(T: int, s: int, backend: str, bench: _Bench) -> dict[str, Callable[[], object]]:
    """The block and its parts as callables on freshly made weights and inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d, H, r_q, r_kv = DIMS["d_model"], DIMS["heads"], DIMS["q_lora_rank"], DIMS["kv_lora_rank"]
    n, p, v = DIMS["qk_nope"], DIMS["qk_rope"], DIMS["v_head"]
    b = T // s
    mk = bench.make
    x = mk(T, d)
    w = {"q_a": mk(d, r_q, scale=d ** -0.5), "q_b": mk(r_q, H * (n + p), scale=r_q ** -0.5),
         "kv_a": mk(d, r_kv + p, scale=d ** -0.5), "kv_b": mk(r_kv, H * (n + v), scale=r_kv ** -0.5),
         "o": mk(H * v, d, scale=(H * v) ** -0.5)}
    norm_x, norm_q, norm_kv = mk(d), mk(r_q), mk(r_kv)
    pos = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] / 10000 ** (
        torch.arange(0, p, 2, device=x.device, dtype=torch.float32) / p)
    cos, sin = pos.cos().to(x.dtype), pos.sin().to(x.dtype)  # [s, p/2]
    which = SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION

    def core(q: torch.Tensor, k: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        if backend != "cudnn":  # FlashAttention-2 takes one head size
            val = F.pad(val, (0, n + p - v))
        with sdpa_kernel(which):
            o = F.scaled_dot_product_attention(q, k, val, is_causal=True)
        return o[..., :v]

    def block() -> torch.Tensor:
        h = _rms(x, norm_x)
        q = (_rms(h @ w["q_a"], norm_q) @ w["q_b"]).view(b, s, H, n + p)
        kv_a = h @ w["kv_a"]
        c_kv, k_pe = kv_a.split([r_kv, p], dim=-1)
        kv = (_rms(c_kv, norm_kv) @ w["kv_b"]).view(b, s, H, n + v)
        k_nope, val = kv.split([n, v], dim=-1)
        q_pe = _rope(q[..., n:], cos[None, :, None], sin[None, :, None])
        k_pe = _rope(k_pe.reshape(b, s, 1, p), cos[None, :, None], sin[None, :, None]).expand(b, s, H, p)
        qq = torch.cat((q[..., :n], q_pe), dim=-1).transpose(1, 2)
        kk = torch.cat((k_nope, k_pe), dim=-1).transpose(1, 2)
        o = core(qq, kk, val.transpose(1, 2)).transpose(1, 2).reshape(T, H * v)
        return x + o @ w["o"]

    q_in, kv_in, o_in = mk(T, r_q), mk(T, r_kv), mk(T, H * v)
    qq, kk, vv = mk(b, H, s, n + p), mk(b, H, s, n + p), mk(b, H, s, v)
    return {"block": block, "q_a": lambda: x @ w["q_a"], "q_b": lambda: q_in @ w["q_b"],
            "kv_a": lambda: x @ w["kv_a"], "kv_b": lambda: kv_in @ w["kv_b"], "o": lambda: o_in @ w["o"],
            "core": lambda: core(qq, kk, vv)}


GQA = {"d_model": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128}  # Mixtral-8x7B's attention


def build_gqa(T: int, s: int, backend: str, bench: _Bench) -> dict[str, Callable[[], object]]:
    """A GQA attention block (Mixtral-8x7B's shape) the same way: RMSNorm, the fused QKV projection, RoPE of Q and K,
    the causal core (K and V shared by groups of query heads), the output projection, the residual add."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d, H, Hk, hd = GQA["d_model"], GQA["heads"], GQA["kv_heads"], GQA["head_dim"]
    b = T // s
    mk = bench.make
    x, norm_x = mk(T, d), mk(d)
    wqkv, wo = mk(d, (H + 2 * Hk) * hd, scale=d ** -0.5), mk(H * hd, d, scale=(H * hd) ** -0.5)
    pos = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] / 10000 ** (
        torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    cos, sin = pos.cos().to(x.dtype)[None, :, None], pos.sin().to(x.dtype)[None, :, None]
    which = SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def block() -> torch.Tensor:
        qkv = (_rms(x, norm_x) @ wqkv).view(b, s, H + 2 * Hk, hd)
        q, k, v = qkv.split([H, Hk, Hk], dim=2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(T, H * hd)
        return x + o @ wo

    h, y = mk(T, d), mk(T, H * hd)
    qq, kk, vv = mk(b, H, s, hd), mk(b, Hk, s, hd), mk(b, Hk, s, hd)
    return {"block": block, "qkv": lambda: h @ wqkv, "o": lambda: y @ wo, "core": lambda: core(qq, kk, vv)}


def run(out: str | Path, *, backends: tuple[str, ...] = ("cudnn", "flash"), warmup: int = 5, reps: int = 20,
        filename: str = "mla_block.json", log: Callable[[str], None] | None = print) -> Path:
    """Measure every size with every backend and write ``out/filename``; return its path (a GPU is needed)."""
    t0 = time.time()
    dev = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    bench = _Bench(dev, False, warmup, reps, flush, True, torch.Generator(device=dev).manual_seed(0), None)  # type: ignore[arg-type]
    say = log or (lambda line: None)
    res: dict = {"format": FORMAT, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "python": platform.python_version(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "warmup": warmup, "reps": reps, "dims": DIMS, "gqa_dims": GQA, "ceilings": ceilings(bench),
                 "method": __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2], "records": []}
    path = Path(out) / filename
    combos = [(shape, make, be, T, s) for shape, make in (("mla", build), ("gqa", build_gqa))
              for be in backends for T, s in SIZES]
    for shape, make, backend, T, s in combos:
        with torch.no_grad():
            fns = make(T, s, backend, bench)
            rec: dict = {"shape": shape, "backend": backend, "tokens": T, "seq_len": s, "parts": {}}
            for name, fn in fns.items():
                med = statistics.median(times_ms(fn, False, warmup, reps, before=flush.bitwise_not_))
                prof = kernel_profile(fn, flush)
                rec["parts"][name] = {"median_ms": med, "gpu_kernel_ms": prof.get("gpu_kernel_ms"),
                                      "kernels_per_call": prof.get("kernels_per_call")}
        say(f"{shape} {backend:6s} T={T:6d} s={s:5d} " + " ".join(
            f"{k} {v['gpu_kernel_ms'] or 0:.3f}" for k, v in rec["parts"].items()))
        res["records"].append(rec)
        del fns
        torch.cuda.empty_cache()
        res["elapsed_s"] = round(time.time() - t0, 1)
        atomic_write(path, lambda fh: json.dump(res, fh, indent=1))
    return path
