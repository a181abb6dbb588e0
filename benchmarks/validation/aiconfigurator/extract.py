"""vLLM's fused MoE kernel timed on H200 and H100 by NVIDIA AIConfigurator, as ``moesim.bench.moe_table/1`` files.

AIConfigurator (github ai-dynamo/aiconfigurator, Apache-2.0, code and data) ships tables of real-GPU kernel
timings in its ``aiconfigurator-core`` wheel. Its vLLM MoE table (``systems/data/<gpu>/moe/vllm/0.24.0/
moe_perf.parquet``, collector ``collector/vllm/collect_moe.py``) times vLLM's ``fused_experts`` - the sorted-id
alignment, the Triton grouped GEMM for gate-up, SiLU x up, the Triton grouped GEMM for down with the routing
weights, and the top-k sum; no router, no all-to-all - replayed from a CUDA graph, for 16 published MoE shapes at 27
token counts. This script keeps the rows moesim can rebuild exactly:

- ``vllm_unquantizedfusedmoe_triton_tritonexperts`` (bf16) and ``vllm_fp8moe_triton_tritonexperts`` with
  ``fp8_block`` weights (DeepSeek-V3's 128x128 block-scaled FP8);
- ``distribution == balanced``: the collector's deterministic routing (``collector/helper.py``
  ``balanced_logits``: token t picks experts ``(t + j * ceil(E / k)) % E``, j < k; with fewer tokens than
  ``ceil(E / k)``, ``floor((t * ceil(E / k) / T + j * ceil(E / k)) % E)``), rebuilt here into each expert's rows;
  the power-law rows draw unseeded random loads and are left out;
- ``moe_tp_size == moe_ep_size == 1``: with an expert map (EP > 1) vLLM's kernels also write zeros for every
  non-local pick, a path no EP stack with a dispatch runs;
- rows whose touched experts' weights could not have been read from HBM in the time recorded (over 95% of the
  GPU's peak bandwidth; 63 of 891 rows on the H200, 61 of 864 on the H100): the timing cannot be a full weight
  read, so the row is not a measurement of the kernel moesim models.

Run (CPU only; pandas and pyarrow for the parquet files)::

    pip download aiconfigurator-core==0.12.0 --no-deps -d /tmp/aic
    python benchmarks/validation/aiconfigurator/extract.py /tmp/aic/aiconfigurator_core-0.12.0-*.whl

It writes ``vllm_fused_moe_h200.json`` and ``vllm_fused_moe_h100.json`` beside itself; ``moesim calibrate`` reads
them (the H200's is part of the shipped fit; the H100's is only predicted, by ``compare.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TABLE = "aiconfigurator_core/systems/data/{gpu}/moe/vllm/0.24.0/moe_perf.parquet"
KERNELS = {"vllm_unquantizedfusedmoe_triton_tritonexperts": ("bfloat16", "bf16", 2.0),
           "vllm_fp8moe_triton_tritonexperts": ("fp8_block", "fp8", 1.0)}
GPUS = {"h200_sxm": ("h200", 4800e9), "h100_sxm": ("h100", 3350e9)}  # peak HBM bytes/s (datasheets)
MAX_SHARE = 0.95  # of peak HBM bandwidth: a row implying more did not read its weights


def balanced_rows(tokens: int, experts: int, top_k: int) -> np.ndarray:
    """Rows per expert of AIConfigurator's ``balanced_logits`` routing (see the module docstring)."""
    stride = math.ceil(experts / top_k)
    t = np.arange(tokens, dtype=float)[:, None]
    j = np.arange(top_k, dtype=float)[None, :]
    ids = (t + j * stride) % experts if tokens >= stride else np.floor((t * stride / tokens + j * stride) % experts)
    return np.bincount(ids.astype(np.int64).ravel(), minlength=experts)


def records(table, gpu: str) -> tuple[list[dict], int]:
    """The kept rows as ``moesim.bench.moe_table/1`` records, and how many were dropped as faster than HBM."""
    out, dropped = [], 0
    peak = GPUS[gpu][1]
    sel = table[(table.distribution == "balanced") & (table.moe_tp_size == 1) & (table.moe_ep_size == 1)]
    for kernel, (aic_dtype, dtype, weight_bytes) in KERNELS.items():
        rows_of = sel[(sel.kernel_source == kernel) & (sel.moe_dtype == aic_dtype)]
        for r in rows_of.sort_values(["hidden_size", "inter_size", "num_experts", "topk", "num_tokens"]).itertuples():
            E, k, T, d, f = (int(r.num_experts), int(r.topk), int(r.num_tokens), int(r.hidden_size),
                             int(r.inter_size))
            rows = balanced_rows(T, E, k)
            if (rows > 0).sum() * 3.0 * d * f * weight_bytes / (float(r.latency) * 1e-3) > MAX_SHARE * peak:
                dropped += 1
                continue
            out.append({"shape": f"d{d}-f{f}-e{E}-k{k}", "pipeline": "fused", "dtype": dtype, "routing": "balanced",
                        "ep": 1, "num_experts": E, "top_k": k, "d_model": d, "d_ff": f, "local_experts": E,
                        "tokens": T, "send_rows": T * k, "rows_per_expert": rows.tolist(),
                        "layer_us": round(float(r.latency) * 1e3, 3), "kernel_source": kernel})
    return out, dropped


SGLANG = "aiconfigurator_core/systems/data/{gpu}/moe/sglang/0.5.10/wideep_{phase}_moe_perf.parquet"


def sglang_records(context, generation, gpu: str) -> tuple[list[dict], int]:
    """SGLang 0.5.10's DeepEP MoE compute (``collector/sglang/collect_wideep_deepep_moe.py``, DeepSeek-V3's shape,
    block-FP8 DeepGEMM), uniform routing, as that collector lays out one rank's rows:

    - ``context`` (after DeepEP's normal dispatch): ``run_moe_core`` timed eagerly with CUDA events while a profiler
      records stacks: the rows copied into DeepGEMM's contiguous layout, the two grouped GEMMs, the activation and
      the weighted gather back into the received tokens' rows; the rank has received all T tokens logged, and each
      of its 256/EP local experts gets ``int(T x 8 / 256)`` rows;
    - ``generation`` (after the low-latency dispatch): the masked grouped GEMMs and activation replayed from a CUDA
      graph; each local expert gets ``int(T / EP x 8) x EP // 256`` rows, or when that is 0 the first
      ``T / EP x 8 x EP // 2`` experts get one (the collector ran two GPUs).

    Rows whose local experts' weights could not have been read from HBM in the time recorded are dropped, as for
    vLLM's table (the small-T rows at EP 2 and 4: the collector's dummy weights were evidently not all read).
    """
    out, dropped = [], 0
    for phase, table in (("context", context), ("generation", generation)):
        sel = table[table.distribution == "uniform"].sort_values(["moe_ep_size", "num_tokens"])
        for r in sel.itertuples():
            T, ep = int(r.num_tokens), int(r.moe_ep_size)
            local, per_rank = 256 // ep, T // ep
            if phase == "context":
                rows = np.full(local, T * 8 // 256)
            else:
                base = per_rank * 8 * ep // 256
                rows = np.full(local, base) if base else (np.arange(local) < per_rank * 8 * ep // 2).astype(int)
            if rows.sum() == 0:
                continue
            if (rows > 0).sum() * 3.0 * 7168 * 2048 / (float(r.latency) * 1e-3) > MAX_SHARE * GPUS[gpu][1]:
                dropped += 1
                continue
            context_ = phase == "context"
            out.append({"shape": "deepseek-v3", "pipeline": "deepgemm", "dtype": "fp8", "routing": "uniform", "ep": ep,
                        "num_experts": 256, "top_k": 8, "d_model": 7168, "d_ff": 2048, "local_experts": local,
                        "tokens": T if context_ else per_rank, "send_rows": int(rows.sum()),
                        "rows_per_expert": rows.tolist(),
                        "layer_us": round(float(r.latency) * 1e3, 3),
                        "launch": "eager" if phase == "context" else "cuda_graph",
                        "covers": ["align", "gemm_gate_up", "activation", "gemm_down", "reduce"] if context_ else
                        ["gemm_gate_up", "activation", "gemm_down"], "expert_major": not context_,
                        "harness": f"sglang-deepep-{phase}" if phase == "context" else "",
                        "kernel_source": f"sglang 0.5.10 deepepmoe, moe_{phase}"})
    return out, dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel", help="aiconfigurator_core-0.12.0-*.whl (pip download aiconfigurator-core==0.12.0)")
    p.add_argument("--out", default=str(HERE), help="folder to write the two JSON files into (default: here)")
    args = p.parse_args(argv)
    import pandas as pd  # only this script needs them

    with zipfile.ZipFile(args.wheel) as wheel:
        for gpu, (short, _) in GPUS.items():
            table = pd.read_parquet(io.BytesIO(wheel.read(TABLE.format(gpu=gpu))))
            recs, dropped = records(table, gpu)
            doc = {"format": "moesim.bench.moe_table/1", "device": str(table.device.iloc[0]),
                   "source": {"package": "aiconfigurator-core 0.12.0 (PyPI), github ai-dynamo/aiconfigurator",
                              "license": "Apache-2.0, Copyright (c) 2025-2026 NVIDIA CORPORATION & AFFILIATES",
                              "table": TABLE.format(gpu=gpu), "collector": "collector/vllm/collect_moe.py",
                              "timing": "vLLM fused_experts replayed from a CUDA graph (no router, no all-to-all)",
                              "kept": "balanced routing, TP 1, EP 1, bf16 and fp8_block Triton kernels",
                              "dropped_faster_than_hbm": dropped},
                   "records": recs}
            path = Path(args.out) / f"vllm_fused_moe_{short}.json"
            path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
            print(f"{path}: {len(recs)} records ({dropped} faster than {MAX_SHARE:.0%} of peak HBM dropped)",
                  file=sys.stderr)
            ctx, gen = (pd.read_parquet(io.BytesIO(wheel.read(SGLANG.format(gpu=gpu, phase=ph))))
                        for ph in ("context", "generation"))
            recs, dropped = sglang_records(ctx, gen, gpu)
            doc = {"format": "moesim.bench.moe_table/1", "device": str(ctx.device.iloc[0]),
                   "source": {**doc["source"], "table": SGLANG.format(gpu=gpu, phase="{context,generation}"),
                              "collector": "collector/sglang/collect_wideep_deepep_moe.py",
                              "timing": "SGLang DeepEPMoE.run_moe_core (DeepGEMM FP8): context eager with events and "
                                        "a profiler, generation replayed from a CUDA graph",
                              "kept": "uniform routing", "dropped_faster_than_hbm": dropped},
                   "records": recs}
            path = Path(args.out) / f"sglang_deepep_moe_{short}.json"
            path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
            print(f"{path}: {len(recs)} records ({dropped} faster than HBM dropped)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
