"""Prefill after a cached prefix, timed on a GPU: the attention core of S computed tokens per prompt over a prefix of
P cached tokens, and the latent decompression multi-head latent attention needs first; writes ``prefix_h200.json``.

Run from the checkout on a machine with only torch (the package's ``__init__`` is not loaded, as
``../attention_h200/measure_kernels.py`` does):

    python benchmarks/validation/prefix_h200/measure_prefix.py --out $OUT
    python benchmarks/validation/prefix_h200/measure_prefix.py --cpu --out /tmp/x   # plumbing check

What it times, per backend (``cudnn``: cuDNN's fused attention; ``flash``: PyTorch's FlashAttention-2 port), shape
(GQA with 32 query and 8 KV heads of 128; DeepSeek-V3's MLA prefill: 128 heads, Q and K of 192, V of 128; the flash
backend runs MLA with V padded to 192, as engines on it pad) and (S, P), on ``16384 // S`` prompts (16K computed
tokens), bf16:

- ``self``: the computed tokens' causal attention among themselves, ``sdpa(q, k, v, is_causal=True)`` on S x S;
- ``prefix``: their attention over the prefix, ``sdpa(q, k_prefix, v_prefix)`` on S x P, no mask (every computed
  token sees the whole prefix). An engine attends over both in one kernel with a bottom-right causal mask, or in two
  and merges the partial results by their log-sum-exp, as SGLang's chunked-prefix MLA path and vLLM's MLA prefill
  with a cached context do; this times the two calls (the merge, an elementwise pass over the outputs, is not
  timed);
- ``decompress`` (MLA only): the cached latent of the prefix (512 elements per token) multiplied by kv_b
  (512 x 128 heads x (128 + 128)) into the prefix's keys and values, one bf16 GEMM of P x prompts rows.

CUDA events around each synchronised call, median of 20 after 5 warm-ups, L2 flushed before each; and the summed
GPU kernel time of one call from the torch profiler (``gpu_kernel_ms``, the figure compare.py uses). Records: one
per (backend, shape, S, P, part) with prompts, tokens, flops, median_ms, gpu_kernel_ms, kernels; a point the
backend refuses or that runs out of memory is recorded with ``skipped``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
if "moesim" not in sys.modules:  # load moesim.measure without moesim/__init__ (pydantic, simpy, ... not needed)
    _pkg = types.ModuleType("moesim")
    _pkg.__path__ = [str(HERE.parents[2] / "moesim")]
    sys.modules["moesim"] = _pkg

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moesim.fileio import atomic_write  # noqa: E402
from moesim.measure.attention import _Bench, ceilings, kernel_profile  # noqa: E402

FORMAT = "moesim.validation.prefix_attention/1"
SHAPES = {
    "gqa-hd128": {"heads": 32, "kv_heads": 8, "dk": 128, "dv": 128},
    "mla-prefill": {"heads": 128, "kv_heads": 128, "dk": 192, "dv": 128},
}
COMPUTED = (512, 1024, 2048)
PREFIXES = (0, 1024, 2048, 4096, 8192)
TOKENS = 16384  # computed tokens per forward
LATENT, NOPE_V = 512, 128 + 128  # DeepSeek-V3's kv_lora_rank; kv_b's output per head: K's no-rope part and V


def _sdpa(backend: str, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v):
        with torch.no_grad(), sdpa_kernel(which):
            gqa = k.shape[1] != q.shape[1]
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


def _timed(fn, bench: _Bench) -> dict:
    fn()  # raises here if the backend refuses the shape
    med, low, n = bench.time(fn)
    prof = kernel_profile(fn, bench.flush_buf) if bench.profile else {}
    return dict(median_ms=med, min_ms=low, reps=n, gpu_kernel_ms=prof.get("gpu_kernel_ms"),
                kernels=prof.get("kernels", []))


def _point(backend: str, name: str, S: int, P: int, bench: _Bench) -> list[dict]:
    sh = dict(SHAPES[name])
    if backend == "flash" and sh["dv"] != sh["dk"]:
        sh["dv"] = sh["dk"]  # FlashAttention-2 takes one head size: V padded to Q and K's
    b = max(TOKENS // S, 1)
    h, hk, dk, dv = sh["heads"], sh["kv_heads"], sh["dk"], sh["dv"]
    q = bench.make(b, h, S, dk)
    base = dict(backend=backend, shape=name, computed=S, prefix=P, prompts=b, tokens=b * S, **sh)
    out = []
    k, v = bench.make(b, hk, S, dk), bench.make(b, hk, S, dv)
    r = _timed(lambda: _sdpa(backend, True)(q, k, v), bench)
    out.append(dict(base, part="self", flops=2.0 * b * h * (dk + dv) * S * (S + 1) / 2, **r))
    if P:
        kp, vp = bench.make(b, hk, P, dk), bench.make(b, hk, P, dv)
        r = _timed(lambda: _sdpa(backend, False)(q, kp, vp), bench)
        out.append(dict(base, part="prefix", flops=2.0 * b * h * (dk + dv) * S * P, **r))
        if name == "mla-prefill" and backend == "cudnn":  # the decompression does not depend on the backend
            lat, w = bench.make(b * P, LATENT, scale=0.1), bench.make(LATENT, h * NOPE_V, scale=0.05)
            r = _timed(lambda: lat @ w, bench)
            out.append(dict(base, part="decompress", flops=2.0 * b * P * LATENT * h * NOPE_V, **r))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: a plumbing check, not numbers")
    ap.add_argument("--max-seconds", type=float, default=400.0)
    a = ap.parse_args()
    t0 = time.time()
    dev = torch.device("cpu" if a.cpu else "cuda")
    flush = torch.empty(2**20 if a.cpu else 256 * 2**20, dtype=torch.uint8, device=dev)
    bench = _Bench(dev, a.cpu, 5, 20, flush, not a.cpu, torch.Generator(device=dev).manual_seed(0), None)  # type: ignore[arg-type]
    global TOKENS, COMPUTED, PREFIXES
    if a.cpu:
        TOKENS, COMPUTED, PREFIXES = 64, (16, 32), (0, 32)
    res = {"format": FORMAT, "device": "cpu (plumbing check)" if a.cpu else torch.cuda.get_device_name(0),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shapes": SHAPES, "ceilings": ceilings(bench), "method": __doc__.split("\n\n")[2:5], "records": []}
    path = Path(a.out) / "prefix_h200.json"
    for backend in ("flash",) if a.cpu else ("cudnn", "flash"):
        for name in SHAPES:
            for S in COMPUTED:
                for P in PREFIXES:
                    head = dict(backend=backend, shape=name, computed=S, prefix=P)
                    if time.time() - t0 > a.max_seconds:
                        res["records"].append(dict(head, skipped="time budget exhausted"))
                        continue
                    try:
                        recs = _point(backend, name, S, P, bench)
                        res["records"].extend(recs)
                        print(f"{backend:5s} {name:11s} S={S:5d} P={P:5d} " + "  ".join(
                            f"{r['part']} {r['median_ms']:.3f}/{r['gpu_kernel_ms'] or 0:.3f} ms" for r in recs),
                            flush=True)
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                        res["records"].append(dict(head, skipped=str(e).splitlines()[0][:300]))
                        print(f"skip {head}: {str(e).splitlines()[0][:200]}", flush=True)
                    if not a.cpu:
                        torch.cuda.empty_cache()
                    res["elapsed_s"] = round(time.time() - t0, 1)
                    atomic_write(path, lambda fh: json.dump(res, fh, indent=1))
    print(f"wrote {path} ({len(res['records'])} records, {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
