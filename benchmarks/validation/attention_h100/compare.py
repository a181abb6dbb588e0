"""The attention model against the H100 measurement: fit on Mixtral's shape, error on Qwen3-30B-A3B's.

    python benchmarks/validation/attention_h100/compare.py

Fits ``attention_efficiency``, ``attention_fixed_keys`` and ``attention_overhead_us``
(:mod:`moesim.calibration.attention`) on the mixtral-8x7b attention-core points (prefill and decode, tp 1/2/4)
of attention_h100.json, GPU-side kernel time, and prints the error on the held-out qwen3-30b-a3b points, then
the whole block (QKV and O projections at the preset's GEMM efficiency, plus the core) against the measured
block. The fitted values are what the dgx-h100 and hgx-h200 presets carry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moesim.calibration.attention import errors, fit_attention, load_attention_points, predict
from moesim.hardware import ClusterSpec, preset
from moesim.sim.compute import Attention, dense_time
from moesim.traces.model import ModelSpec

HERE = Path(__file__).resolve().parent


def main() -> None:
    path = HERE / "attention_h100.json"
    points = load_attention_points(path)
    base = ClusterSpec(**preset("dgx-h100")).gpu
    fit = fit_attention(points, base, train=lambda p: p.shape == "mixtral-8x7b")
    gpu = fit.apply(base)
    shipped = (base.attention_efficiency, base.attention_fixed_keys, base.attention_overhead_us)
    print(f"fitted on mixtral-8x7b: attention_efficiency {fit.attention_efficiency}, attention_fixed_keys "
          f"{fit.attention_fixed_keys:g}, attention_overhead_us {fit.attention_overhead_us:g} "
          f"(dgx-h100 preset ships {shipped[0]}, {shipped[1]:g}, {shipped[2]:g})")
    held = [p for p in points if p.shape != "mixtral-8x7b"]
    e = errors(held, gpu)
    for p, err in zip(held, e):
        print(f"  {p.label:58s} measured {p.measured_s * 1e3:7.3f} ms  moesim {predict(p, gpu) * 1e3:7.3f} ms  "
              f"{err * 100:+6.1f}%")
    for phase in ("prefill", "decode"):
        sel = np.abs([x for p, x in zip(held, e) if p.phase == phase])
        print(f"held-out attention core, {phase}: n={sel.size} median |error| {np.median(sel) * 100:.1f}%, "
              f"max {sel.max() * 100:.1f}%")
    print(f"held-out attention core, all: median |error| {np.median(np.abs(e)) * 100:.1f}%")

    # the whole block (QKV + core + O), every shape, GPU-side: projections are not fitted here
    data = json.loads(path.read_text())
    block = []
    for r in data["records"]:
        if r["part"] != "block":
            continue
        s = data["shapes"][r["shape"]]
        model = ModelSpec(num_layers=1, num_experts=1, top_k=1, d_model=s["d_model"], d_ff=1,
                          num_heads=s["n_heads"], num_kv_heads=s["n_kv_heads"], head_dim=s["head_dim"])
        prefill = r["phase"] == "prefill"
        att = Attention("prefill", r["seq_len"]) if prefill else Attention("decode", r["context"])
        tokens = (r["tokens"] if prefill else r["batch"]) / r["tp"]
        kernels = gpu.model_copy(update={"ffn_overhead_us": 0.0})  # GPU-side time: no launch cost
        pred = dense_time(np.array([tokens]), model, kernels, tp=r["tp"], attention=att)[0]
        block.append((r["phase"], r["shape"], pred / (r["gpu_kernel_ms"] * 1e-3) - 1))
    for phase in ("prefill", "decode"):
        sel = np.abs([x for ph, _, x in block if ph == phase])
        print(f"attention block (projections + core), {phase}: n={sel.size} median |error| "
              f"{np.median(sel) * 100:.1f}%, max {sel.max() * 100:.1f}%")


if __name__ == "__main__":
    main()
