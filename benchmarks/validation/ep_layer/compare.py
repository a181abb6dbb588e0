"""Compare moesim's prediction with the measured 2x H200 expert-parallel layer (measured_2xh200.json).

    python benchmarks/validation/ep_layer/compare.py

Simulates the same trace and placements on the hgx-h200 preset cut to one node of 2 GPUs, with the measured
loop's settings: no attention work, one copy per destination GPU, experts run one after another. Prints per
placement, summed over layers, predicted vs measured: the slowest rank's dispatch, expert compute and layer
time, and the combine of the rank that joins it last (the other rank's combine includes waiting for it, which
moesim reports apart as sync wait); then the speedups between placements.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moesim.study import parse_scenario, run_study

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
        "engine": {"dispatch": "per_gpu", "expert_kernel": "per_expert", "rate_tolerance": 0.0, "progress": False},
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


if __name__ == "__main__":
    main()
