"""Re-derive the trace data shipped in ``moesim/data`` from ``../shared/traces`` (run by hand, not in CI).

    python benchmarks/derive_trace_data.py [--shared ../shared] [--only olmoe|deepseek]

- ``olmoe-1b-7b-c4.params.yaml``, ``mixtral-8x7b-c4.params.yaml``: fitted with
  :func:`moesim.traces.generator_fit.fit_counts` to the aggregate routing counts that allenai/OLMoE publishes
  (Apache-2.0; ``olmoe-routing-stats/derived_dense_counts.npz``, text domain c4): expert counts of layers
  0, 7 and 15 and the rank-aligned cross-layer counts 0 -> 7 and 7 -> 15, used as the transition counts of a
  3-layer model whose layers stand for those three.
- ``olmoe-1b-7b-c4.small.npz``: 2048 tokens generated from the OLMoE parameters (seed 0), a small trace
  fixture that works on a fresh clone.
- ``deepseek-v2-lite.params.yaml``: ``moesim trace import`` of the 250 DeepSeek-V2-Lite-Chat prefill logs
  (8 GPUs, 256 tokens per GPU per batch, least-loaded assignment), then ``moesim trace fit`` (fanout 16,
  seed 0). Only aggregate numbers are written; the per-token data stays in ../shared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moesim.traces.fitted_generator import DATA_DIR, generate_fitted, save_params
from moesim.traces.format import save_trace
from moesim.traces.generator_fit import fit_counts, fit_trace
from moesim.traces.readers import import_trace

OLMOE_CREDIT = ("derived from allenai/OLMoE (commit 357454f4f647385839c0ff6b99a688dc7cd9c13f, "
                "scripts/routing_output), Apache-2.0; see moesim/data/NOTICE.md")


def olmoe(shared: Path) -> None:
    z = np.load(shared / "traces" / "olmoe-routing-stats" / "derived_dense_counts.npz")
    for model, name, top_k in (("olmoe", "olmoe-1b-7b-c4", 8), ("mistral", "mixtral-8x7b-c4", 2)):
        load = z[f"{model}__expert_counts__c4"]
        cross = z[f"{model}__expert_counts_crosslayer__c4"]
        t0 = time.perf_counter()
        params = fit_counts(load, cross, top_k, fanout=16, rounds=30, name=name,
                            fitted_to={"source": f"allenai/OLMoE routing counts, {model}, c4",
                                       "layers": "0, 7, 15 of the model (3 of its MoE layers)",
                                       "transitions": "rank-aligned cross-layer counts 0->7, 7->15"})
        path = save_params(params, DATA_DIR / f"{name}.params.yaml",
                           header=f"{name}: moesim fitted-generator parameters, {OLMOE_CREDIT}.\n"
                                  "Layers 0, 1, 2 stand for the model's MoE layers 0, 7 and 15.")
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
        if model == "olmoe":
            trace = generate_fitted(params, num_gpus=8, tokens_per_gpu=128, batches=2,
                                    rng=np.random.default_rng(0), weights=False, model="olmoe-1b-7b (3 layers)")
            print(f"wrote {save_trace(trace, DATA_DIR / f'{name}.small.npz')}")


def deepseek(shared: Path) -> None:
    files = sorted((shared / "traces" / "deepseek-v2-lite-prefill").glob("*.csv.gz"))
    if not files:
        sys.exit(f"no DeepSeek-V2-Lite logs under {shared}")
    res = import_trace(files, num_experts=64, num_gpus=8, tokens_per_gpu=256, model="deepseek-v2-lite-chat")
    t0 = time.perf_counter()
    params = fit_trace(res.trace, fanout=16, seed=0, name="deepseek-v2-lite")
    path = save_params(params, DATA_DIR / "deepseek-v2-lite.params.yaml",
                       header="deepseek-v2-lite: moesim fitted-generator parameters (aggregate numbers only), fitted\n"
                              "to 250 prompts of DeepSeek-V2-Lite-Chat prefill routing (23,785 tokens; logs from the\n"
                              "public repository ngavhane/moe-beyond, which states no licence; the logs are not\n"
                              "shipped). Re-derive: python benchmarks/derive_trace_data.py --only deepseek")
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--only", choices=["olmoe", "deepseek"])
    args = ap.parse_args()
    shared = Path(args.shared)
    if args.only in (None, "olmoe"):
        olmoe(shared)
    if args.only in (None, "deepseek"):
        deepseek(shared)


if __name__ == "__main__":
    main()
