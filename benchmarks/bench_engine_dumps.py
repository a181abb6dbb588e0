"""How long `moesim trace import` takes on DeepSeek-V3-shaped engine dumps (61 decoder layers, the first 3 dense,
58 MoE layers of 256 experts, top-8, EP32), written as the engines write them into a temporary folder:

- SGLang `stat`: one `.pt`, logical_count int32 [1000 passes (the default buffer), 61, 256];
- SGLang `per_pass`: 32 rank files of 100 passes, global_physical_count [61, 288] (32 redundant slots);
- TensorRT-LLM statistics: meta_info.json + 32 rank files of 100 iterations x 58 layers bincounts [256];
- Megatron-LM router trace: 8 rank files of 4 steps x 58 layers x 512 tokens x top-8.

Run: `python benchmarks/bench_engine_dumps.py` (needs the `engines` extra). Prints seconds per read and the
result's shape. Loads are Zipf-skewed picks; the content does not change the time much.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from moesim.traces.readers.dumps import DumpOptions
from moesim.traces.readers.engines import read_dump

DECODER, DENSE, E, K, RANKS, P = 61, 3, 256, 8, 32, 288


def picks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Counts of ``n`` Zipf(1.1)-skewed picks over ``size`` experts."""
    p = 1.0 / np.arange(1, size + 1) ** 1.1
    return rng.multinomial(n, rng.permutation(p / p.sum()))


def sglang_stat(folder: Path, rng: np.random.Generator) -> Path:
    buf = np.zeros((1000, DECODER, E), dtype=np.int32)
    for lay in range(DENSE, DECODER):
        buf[:, lay] = np.stack([picks(rng, 4096 * K, E) for _ in range(1000)])
    path = folder / "expert_distribution_recorder_1.0.pt"
    torch.save({"rank": 0, "logical_count": torch.from_numpy(buf), "average_utilization_rate_over_window": None}, path)
    return path


def sglang_per_pass(folder: Path, rng: np.random.Generator) -> list[Path]:
    p2l = np.concatenate([np.tile(np.arange(E), (DECODER, 1)), rng.integers(0, E, (DECODER, P - E))], axis=1)
    paths = []
    for r in range(RANKS):
        records = []
        for f in range(100):
            count = np.zeros((DECODER, P), dtype=np.int32)
            count[DENSE:] = np.stack([picks(rng, 128 * K, P) for _ in range(DECODER - DENSE)])
            records.append({"forward_pass_id": f, "rank": r, "gatherer_key": "primary",
                            "global_physical_count": torch.from_numpy(count)})
        path = folder / f"expert_distribution_recorder_2.0_{r}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, path)
        paths.append(path)
    return paths


def trtllm(folder: Path, rng: np.random.Generator) -> Path:
    out = folder / "trtllm"
    out.mkdir()
    (out / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": K}))
    for r in range(RANKS):
        tensors = {f"{it}_{lay}": torch.from_numpy(picks(rng, 128 * K, E).astype(np.int64))
                   for it in range(100) for lay in range(DENSE, DECODER)}
        safetensors.torch.save_file(tensors, str(out / f"rank{r}.safetensors"))
    return out


def megatron(folder: Path, rng: np.random.Generator) -> list[Path]:
    paths = []
    for r in range(8):
        lines = []
        for step in range(4):
            for lay in range(DENSE, DECODER):
                ids = np.argsort(rng.random((512, E)), axis=1)[:, :K]
                lines.append(json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": lay,
                                         "rank": r, "num_tokens": 512, "topk": K, "top_indices": ids.tolist()}))
        path = folder / f"router_trace_rank{r}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [("sglang-stat", [sglang_stat(folder, rng)], DumpOptions(top_k=K)),
                 ("sglang-per-pass", sglang_per_pass(folder, rng), DumpOptions(top_k=K)),
                 ("trtllm", [trtllm(folder, rng)], DumpOptions()),
                 ("megatron", megatron(folder, rng), DumpOptions(num_experts=E))]
        print(f"{'format':16s} {'files':>5s} {'MB':>7s} {'read s':>7s}  result")
        for fmt, paths, opts in cases:
            size = sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.iterdir()))
            t0 = time.perf_counter()
            dump = read_dump(paths, fmt, opts)
            took = time.perf_counter() - t0
            d = dump.data
            shape = (f"counts {d.loads.shape}" if hasattr(d, "loads") else
                     f"trace {d.num_tokens} tokens x {d.meta.num_layers} layers x top-{d.meta.top_k}")
            files = len(paths) if fmt != "trtllm" else RANKS
            print(f"{fmt:16s} {files:5d} {size / 1e6:7.1f} {took:7.2f}  {shape}")


if __name__ == "__main__":
    main()
