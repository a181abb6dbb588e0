"""Forward and backward of the routed experts' grouped GEMMs on one GPU, as a training step runs them.

Standalone (torch only; no moesim import on the device): ``python gemm_fwd_bwd.py --out DIR [--quick]``
writes ``DIR/gemm_fwd_bwd.json``. Per point (expert shape, local experts, tokens): rows spread evenly over the
local experts (T x k / E each), bf16; the forward is ``torch._grouped_mm`` gate-up ``[r_e, d] x [d, 2f]`` and
down ``[r_e, f] x [f, d]``; the backward is autograd through both (a data-gradient and a weight-gradient
grouped GEMM each), timed as one ``torch.autograd.grad`` call with CUDA events, median of 10 after 3 warm-ups,
L2 flushed (256 MiB) before each. The activation between the GEMMs is excluded (the inputs of the down GEMM are
made directly), so the records are the GEMMs alone: ``fwd_gate_up_ms``, ``fwd_down_ms``, ``bwd_gate_up_ms``,
``bwd_down_ms``. ``compare.py`` sets them beside moesim's grouped-GEMM model and its 2x backward.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "deepseek-v3": (7168, 2048, 256, 8),
          "qwen3-30b-a3b": (2048, 768, 128, 8)}  # d_model, d_ff, experts, top_k (config.json)


def _time(fn, flush: torch.Tensor, reps: int = 10, warm: int = 3) -> float:
    out = []
    for i in range(warm + reps):
        flush.zero_()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= warm:
            out.append(a.elapsed_time(b))
    out.sort()
    return out[len(out) // 2]


def point(d: int, f: int, experts: int, rows: int, flush: torch.Tensor) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    per = max(rows // experts, 1)
    offs = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * per
    R = per * experts
    x = torch.randn(R, d, device=dev, dtype=dt, requires_grad=True)
    h = torch.randn(R, f, device=dev, dtype=dt, requires_grad=True)
    w13 = (torch.randn(experts, 2 * f, d, device=dev, dtype=dt) * 0.02).requires_grad_()
    w2 = (torch.randn(experts, d, f, device=dev, dtype=dt) * 0.02).requires_grad_()

    def up():
        return torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)

    def down():
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)

    with torch.no_grad():
        fwd_up = _time(up, flush)
        fwd_down = _time(down, flush)
    y_up, y_down = up(), down()
    g_up, g_down = torch.randn_like(y_up), torch.randn_like(y_down)
    try:
        bwd_up = _time(lambda: torch.autograd.grad(y_up, (x, w13), g_up, retain_graph=True), flush)
        bwd_down = _time(lambda: torch.autograd.grad(y_down, (h, w2), g_down, retain_graph=True), flush)
        how = "autograd"
    except RuntimeError:  # no derivative for _grouped_mm in this torch: the same two GEMMs by hand
        how = "manual"
        bounds = [0, *offs.tolist()]

        def manual(inp: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
            torch._grouped_mm(g, w, offs=offs)  # data gradient [R, in]
            for e in range(experts):  # weight gradient per expert
                torch.mm(g[bounds[e]:bounds[e + 1]].t(), inp[bounds[e]:bounds[e + 1]])

        with torch.no_grad():
            bwd_up = _time(lambda: manual(x, w13, g_up), flush)
            bwd_down = _time(lambda: manual(h, w2, g_down), flush)
    return {"backward": how, "d_model": d, "d_ff": f, "experts": experts, "rows": R, "rows_per_expert": per,
            "fwd_gate_up_ms": fwd_up, "fwd_down_ms": fwd_down, "bwd_gate_up_ms": bwd_up, "bwd_down_ms": bwd_down}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--max-seconds", type=float, default=200.0)
    args = p.parse_args()
    t0 = time.time()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    tokens = [512, 4096] if args.quick else [256, 1024, 4096, 8192, 16384]
    records, skipped = [], []
    for name, (d, f, E, k) in SHAPES.items():
        for local in sorted({min(E, 2), E // 8 or 1, E // 32 or 1, E // 64 or 1} if E > 8 else {2, 8}):
            for T in tokens:
                if time.time() - t0 > args.max_seconds:
                    skipped.append([name, local, T])
                    continue
                rec = {"shape": name, "tokens": T, "top_k": k, **point(d, f, local, T * k * local // E or 1, flush)}
                records.append(rec)
                print(f"{time.time() - t0:6.1f}s {name} E={local} rows={rec['rows']}: fwd {rec['fwd_gate_up_ms']:.3f}"
                      f"+{rec['fwd_down_ms']:.3f} bwd {rec['bwd_gate_up_ms']:.3f}+{rec['bwd_down_ms']:.3f} ms",
                      flush=True)
    out = {"format": "moesim.bench.gemm_fwd_bwd/1", "device": torch.cuda.get_device_name(),
           "sms": torch.cuda.get_device_properties(0).multi_processor_count, "torch": torch.__version__,
           "method": "benchmarks/validation/train_h200/gemm_fwd_bwd.py", "records": records, "skipped": skipped}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gemm_fwd_bwd.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(records)} points, {len(skipped)} skipped, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
