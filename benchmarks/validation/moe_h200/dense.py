"""Plain (dense) GEMMs of real MoE models on one GPU, bf16 and fp8: shared experts, dense layers, attention
projections (MLA and GQA), timed as CUDA-graph replays and eagerly.

Each GEMM is ``y[T, n] = x[T, k] @ W[n, k]^T`` (``torch.nn.functional.linear``; fp8: ``torch._scaled_mm`` with
rowwise scales, fp32 scale per row of x and per row of W, bf16 out, fast accumulation), at T = 32 to 16384 rows.
Per point: the median over ``--reps`` launches of one CUDA graph holding the GEMM (``graph_us``), and of the
same GEMM launched eagerly (``eager_us``), each with the L2 flushed (256 MiB) and CUDA events around the launch
only. The SwiGLU activation ``silu(a) * b`` on [T, f] halves is timed the same way for every MLP width.

    python benchmarks/validation/moe_h200/dense.py --out $OUT     # ~1 min on an H200

Writes ``dense_h200.json`` (format ``moesim.bench.dense/1``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from graphs import Timer, capture, Keep  # noqa: E402

TOKENS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# (name, k, n); figures from each model's Hugging Face config.json
GEMMS = (
    # deepseek-ai/DeepSeek-V3: hidden 7168, shared expert moe_intermediate_size 2048 (n_shared_experts 1),
    # dense layers intermediate_size 18432; MLA q_lora_rank 1536, kv_lora_rank 512, qk_rope_head_dim 64,
    # qk_nope_head_dim 128, v_head_dim 128, 128 heads
    ("dsv3.shared_gate_up", 7168, 4096), ("dsv3.shared_down", 2048, 7168),
    ("dsv3.dense_gate_up", 7168, 36864), ("dsv3.dense_down", 18432, 7168),
    ("dsv3.q_a", 7168, 1536), ("dsv3.q_b", 1536, 128 * 192), ("dsv3.kv_a", 7168, 512 + 64),
    ("dsv3.kv_b", 512, 128 * 256), ("dsv3.o", 128 * 128, 7168),
    # meta-llama/Llama-4-Maverick-17B-128E: hidden 5120, shared expert intermediate_size 8192,
    # dense layers intermediate_size_mlp 16384
    ("llama4.shared_gate_up", 5120, 16384), ("llama4.shared_down", 8192, 5120),
    # Qwen/Qwen3-235B-A22B: hidden 4096, 64 query heads, 4 KV heads, head_dim 128 (QKV fused, O)
    ("qwen3-235b.qkv", 4096, (64 + 2 * 4) * 128), ("qwen3-235b.o", 64 * 128, 4096),
)
ACTIVATIONS = (("dsv3.shared", 2048), ("dsv3.dense", 18432), ("llama4.shared", 8192))


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12) / 448.0
    return (x / scale).to(torch.float8_e4m3fn), scale


def gemm_fn(T: int, k: int, n: int, dtype: str):
    x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    if dtype == "bf16":
        return lambda st: setattr(st, "y", F.linear(x, w))
    xq, xs = fp8_rows(x)
    wq, ws = fp8_rows(w)
    wt, wst = wq.t(), ws.t().contiguous()
    return lambda st: setattr(st, "y", torch._scaled_mm(xq, wt, xs, wst, out_dtype=torch.bfloat16,
                                                        use_fast_accum=True))


def act_fn(T: int, f: int):
    h = torch.randn(T, 2 * f, device="cuda", dtype=torch.bfloat16)

    def fn(st: Keep) -> None:
        a, b = h.chunk(2, dim=-1)
        st.y = F.silu(a) * b

    return fn


def measure(fn, timer: Timer) -> dict:
    fn(Keep())
    torch.cuda.synchronize()
    g = capture(fn, Keep())
    out = {"eager_us": round(timer.us(lambda: fn(Keep())), 2)}
    if g is not None:
        out["graph_us"] = round(timer.us(g.replay), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    timer = Timer(a.reps)
    floor_state = torch.zeros(1, device="cuda")
    floor = capture(lambda st: floor_state.add_(1), Keep())
    assert floor is not None
    doc = {"format": "moesim.bench.dense/1", "device": torch.cuda.get_device_name(),
           "sms": torch.cuda.get_device_properties(0).multi_processor_count, "torch": torch.__version__,
           "reps": a.reps, "graph_floor_us": round(timer.us(floor.replay), 2), "method": __doc__, "records": []}
    start = time.time()
    for name, k, n in GEMMS:
        for dtype in ("bf16", "fp8"):
            for T in TOKENS:
                rec = {"kind": "gemm", "name": name, "dtype": dtype, "tokens": T, "k": k, "n": n}
                try:
                    rec.update(measure(gemm_fn(T, k, n, dtype), timer))
                except Exception as e:  # noqa: BLE001 - record the failure and go on
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                doc["records"].append(rec)
                torch.cuda.empty_cache()
        print(f"[{time.time() - start:.0f}s] {name}: " + " ".join(
            f"{r['dtype']}:{r['tokens']}={r.get('graph_us')}/{r.get('eager_us')}" for r in doc["records"]
            if r.get("name") == name and r["tokens"] in (32, 2048, 16384)), flush=True)
    for name, f in ACTIVATIONS:
        for T in TOKENS:
            doc["records"].append({"kind": "activation", "name": name, "dtype": "bf16", "tokens": T, "f": f,
                                   **measure(act_fn(T, f), timer)})
    out = Path(a.out) / "dense_h200.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out} ({len(doc['records'])} records, {time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
