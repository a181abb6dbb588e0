"""DeepSeek-V3's attention block in prefill (and Mixtral-8x7B's GQA block, where measured), measured on one H200
(``mla_block_h200.json``, from ``measure_mla_block.py``), against what moesim charges for it (nothing here is fitted
to this file):

    python benchmarks/validation/attention_h200/compare_mla_block.py

Per size and core backend: the five projections (moesim: :func:`moesim.sim.compute.dense_time` without the core,
plain GEMMs at ``dense_efficiency``), the core (:func:`moesim.sim.compute.attention_time` with the matching kernel
family: ``cudnn`` or ``fa2``), the ``rest`` the block measures beyond them (norms, rotary embeddings,
concatenations, transposes, the residual add) against moesim's glue (:func:`moesim.sim.compute.glue_bytes`, eager as
PyTorch runs it op by op, at the HBM rate of the torch_reference pipeline's measured elementwise step; less the
post-attention norm and the MoE's residual add, which this block does not run), and the whole block. GPU kernel
times (profiler), bf16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from moesim.hardware import ClusterSpec, preset  # noqa: E402
from moesim.sim.compute import Attention, attention_time, dense_time, glue_bytes  # noqa: E402
from moesim.traces.model import ModelSpec  # noqa: E402
from moesim.traces.model_presets import model_preset  # noqa: E402

PROJECTIONS = {"mla": ("q_a", "q_b", "kv_a", "kv_b", "o"), "gqa": ("qkv", "o")}
MIXTRAL_ATTENTION = dict(name="mixtral-attention", num_layers=1, num_experts=8, top_k=2, d_model=4096, d_ff=14336,
                         num_heads=32, num_kv_heads=8, head_dim=128)


def block_errors(show: bool = False) -> dict[str, list[float]]:
    """moesim / measured - 1 per record and part (``show``: print the table)."""
    say = print if show else (lambda *a, **k: None)
    raw = json.loads((HERE / "mla_block_h200.json").read_text())
    gpu = ClusterSpec(**preset("hgx-h200")).gpu
    models = {"mla": ModelSpec(**model_preset("deepseek-v3").fields), "gqa": ModelSpec(**MIXTRAL_ATTENTION)}
    say(f"{raw['device']}, torch {raw['torch']}; ms of GPU kernel time; error = moesim / measured - 1")
    rate = gpu.hbm_GBps * 1e9 * gpu.moe_pipelines["torch_reference"].steps["activation"].hbm_efficiency
    say(f"{'shape':5s} {'core':6s} {'tokens':>6s} {'seq':>5s} | " + " | ".join(
        f"{k:>6s} {'moesim':>7s} {'err':>6s}" for k in ("proj", "core", "rest", "block")) + " | without glue")
    errs: dict[str, list[float]] = {"proj": [], "core": [], "rest": [], "block": [], "block without glue": []}
    for r in raw["records"]:
        shape = r.get("shape", "mla")
        model = models[shape]
        p = {k: v["gpu_kernel_ms"] for k, v in r["parts"].items()}
        T, s = r["tokens"], r["seq_len"]
        kernel = "cudnn" if r["backend"] == "cudnn" else "fa2"
        att = Attention("prefill", s, kernel)
        core = float(attention_time(np.array([T]), model, gpu, att)[0]) * 1e3
        proj = float(dense_time(np.array([T]), model, gpu)[0]) * 1e3 - gpu.ffn_overhead_us * 1e-3
        m_proj = sum(p[k] for k in PROJECTIONS[shape])
        rest = p["block"] - m_proj - p["core"]
        glue = T * (glue_bytes(model, eager=True, kernel=kernel) - 32.0 * model.d_model) / rate * 1e3
        row = {"proj": (proj, m_proj), "core": (core, p["core"]), "rest": (glue, rest),
               "block": (proj + core + glue, p["block"])}
        for k, (sim, meas) in row.items():
            errs[k].append(sim / meas - 1)
        errs["block without glue"].append((proj + core) / p["block"] - 1)
        errs.setdefault(f"block, {shape}", []).append((proj + core + glue) / p["block"] - 1)
        say(f"{shape:5s} {r['backend']:6s} {T:6d} {s:5d} | " + " | ".join(
            f"{meas:6.2f} {sim:7.2f} {sim / meas - 1:+6.1%}" for sim, meas in row.values())
            + f" | {(proj + core) / p['block'] - 1:+6.1%}")
    return errs


def main() -> int:
    for k, e in block_errors(show=True).items():
        a = np.abs(e)
        print(f"{k:18s} median |error| {np.median(a):.1%}, max {a.max():.1%} over {len(a)} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
