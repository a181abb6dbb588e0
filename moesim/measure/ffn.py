"""Expert-FFN timings on one GPU: SwiGLU experts of common MoE shapes over token counts, and several
experts with uneven loads run one after another (what one GPU runs in an expert-parallel layer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from moesim.measure.timing import median_ms
from moesim.fileio import atomic_write

SHAPES = {  # name: (d_model, d_ff)
    "mixtral-8x7b": (4096, 14336),
    "deepseek-v3": (7168, 2048),
    "qwen3-30b-a3b": (2048, 768),
    "olmoe-1b-7b": (2048, 1024),
    "gpt-oss-120b": (2880, 2880),
}


def ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    g, u = (x @ w1).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u) @ w2


def _ceilings(dev: torch.device, dtype: torch.dtype, cpu: bool) -> dict[str, float]:
    """8192^3 matmul TFLOP/s in ``dtype`` and 2 GiB device copy GB/s (read + write counted)."""
    n = 256 if cpu else 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn_like(a)
    tflops = 2 * n**3 / median_ms(lambda: a @ b, cpu)[0] / 1e9
    size = 2**20 if cpu else 2**31
    src = torch.empty(size, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return {"bf16_tflops_8k": tflops, "copy_GBps_rw": 2 * size / median_ms(lambda: dst.copy_(src), cpu)[0] / 1e6}


def run(out: str | Path, *, cpu: bool = False, shapes: dict[str, tuple[int, int]] | None = None) -> Path:
    dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    dtype = torch.float32 if cpu else torch.bfloat16  # bf16 matmuls crawl on most CPUs
    torch.manual_seed(0)
    shapes = shapes or ({k: (d // 16, f // 16) for k, (d, f) in SHAPES.items()} if cpu else SHAPES)
    res: dict = {"device": "cpu" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "single": {}, "multi": []}
    res.update(_ceilings(dev, dtype, cpu))  # its buffers are freed before the sweep
    counts = [1, 64] if cpu else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    for name, (d, f) in shapes.items():
        w1 = torch.randn(d, 2 * f, device=dev, dtype=dtype) * 0.02
        w2 = torch.randn(f, d, device=dev, dtype=dtype) * 0.02
        rows = []
        for t in counts:
            x = torch.randn(t, d, device=dev, dtype=dtype)
            rows.append([t, median_ms(lambda: ffn(x, w1, w2), cpu)[0]])
        res["single"][name] = {"d_model": d, "d_ff": f, "rows": rows}
    name = next(iter(shapes))
    d, f = shapes[name]
    weights = [(torch.randn(d, 2 * f, device=dev, dtype=dtype) * 0.02,
                torch.randn(f, d, device=dev, dtype=dtype) * 0.02) for _ in range(4)]
    rng = random.Random(3)
    for _ in range(12):
        loads = [rng.choice([0, 16, 128, 512, 1024, 2048, 4096]) // (64 if cpu else 1) for _ in range(4)]
        xs = [torch.randn(max(n_, 1), d, device=dev, dtype=dtype)[:n_] for n_ in loads]

        def layer() -> None:
            for (w1, w2), x in zip(weights, xs):
                if x.shape[0]:
                    ffn(x, w1, w2)

        res["multi"].append({"shape": name, "loads": loads, "ms": median_ms(layer, cpu)[0]})
    text = json.dumps(res, indent=1)
    return atomic_write(Path(out) / "expert_ffn.json", lambda fh: fh.write(text))
