"""Compare moesim's prediction with the measured 2x H200 expert-parallel layer (measured_2xh200.json), and with
whole layers (attention + MoE) on one H200 and one H100 (measured_1xh200_*.json, measured_1xh100_*.json).

    python benchmarks/validation/ep_layer/compare.py

Simulates the same trace and placements on the hgx-h200 preset cut to one node of 2 GPUs, with the measured
loop's settings: no attention work, one copy per destination GPU, experts run one after another. Prints per
placement, summed over layers, predicted vs measured: the slowest rank's dispatch, expert compute and layer
time, and the combine of the rank that joins it last (the other rank's combine includes waiting for it, which
moesim reports apart as sync wait); then the speedups between placements.

The one-GPU files hold the same trace's first 128 / 512 tokens per home GPU (decode over a 2048-token KV cache)
or all of them (prefill of 4096-token prompts), every token and expert on the one GPU: each layer is the
attention block (QKV, FlashAttention core, O; Mixtral's 32 query and 8 KV heads), the eight experts one after
another, and two all-to-alls that are local copies. moesim runs the same on a one-GPU hgx-h200 (dgx-h100) cluster
with the workload's ``seq_len`` / ``kv_len``; the per-phase sums over the 8 layers are printed beside the measurement.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from moesim.study import parse_scenario, run_study
from moesim.traces.format import load_trace, save_trace

HERE = Path(__file__).resolve().parent


def main() -> None:
    measured = json.loads((HERE / "measured_2xh200.json").read_text())
    names = [Path(n).stem for n in measured["placements"]]
    scenario = parse_scenario({
        "clusters": [{"name": "2xh200", "preset": "hgx-h200", "gpus_per_node": 2}],
        "model": {"name": "mixtral-8x7b", "num_layers": 8, "num_experts": 8, "top_k": 2,
                  "d_model": measured["d_model"], "d_ff": measured["d_ff"], "dense_flops_per_token": 0,
                  "dense_weight_bytes": 0},
        "workload": {"trace": {"file": "trace.npz"}},
        "placements": [{"file": f"{n}.json"} for n in names],
        "baseline": names[0],
        "engine": {"moe_kernels": "ffn", "dispatch": "per_gpu", "expert_kernel": "per_expert", "rate_tolerance": 0.0,
                   "progress": False},
    }, str(HERE / "compare.py"), HERE)
    result = run_study(scenario)
    print(f"{'placement':12s} {'phase':9s} {'measured ms':>12s} {'moesim ms':>10s} {'error':>7s}")
    totals = {}
    for run in result.runs:
        g = run.records.gpu
        pred = {
            "dispatch": (g["t_dispatch_done"] - g["t_dispatch_start"]).max(axis=2)[0],
            "compute": (g["t_compute_end"] - g["t_compute_start"]).max(axis=2)[0],
            "combine": (g["t_combine_done"] - g["t_combine_start"]).max(axis=2)[0],
            "layer": (g["t_combine_done"] - g["t_dispatch_start"]).max(axis=2)[0],
        }
        meas_ranks = measured["placements"][f"{run.name}.json"]["ms_median_per_rank"]
        per_rank = {ph: np.array([r[ph] for r in meas_ranks]) for ph in ("dispatch", "compute", "combine", "layer")}
        last = per_rank["compute"].argmax(axis=0)  # the rank that joins the combine last waits for nobody
        for phase in ("dispatch", "compute", "combine", "layer"):
            if phase == "combine":
                meas = per_rank["combine"][last, np.arange(last.size)].sum()
            else:
                meas = per_rank[phase].max(axis=0).sum()
            p = pred[phase].sum() * 1e3
            print(f"{run.name:12s} {phase:9s} {meas:12.3f} {p:10.3f} {(p - meas) / meas * 100:+6.1f}%")
            if phase == "layer":
                totals[run.name] = (meas, p)
    base = names[0]
    for n in names[1:]:
        m_speed = totals[base][0] / totals[n][0]
        p_speed = totals[base][1] / totals[n][1]
        print(f"speedup of {n} over {base}: measured {m_speed:.3f}x, moesim {p_speed:.3f}x")


ONE_GPU = {"prefill": {"seq_len": 4096}, "decode256": {"kv_len": 2048}, "decode1024": {"kv_len": 2048},
           "noattn": {}}


def one_gpu(gpu: str = "h200") -> dict[str, dict[str, tuple[float, float]]]:
    """Whole layers on one GPU (``h200``: hgx-h200 preset, ``h100``: dgx-h100): moesim vs
    measured_1x{gpu}_*.json, per phase summed over the layers; returns per run {phase: (measured ms, moesim
    ms)} with ``share``: the attention's (measured, moesim) share of the layer."""
    preset_name = {"h200": "hgx-h200", "h100": "dgx-h100"}[gpu]
    results: dict[str, dict[str, tuple[float, float]]] = {}
    full = load_trace(HERE / "trace.npz")
    print(f"\n{f'one {gpu.upper()}, 8 layers':26s} {'phase':9s} {'measured ms':>12s} {'moesim ms':>10s} {'error':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, attention in ONE_GPU.items():
            measured = json.loads((HERE / f"measured_1x{gpu}_{name}.json").read_text())
            n = measured["tokens_per_gpu"]
            keep = np.zeros(full.num_tokens, dtype=bool)  # the first n/2 tokens of each of the two home GPUs
            for g in (0, 1):
                keep[np.flatnonzero(full.home == g)[: n // 2]] = True
            trace = replace(full, experts=full.experts[keep],
                            weights=None if full.weights is None else full.weights[keep],
                            home=np.zeros(n, dtype=np.int32), batch=np.zeros(n, dtype=np.int32))
            path = save_trace(trace, Path(tmp) / f"{name}.npz")
            heads = {"num_heads": measured["heads"], "num_kv_heads": measured["kv_heads"]} if attention else \
                {"dense_flops_per_token": 0, "dense_weight_bytes": 0}
            scenario = parse_scenario({
                "clusters": [{"name": f"1x{gpu}", "preset": preset_name, "gpus_per_node": 1}],
                "model": {"name": "mixtral-8x7b", "num_layers": 8, "num_experts": 8, "top_k": 2,
                          "d_model": measured["d_model"], "d_ff": measured["d_ff"], **heads},
                "workload": {"trace": {"file": str(path), "tokens_per_gpu": n}, **attention},
                "placements": ["contiguous"],
                "engine": {"moe_kernels": "ffn", "dispatch": "per_gpu", "expert_kernel": "per_expert",
                           "rate_tolerance": 0.0, "progress": False},
            }, str(HERE / "compare.py"), HERE)
            g = run_study(scenario).runs[0].records.gpu
            pred = {"attention": g["t_dense_end"] - g["t_layer_start"],
                    "dispatch": g["t_dispatch_done"] - g["t_dispatch_start"],
                    "compute": g["t_compute_end"] - g["t_compute_start"],
                    "combine": g["t_combine_done"] - g["t_combine_start"],
                    "layer": g["t_combine_done"] - g["t_layer_start"]}
            meas = measured["placements"]["contiguous.json"]["ms_median_per_rank"][0]
            label = f"{name} ({n} tokens)"
            res = results[name] = {}
            for phase in ("attention", "compute", "layer") if attention else ("compute", "layer"):
                m, p = sum(meas[phase]), pred[phase][0, :, 0].sum() * 1e3
                res[phase] = (m, p)
                print(f"{label:26s} {phase:9s} {m:12.3f} {p:10.3f} {(p - m) / m * 100:+6.1f}%")
            if attention:  # what dilutes a placement's gain end to end
                m = sum(meas["attention"]) / sum(meas["layer"])
                p = pred["attention"].sum() / pred["layer"].sum()
                res["share"] = (m, p)
                print(f"{label:26s} {'attention share of the layer':30s} measured {m:.1%}, moesim {p:.1%}")
    return results


if __name__ == "__main__":
    main()
    one_gpu("h200")
    one_gpu("h100")
