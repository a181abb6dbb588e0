"""The attention model against the H100 and H200 measurements: fit on Mixtral's shape, error on Qwen3-30B-A3B's.

    python benchmarks/validation/attention_h100/compare.py [--points]

For each GPU (attention_h100/attention_h100.json on the dgx-h100 preset, attention_h200/attention_h200.json on
hgx-h200): fits the four attention parameters (:mod:`moesim.calibration.attention`) on the mixtral-8x7b
attention-core points (prefill and decode, tp 1/2/4), GPU-side kernel time, and prints the error on the
held-out qwen3-30b-a3b points; the error of the preset as shipped (what ``moesim calibrate`` fits on that file,
every third point held out) on all points; the H100's fit carried to the H200 (what a GPU without its own
attention measurement gets); and the whole block (QKV and O projections at the preset's ``dense_efficiency``,
fitted by ``moesim calibrate`` on the same file's projection records, plus the core) against the measured block.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moesim.calibration.attention import AttentionPoint, errors, fit_attention, load_attention_points, predict
from moesim.hardware import ClusterSpec, preset
from moesim.hardware.spec import GPUSpec
from moesim.sim.compute import Attention, dense_time
from moesim.traces.model import ModelSpec

VALIDATION = Path(__file__).resolve().parents[1]
GPUS = {"H100": (VALIDATION / "attention_h100" / "attention_h100.json", "dgx-h100"),
        "H200": (VALIDATION / "attention_h200" / "attention_h200.json", "hgx-h200")}
KEYS = ("attention_efficiency", "attention_fixed_keys", "attention_overhead_us", "attention_hbm_efficiency")


def _summary(label: str, points: list[AttentionPoint], e: np.ndarray) -> None:
    for phase in ("prefill", "decode"):
        sel = np.abs([x for p, x in zip(points, e) if p.phase == phase])
        print(f"  {label}, {phase}: n={sel.size} median |error| {np.median(sel) * 100:.1f}%, "
              f"max {sel.max() * 100:.1f}%")
    print(f"  {label}, all: median |error| {np.median(np.abs(e)) * 100:.1f}%")


def _block(path: Path, gpu: GPUSpec) -> None:
    """The whole block (QKV + core + O), every shape, GPU-side: projections are not fitted here."""
    data = json.loads(path.read_text())
    block = []
    for r in data["records"]:
        if r.get("part") != "block":
            continue
        s = data["shapes"][r["shape"]]
        model = ModelSpec(num_layers=1, num_experts=1, top_k=1, d_model=s["d_model"], d_ff=1,
                          num_heads=s["n_heads"], num_kv_heads=s["n_kv_heads"], head_dim=s["head_dim"])
        prefill = r["phase"] == "prefill"
        att = Attention("prefill", r["seq_len"]) if prefill else Attention("decode", r["context"])
        tokens = (r["tokens"] if prefill else r["batch"]) / r["tp"]
        kernels = gpu.model_copy(update={"ffn_overhead_us": 0.0})  # GPU-side time: no launch cost
        pred = dense_time(np.array([tokens]), model, kernels, tp=r["tp"], attention=att)[0]
        block.append((r["phase"], pred / (r["gpu_kernel_ms"] * 1e-3) - 1))
    for phase in ("prefill", "decode"):
        sel = np.abs([x for ph, x in block if ph == phase])
        print(f"  attention block (projections + core), {phase}: n={sel.size} median |error| "
              f"{np.median(sel) * 100:.1f}%, max {sel.max() * 100:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", action="store_true", help="print every held-out point")
    args = ap.parse_args()
    fits = {}
    for name, (path, preset_name) in GPUS.items():
        points = load_attention_points(path)
        shipped = ClusterSpec(**preset(preset_name)).gpu
        fit = fit_attention(points, shipped, train=lambda p: p.shape == "mixtral-8x7b")
        fits[name] = fit
        gpu = fit.apply(shipped)
        print(f"{name} ({path.name}): fitted on mixtral-8x7b: " + ", ".join(f"{k} {getattr(fit, k):g}" for k in KEYS))
        print(f"  {preset_name} ships (moesim calibrate on the whole file): "
              + ", ".join(f"{getattr(shipped, k):g}" for k in KEYS)
              + f"; dense_efficiency {shipped.dense_efficiency:g}")
        held = [p for p in points if p.shape != "mixtral-8x7b"]
        e = errors(held, gpu)
        if args.points:
            for p, err in zip(held, e):
                print(f"    {p.label:58s} measured {p.measured_s * 1e3:7.3f} ms  moesim {predict(p, gpu) * 1e3:7.3f} ms"
                      f"  {err * 100:+6.1f}%")
        _summary("held-out qwen3-30b-a3b core", held, e)
        _summary(f"{preset_name} as shipped, every core point", points, errors(points, shipped))
        _block(path, shipped)
    path, preset_name = GPUS["H200"]
    points = load_attention_points(path)
    carried = fits["H100"].apply(ClusterSpec(**preset(preset_name)).gpu)
    print("H200 predicted with the H100's fit (what a GPU without its own attention measurement gets):")
    _summary("every core point", points, errors(points, carried))


if __name__ == "__main__":
    main()
