"""Measure multi-layer MoE blocks on one GPU with real routing: the torch_reference pipeline of ``moesim bench
moe``, layer after layer, each layer routing its tokens as a real trace says.

    python benchmarks/validation/moe_h200/block.py --ids IDS.npy --out DIR     # writes DIR/block_h200.json

``IDS.npy`` is an int array [tokens, layers, top_k] of expert ids (-1 = none), e.g. the DeepSeek-V2-Lite
prefill traces of ../shared/traces imported with ``moesim trace import`` and saved with numpy (they carry no
licence: the ids are not committed, only the timings). For each token count T the block runs the first T
tokens of the trace through every layer (one GPU, EP1: all 64 experts local; NCCL with one rank, so the
all-to-alls are the same calls the N-GPU layer makes), the output of one layer the input of the next; one
weight set serves every layer (1.1 GB per layer, far larger than L2, so every layer still reads its weights
from HBM). Timed as one region with CUDA events, L2 flushed before every repetition, median of ``--reps``
after ``--warmup``. Norms, attention, shared experts and the dense first layer are not run: the block is the
routed experts' part of the model's MoE layers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
if "moesim" not in sys.modules:  # bare GPU machine: load moesim.measure without the package's dependencies
    _pkg = types.ModuleType("moesim")
    _pkg.__path__ = [str(HERE.parents[2] / "moesim")]
    sys.modules["moesim"] = _pkg

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.measure import moe  # noqa: E402

SHAPE = {"d_model": 2048, "d_ff": 1408, "num_experts": 64, "top_k": 6}  # DeepSeek-V2-Lite routed experts


def plans(ids: np.ndarray, T: int, dev: torch.device) -> list[moe.Plan]:
    """One plan per layer: the first T tokens, their real expert ids, all experts local."""
    d, f, E, k = SHAPE["d_model"], SHAPE["d_ff"], SHAPE["num_experts"], SHAPE["top_k"]
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    out = []
    for layer in range(ids.shape[1]):
        lid = torch.as_tensor(ids[:T, layer, :].astype(np.int64), device=dev)
        rows = torch.bincount(lid.reshape(-1), minlength=E).tolist()
        out.append(moe.Plan(T, d, f, E, k, 1, E, 0, False, x, lid, rows, torch.arange(E, device=dev)))
    return out


def run_block(ps: list[moe.Plan], w: moe.Weights, comm: moe.Comm, x: torch.Tensor) -> torch.Tensor:
    for p in ps:
        x = moe.run_layer(moe.reference_steps(p, w, "bf16", comm), x).out
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--tokens", default="128,512,2048,8192")
    ap.add_argument("--layers", default="4,26")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    ids = np.load(a.ids)
    dev = torch.device("cuda", 0)
    comm, _, note = moe.open_group(False)
    w = moe.make_weights("deepseek-v2-lite", SHAPE, dev, torch.bfloat16)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    records = []
    for T in (int(t) for t in a.tokens.split(",")):
        for L in (int(n) for n in a.layers.split(",")):
            ps = plans(ids[:, :L], T, dev)
            x = ps[0].x
            times = []
            for i in range(a.warmup + a.reps):
                flush.bitwise_not_()
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run_block(ps, w, comm, x)
                e.record()
                e.synchronize()
                if i >= a.warmup:
                    times.append(s.elapsed_time(e))
            rec = {"tokens": T, "layers": L, "ms": statistics.median(times), "min_ms": min(times),
                   "max_ms": max(times), "reps": a.reps}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    doc = {"format": "moesim.bench.moe_block/1", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "shape": SHAPE,
           "trace": "DeepSeek-V2-Lite prefill routing (../shared/traces/deepseek-v2-lite-prefill, moesim trace "
                    "import, tokens in file order), MoE layers 1.. in order",
           "method": (__doc__ or "").strip() + note, "records": records}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "block_h200.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
