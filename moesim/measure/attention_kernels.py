"""Prefill attention-core kernels, forward and backward, by kernel family: what ``moesim bench attention-kernels``
measures.

Serving engines and trainers on Hopper do not run PyTorch's FlashAttention-2 port (the ``flash`` SDPA backend that
``moesim bench attention`` times): they run Hopper-native fused kernels (FlashAttention-3, cuDNN's fused attention,
FlashMLA's and FlashInfer's prefill kernels), which keep the tensor cores busier. PyTorch ships one such kernel, cuDNN's
fused attention (``SDPBackend.CUDNN_ATTENTION``). This benchmark times both families on the same shapes so that the
simulator can carry each as measured (``moesim calibrate`` fits one set of parameters per family,
:mod:`moesim.calibration.attention_kernels`).

Per backend (``flash``, ``cudnn``), shape and size: a causal prefill core ``softmax(Q K^T) V`` on ``batch`` prompts of
``seq_len`` tokens, bf16, contiguous [batch, heads, seq, dim] tensors; the forward alone, and forward plus backward
(``torch.autograd.grad`` of the output against Q, K and V with a random output gradient). The backward is their
difference. Shapes: GQA with head size 128 (Mixtral/Qwen3: 32 query and 8 KV heads), GQA with head size 64 (GPT-OSS:
64 query and 8 KV heads), and DeepSeek-V3's multi-head latent attention as its prefill runs it (K and V decompressed:
128 heads, Q and K of 192 = 128 + 64 rotary dimensions, V of 128). Timing as :mod:`moesim.measure.attention`: CUDA
events around each synchronised repetition, median of ``reps`` after ``warmup`` runs, L2 flushed before each, and the
summed GPU kernel time of one call from the torch profiler (``gpu_kernel_ms``; mean of 5 calls), which the fit uses.

FLOPs (causal, per prompt, h query heads, Q/K size dk, V size dv): forward ``2 h (dk + dv) s (s + 1) / 2`` (QK^T and PV
over the s(s+1)/2 unmasked pairs); backward 2.5 times that (QK^T recomputed, then dV, dP, dQ and dK: five GEMMs of the
forward's two sizes). A backend that needs one head size for Q, K and V (FlashAttention-2) gets V padded to Q's, as
engines running MLA on it do (``v_padded``; ``dv`` and the FLOPs are then the padded ones); a point a backend still
refuses is recorded with ``skipped``.

The JSON (``attention_kernels.json``, format ``moesim.bench.attention_kernels/1``): device/torch/cuda/cudnn/python/date,
warmup/reps, ``shapes``, ``ceilings`` (as :func:`moesim.measure.attention.ceilings`), ``method`` and ``records``: one
per backend, shape, size and direction (``fwd``/``bwd``) with seq_len, batch, tokens, heads, kv_heads, dk, dv, flops,
median_ms (event time; bwd: fwd+bwd minus fwd), gpu_kernel_ms, tflops_kernel and kernels (names, to see what ran).
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

from moesim.errors import InputError
from moesim.fileio import atomic_write
from moesim.measure.attention import _Bench, ceilings, kernel_profile
from moesim.measure.timing import times_ms

FORMAT = "moesim.bench.attention_kernels/1"
BACKENDS = ("flash", "cudnn")
BACKWARD_FLOPS = 2.5  # backward / forward FLOPs of an attention core (module docstring)
SHAPES = {
    "gqa-hd128": {"heads": 32, "kv_heads": 8, "dk": 128, "dv": 128},
    "gqa-hd64": {"heads": 64, "kv_heads": 8, "dk": 64, "dv": 64},
    "mla-prefill": {"heads": 128, "kv_heads": 128, "dk": 192, "dv": 128},
}
# (seq_len, tokens): prompts of seq_len tokens, tokens // seq_len of them
SIZES = ((512, 16384), (1024, 4096), (1024, 16384), (2048, 16384), (4096, 4096), (4096, 16384), (8192, 16384),
         (16384, 16384))
METHOD = __doc__.split("\n\n")[2] + "\n\n" + __doc__.split("\n\n")[3]


def _sdpa(backend: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(which):
            if k.shape[1] != q.shape[1]:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def forward_flops(batch: int, seq_len: int, sh: dict) -> float:
    return 2.0 * batch * sh["heads"] * (sh["dk"] + sh["dv"]) * seq_len * (seq_len + 1) / 2


def _point(backend: str, sh: dict, s: int, T: int, bench: _Bench) -> list[dict]:
    """The forward and backward records of one backend, shape and size."""
    b = max(T // s, 1)
    q = bench.make(b, sh["heads"], s, sh["dk"]).requires_grad_(True)
    k = bench.make(b, sh["kv_heads"], s, sh["dk"]).requires_grad_(True)
    v = bench.make(b, sh["kv_heads"], s, sh["dv"]).requires_grad_(True)
    g = bench.make(b, sh["heads"], s, sh["dv"])
    sdpa = _sdpa(backend)

    def fwd() -> object:
        with torch.no_grad():
            return sdpa(q, k, v)

    def both() -> object:
        return torch.autograd.grad(sdpa(q, k, v), (q, k, v), g)

    try:
        both()  # raises here if the backend refuses the shape
        padded = False
    except RuntimeError:
        if sh["dv"] == sh["dk"]:
            raise
        # FlashAttention-2 needs one head size for Q, K and V: engines running MLA on it pad V to Q/K's (the
        # kernel then does the padded work, counted in flops)
        v = bench.make(b, sh["kv_heads"], s, sh["dk"]).requires_grad_(True)
        g = bench.make(b, sh["heads"], s, sh["dk"])
        sh = dict(sh, dv=sh["dk"])
        both()
        padded = True
    flush = bench.flush_buf.bitwise_not_ if bench.flush_buf is not None else None
    t_f = statistics.median(times_ms(fwd, bench.cpu, bench.warmup, bench.reps, before=flush))
    t_b = statistics.median(times_ms(both, bench.cpu, bench.warmup, bench.reps, before=flush))
    p_f = kernel_profile(fwd, bench.flush_buf) if bench.profile else {}
    p_b = kernel_profile(both, bench.flush_buf) if bench.profile else {}
    flops = forward_flops(b, s, sh)
    base = dict(backend=backend, seq_len=s, batch=b, tokens=b * s, **sh, v_padded=padded)
    out = []
    for direction, ms, kern_ms, kernels, f in (
            ("fwd", t_f, p_f.get("gpu_kernel_ms"), p_f.get("kernels", []), flops),
            ("bwd", t_b - t_f, (p_b["gpu_kernel_ms"] - p_f["gpu_kernel_ms"]) if "gpu_kernel_ms" in p_b
             and "gpu_kernel_ms" in p_f else None, sorted(set(p_b.get("kernels", [])) - set(p_f.get("kernels", []))),
             BACKWARD_FLOPS * flops)):
        r = dict(base, direction=direction, flops=f, median_ms=ms, gpu_kernel_ms=kern_ms, kernels=kernels)
        if kern_ms:
            r["tflops_kernel"] = f / kern_ms / 1e9
        out.append(r)
    return out


def sweep(cpu: bool) -> list[tuple[str, str, int, int]]:
    """(backend, shape, seq_len, tokens) in order; on the CPU one tiny size per shape."""
    sizes = ((32, 64),) if cpu else SIZES
    return [(be, name, s, T) for be in BACKENDS for name in SHAPES for s, T in sizes]


def run(out: str | Path, *, cpu: bool = False, warmup: int = 5, reps: int = 20, max_seconds: float | None = None,
        filename: str = "attention_kernels.json", log: Callable[[str], None] | None = print) -> Path:
    """Measure the sweep and write ``out/filename`` (rewritten after every point); return its path. ``cpu``: tiny
    shapes, 1 + 3 runs, no profiler (a plumbing check; SDPA's CPU kernels stand in for both backends)."""
    t0 = time.time()
    if not cpu and not torch.cuda.is_available():
        raise InputError("no CUDA GPU visible to torch; --cpu runs tiny shapes on the CPU", field="--cpu")
    dev = torch.device("cpu" if cpu else "cuda")
    if cpu:
        warmup, reps = 1, 3
    say = log or (lambda line: None)
    flush_buf = torch.empty(2**20 if cpu else 256 * 2**20, dtype=torch.uint8, device=dev)
    bench = _Bench(dev, cpu, warmup, reps, flush_buf, not cpu, torch.Generator(device=dev).manual_seed(0), None)  # type: ignore[arg-type]
    res: dict = {"format": FORMAT, "device": "cpu (quick smoke run)" if cpu else torch.cuda.get_device_name(0),
                 "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                 "python": platform.python_version(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "warmup": warmup, "reps": reps, "shapes": SHAPES, "ceilings": ceilings(bench), "method": METHOD,
                 "records": []}
    path = Path(out) / filename

    def dump() -> None:
        res["elapsed_s"] = round(time.time() - t0, 1)
        atomic_write(path, lambda fh: json.dump(res, fh, indent=1))

    for backend, name, s, T in sweep(cpu):
        head = dict(shape=name, backend=backend, seq_len=s, tokens=T)
        if max_seconds is not None and time.time() - t0 > max_seconds:
            res["records"].append(dict(head, skipped="time budget of the run exhausted"))
            continue
        try:
            recs = [dict(r, shape=name, backend=backend)
                    for r in _point("flash" if cpu else backend, SHAPES[name], s, T, bench)]
            res["records"].extend(recs)
            say(f"{backend:6s} {name:12s} s={s:6d} T={T:6d} " + "  ".join(
                f"{r['direction']} {r['median_ms']:.3f}/{r['gpu_kernel_ms'] or 0:.3f} ms "
                f"{r.get('tflops_kernel') or 0:.0f} TF" for r in recs))
        except torch.cuda.OutOfMemoryError as e:
            res["records"].append(dict(head, skipped="out of memory: " + str(e).splitlines()[0][:200]))
        except RuntimeError as e:
            res["records"].append(dict(head, skipped="error: " + str(e).splitlines()[0][:300]))
            say(f"skip {head}: {str(e).splitlines()[0][:200]}")
        if not cpu:
            torch.cuda.empty_cache()
        dump()
    dump()
    say(f"{len(res['records'])} records in {res['elapsed_s']} s")
    return path
