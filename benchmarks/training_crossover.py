"""EP vs EP with rearrangement vs Hecate's FSSDP: step time across expert skew and 8 to 256 H200s, Mixtral-8x7B-
and DeepSeek-V3-shaped, next to Hecate's reported range (up to 3.54x over state-of-the-art MoE training systems,
arXiv 2502.02581). Run by hand: ``python benchmarks/training_crossover.py [--quick] [--nodes 1,4,16,32]
[--models mixtral-8x7b,deepseek-v3]`` (the full grid takes tens of minutes, DeepSeek-V3 on 128 and 256 GPUs most
of them; ``--quick`` runs 8 and 32 GPUs). Prints one line per (model, GPUs, skew, layout) and the
crossovers. Two MoE layers are simulated and scaled to the whole model (``training.model_layers``); every
step's routing is a fresh draw of the same skew with expert popularity drifting between steps.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesim.study.training_sweep import best_speedup, crossovers, sweep  # noqa: E402


def scenario(preset: str, model_layers: int, ep: int | None, extra: dict, recompute: bool = False) -> dict:
    return {
        "name": f"crossover-{preset}",
        "clusters": [{"name": "h200", "preset": "hgx-h200", "nodes": 1}],
        "model": {"preset": preset, "num_layers": 2, **extra},
        "workload": {"phase": "train", "seq_len": 4096,
                     "synthetic": {"tokens_per_gpu": 4096, "batches": 4, "profile_batches": 1, "zipf_alpha": 0.0,
                                   "drift_swaps_per_batch": 1, "seed": 5}},
        "training": {"ep": ep, "micro_batches": 8, "model_layers": model_layers, "recompute": recompute, "layouts": [
            {"name": "ep", "kind": "ep", "placement": "contiguous"},
            {"name": "ep-rearrange-2", "kind": "rearrange", "placement": "greedy", "every_steps": 2,
             "options": {"redundant_experts": ep or 0}},
            {"name": "fssdp", "kind": "fssdp", "placement": "greedy", "sharding": "home", "replica_rule": "local",
             "predict": "current", "options": {"redundant_experts": 0}},
            # topology-aware: every node materialises a full set with hot experts replicated; tokens stay in the
            # node and parameters travel instead
            {"name": "fssdp-node", "kind": "fssdp", "placement": "greedy", "sharding": "home", "group": 8,
             "replica_rule": "local", "predict": "current", "options": {"redundant_experts": 8}}]},
        "engine": {"moe_kernels": "fused", "progress": False},
    }


def show(rows: list[dict]) -> None:
    for r in rows:
        if r.get("error"):
            print(f"{r['model']:14s} {r['gpus']:5d} {r['zipf_alpha']:5.1f} {r['layout']:15s} {r['error']}", flush=True)
            continue
        print(f"{r['model']:14s} {r['gpus']:5d} {r['zipf_alpha']:5.1f} {r['layout']:15s} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:11,.0f} {r['speedup']:6.2f}x {r['imbalance']:6.2f} {r['wait_ms']:7.1f} "
              f"{r['a2a_ms']:7.1f} {r['fssdp_ms']:7.1f} {r['memory_GB']:7.1f}" + ("" if r["fits"] else " OOM"),
              flush=True)


def main() -> int:
    quick = "--quick" in sys.argv
    nodes = [1, 4] if quick else [1, 4, 16, 32]
    models = ["mixtral-8x7b", "deepseek-v3"]
    for flag in ("--nodes", "--models"):  # e.g. --nodes 16,32 --models deepseek-v3
        if flag in sys.argv:
            value = sys.argv[sys.argv.index(flag) + 1].split(",")
            nodes, models = ([int(v) for v in value], models) if flag == "--nodes" else (nodes, value)
    alphas = [0.0, 0.5, 1.0]
    t0 = time.perf_counter()
    rows: list[dict] = []
    print(f"{'model':14s} {'GPUs':>5s} {'alpha':>5s} {'layout':15s} {'step ms':>9s} {'tokens/s':>11s} "
          f"{'speedup':>7s} {'imbal':>6s} {'wait':>7s} {'a2a':>7s} {'fssdp':>7s} {'mem GB':>7s}", flush=True)
    # DeepSeek-V3 recomputes activations: without it, 4K tokens per GPU keep about 2 GB per layer for the backward
    for preset, layers, ep, extra, recompute in (("mixtral-8x7b", 32, 8, {}, False),
                                                 ("deepseek-v3", 58, None, {"first_dense_layers": 0}, True)):
        if preset not in models:
            continue
        data = scenario(preset, layers, ep, extra, recompute)
        for n in nodes:
            gpus = n * 8
            # FSSDP materialises one extra copy per GPU of the stage beyond the experts (hot experts replicated);
            # per node only where a node can hold a full set (Mixtral's 8 experts, not DeepSeek-V3's 256)
            data["training"]["layouts"][2]["options"]["redundant_experts"] = gpus
            if preset != "mixtral-8x7b":
                data["training"]["layouts"] = data["training"]["layouts"][:3]
                # DeepSeek-V3's non-expert weights and gradients (about 14B parameters) fill a GPU unless pipeline
                # stages split them: stages of 4 nodes (EP32, as the 32-GPU point), 16 micro-batches per step
                data["training"]["pp"] = max(1, n // 4)
                data["training"]["micro_batches"] = 16 if n >= 8 else 8
                data["training"]["layouts"][2]["options"]["redundant_experts"] = gpus // data["training"]["pp"]
            new = sweep(data, nodes=[n], alphas=alphas, source=f"benchmarks/training_crossover.py ({preset})",
                        progress=lambda what: print(f"  ... {what} ({time.perf_counter() - t0:.0f} s)",
                                                    file=sys.stderr))
            show(new)
            rows += new
    print("\n".join(crossovers(rows, "ep")))
    print(f"best FSSDP speedup over EP in this grid: {best_speedup(rows, 'fssdp'):.2f}x (Hecate reports up to 3.54x "
          f"over state-of-the-art MoE training systems); {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
