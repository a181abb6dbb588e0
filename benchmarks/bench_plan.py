"""``moesim plan`` on a DeepSeek-V3-shaped count dump: wall time, and imbalance before and after, out of sample.

    python benchmarks/bench_plan.py [--windows 100] [--tokens 4096] [-o out/bench_plan]

The dump: a count trace (what SGLang's ``stat`` recorder or TensorRT-LLM's expert statistics hold) of 61
decoder layers, 58 MoE layers of 256 experts, top-8, one window per iteration of ``--tokens`` tokens (4096:
TensorRT-LLM's README shows 1024 routed tokens per rank per layer at EP32, i.e. 32 x 1024 / 8 tokens). It is
made from the repository's shipped statistics of DeepSeek-V2-Lite's routing (``moesim/data/
deepseek-v2-lite.params.yaml``, fitted to real prefill routing), expanded by ``moesim.traces.fitted_expand``: MoE
layer ``l`` takes the per-expert popularity of V2-Lite layer ``l x 26 // 58``, each of its 64 experts split into 4
experts of equal share (DeepSeek-V3 has 4x the experts of V2-Lite), identities shuffled per layer; each window
tilts it by ``exp(z)``, ``z ~ N(0, drift_sigma)`` per expert (the fitted drift, ``drift_rho`` 0), and draws its
picks multinomially (no expert above ``1 / top_k`` of a window's picks: a token picks an expert once). Then
``moesim plan --cluster hgx-h200 --set nodes=4 (EP32) --model deepseek-v3 --engine trtllm`` plans on the first
half of the windows and scores on the second. Printed: the command's wall and CPU time (the issue asks for under
30 s on the 2-core machine; on a shared machine the wall time includes waiting for a core) and the current (engine
default) map's and EPLB's out-of-sample imbalance, next to TensorRT-LLM's published DeepSeek-R1 EP32 figures
(1.56 without EPLB, 0.115 with 32 redundant experts, as (max - mean) / mean averaged over layers and iterations).
The same is printed for the dump without the per-window drift (popularity fixed),
to show how much of the imbalance left after EPLB is the drift between windows. The V2-Lite statistics are not
DeepSeek-R1's
routing: the comparison is of the same measure, not of the same traffic.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from moesim.cli import main
from moesim.traces.count_trace import CountTrace, save_counts
from moesim.traces.fitted_expand import expanded_popularity
from moesim.traces.fitted_generator import load_params, resolve_params
from moesim.traces.format import TraceMeta

TRTLLM_EP32 = {"without EPLB": 1.564272, "with EPLB (32 redundant)": 0.115378}  # ep_load_balancer/README.md


def v3_count_dump(windows: int, tokens: int, seed: int = 0, drift: bool = True) -> CountTrace:
    """The DeepSeek-V3-shaped count dump described in the module docstring."""
    params = load_params(resolve_params("deepseek-v2-lite"))
    rng = np.random.default_rng(seed)
    L, E, K = 58, 256, 8
    # V2-Lite layer l x 26 // 58, each expert split into 4 of equal share, shuffled per layer (the library's
    # expansion, which workload.synthetic.fitted: {params: deepseek-v2-lite, expand_experts: 4} uses)
    pop = expanded_popularity(params, num_layers=L, num_experts=E, rng=rng)
    loads = np.empty((windows, L, E), dtype=np.int64)
    for w in range(windows):
        tilted = pop * np.exp(rng.normal(0.0, params.drift_sigma if drift else 0.0, size=(L, E)))
        for _ in range(8):  # a token picks an expert once: no expert above 1 / top_k of the picks
            tilted = np.minimum(tilted / tilted.sum(axis=1, keepdims=True), 1.0 / K)
        tilted /= tilted.sum(axis=1, keepdims=True)
        loads[w] = np.minimum(np.stack([rng.multinomial(tokens * K, p) for p in tilted]), tokens)
    meta = TraceMeta(num_experts=E, num_layers=L, top_k=K, model="deepseek-v3",
                     source=f"benchmarks/bench_plan.py: DeepSeek-V3 shape from the shipped {params.name} statistics")
    return CountTrace(loads=loads, meta=meta, layer_ids=tuple(range(3, 61)), num_decoder_layers=61,
                      window_tokens=np.full(windows, tokens, dtype=np.int64))


def run(windows: int, tokens: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dump = out / "v3_counts.npz"
    save_counts(dump, v3_count_dump(windows, tokens))
    t0, c0 = time.perf_counter(), time.process_time()
    rc = main(["plan", str(dump), "--cluster", "hgx-h200", "--set", "nodes=4", "--model", "deepseek-v3", "--engine",
               "trtllm", "-o", str(out / "plan"), "-q", "--tokens-per-gpu", "256"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rc:
        raise SystemExit(rc)
    plan = json.loads((out / "plan" / "plan.json").read_text())
    by = {c["name"]: c for c in plan["candidates"]}
    eplb32 = by.get("eplb+32")
    print(f"\nmoesim plan: {wall:.1f} s wall, {cpu:.1f} s of CPU (target: under 30 s; the wall time counts waiting "
          "for a core when the machine is shared)")
    print(f"{plan['split']}")
    print(f"{'out-of-sample imbalance, EP32':<42}{'max/mean':>10}{'(max-mean)/mean':>17}{'TensorRT-LLM':>14}")
    rows = [("engine default map (no EPLB)", by["current"], TRTLLM_EP32["without EPLB"]),
            ("eplb, 32 redundant experts", eplb32, TRTLLM_EP32["with EPLB (32 redundant)"])]
    for label, c, ref in rows:
        if c is not None:
            print(f"{label:<42}{c['imbalance_out']:>10.3f}{c['trtllm_imbalance_out']:>17.3f}{ref:>14.3f}")
    print(f"verdict: {plan['verdict']['lines'][0]}")
    # the same without the per-window drift (popularity fixed): what is left is sampling noise and the placement
    save_counts(out / "v3_counts_no_drift.npz", v3_count_dump(windows, tokens, drift=False))
    rc = main(["plan", str(out / "v3_counts_no_drift.npz"), "--cluster", "hgx-h200", "--set", "nodes=4", "--model",
               "deepseek-v3", "--engine", "trtllm", "-o", str(out / "plan_no_drift"), "-q", "--tokens-per-gpu", "256",
               "--policies", "eplb", "--redundant", "32"])
    if rc:
        raise SystemExit(rc)
    still = {c["name"]: c for c in json.loads((out / "plan_no_drift" / "plan.json").read_text())["candidates"]}
    print("without the per-window drift (popularity fixed over the windows):")
    for label, c, ref in [("engine default map (no EPLB)", still["current"], TRTLLM_EP32["without EPLB"]),
                          ("eplb, 32 redundant experts", still["eplb+32"], TRTLLM_EP32["with EPLB (32 redundant)"])]:
        print(f"{label:<42}{c['imbalance_out']:>10.3f}{c['trtllm_imbalance_out']:>17.3f}{ref:>14.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("-o", "--output", default="out/bench_plan")
    a = ap.parse_args()
    run(a.windows, a.tokens, Path(a.output))
