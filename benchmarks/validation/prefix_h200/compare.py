"""Prefill after a cached prefix, measured on one H200 (``prefix_h200.json``, from ``measure_prefix.py``) against
moesim's attention model (``workload.prefix_len``, :class:`moesim.sim.compute.Attention`), point by point:

    python benchmarks/validation/prefix_h200/compare.py

Nothing here was fitted to this file: the ``hgx-h200`` preset's kernel families (``cudnn``; ``fa2`` for the flash
backend) were fitted on prompts with no prefix (../attention_h200). Per point: the measured core (the computed tokens'
causal attention plus their attention over the prefix, summed GPU kernel time) against moesim's, and the part the
prefix adds (the point less the same point with no prefix), which is what ``prefix_len`` models; for MLA also the
decompression of the prefix's latent (one bf16 GEMM) against moesim's plain-GEMM roofline of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from moesim.hardware import ClusterSpec, preset  # noqa: E402
from moesim.sim.compute import Attention, attention_time, gemm_time, prefix_work  # noqa: E402
from moesim.traces.model import ModelSpec  # noqa: E402


def model(shape: str) -> ModelSpec:
    """The measured shape as a model: GQA 32/8 heads of 128, or DeepSeek-V3's MLA (heads of 128 + 64, V of 128)."""
    if shape.startswith("mla"):
        return ModelSpec(name=shape, num_layers=1, num_experts=1, top_k=1, d_model=7168, d_ff=1, num_heads=128,
                         q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                         v_head_dim=128)
    return ModelSpec(name=shape, num_layers=1, num_experts=1, top_k=1, d_model=4096, d_ff=1, num_heads=32,
                     num_kv_heads=8, head_dim=128)


def main() -> int:
    raw = json.loads((HERE / "prefix_h200.json").read_text())
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    core: dict[tuple, dict[str, float]] = {}
    decompress = []
    for r in raw["records"]:
        if "skipped" in r or not r.get("gpu_kernel_ms"):
            continue
        key = (r["backend"], r["shape"], r["computed"], r["prefix"], r["tokens"])
        if r["part"] == "decompress":
            decompress.append((key, r["gpu_kernel_ms"]))
        else:
            core.setdefault(key, {})[r["part"]] = r["gpu_kernel_ms"]

    def predicted(backend: str, shape: str, S: int, P: int, T: int) -> float:
        a = Attention("prefill", S, "cudnn" if backend == "cudnn" else "fa2", prefix=P)
        return float(attention_time(np.array([float(T)]), model(shape), gpu, a)[0]) * 1e3

    print(f"{raw['device']}, torch {raw['torch']}, cuDNN {raw['cudnn']}; {raw['date']}")
    print(f"{'backend':7s} {'shape':11s} {'S':>5s} {'P':>5s} {'measured ms':>11s} {'moesim ms':>9s} {'error':>7s}"
          f" {'prefix adds: measured':>21s} {'moesim':>7s} {'error':>7s}")
    errors: dict[str, list[float]] = {"core": [], "added": [], "decompress": []}
    for (backend, shape, S, P, T), parts in sorted(core.items()):
        meas = parts.get("self", 0.0) + parts.get("prefix", 0.0)
        pred = predicted(backend, shape, S, P, T)
        errors["core"].append(pred / meas - 1)
        line = f"{backend:7s} {shape:11s} {S:5d} {P:5d} {meas:11.3f} {pred:9.3f} {pred / meas - 1:+7.1%}"
        base = core.get((backend, shape, S, 0, T))
        if P and base and "self" in base:
            added_m, added_p = meas - base["self"], pred - predicted(backend, shape, S, 0, T)
            errors["added"].append(added_p / added_m - 1)
            line += f" {added_m:21.3f} {added_p:7.3f} {added_p / added_m - 1:+7.1%}"
        print(line)
    for (backend, shape, S, P, T), meas in sorted(decompress):
        a = Attention("prefill", S, prefix=P)
        flops, nbytes = prefix_work(np.array([float(T)]), model(shape), a)
        pred = float(gemm_time(flops, nbytes, gpu)[0]) * 1e3
        errors["decompress"].append(pred / meas - 1)
        print(f"decompress {shape} S={S} P={P}: {P * T // S:,} latent rows, measured {meas:.3f} ms, moesim "
              f"{pred:.3f} ms ({pred / meas - 1:+.1%})")
    for what, e in errors.items():
        if e:
            a = np.abs(e)
            print(f"{what:10s}: median |error| {np.median(a):.1%}, max {a.max():.1%}, mean signed {np.mean(e):+.1%} "
                  f"({a.size} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
