"""The MoE layer's kernels under CUDA graphs: what each step costs the GPU when no host launches it.

Serving engines replay decode steps as CUDA graphs (vLLM, SGLang, TensorRT-LLM), so a decode MoE layer pays its
kernels' GPU time, not eager PyTorch's host launches and syncs. This measures, on one GPU and for the same
shapes, routings and pipelines as ``measure.py`` (:mod:`moesim.measure.moe`), each step captured as its own CUDA
graph and the whole layer captured as one:

- ``steps_graph_us``: per step, the median over ``--reps`` replays of that step's graph alone (L2 flushed, then
  CUDA events around the replay); steps that cannot be captured (host syncs: torch_reference's permute, whose
  split sizes go to the host, and the NCCL all-to-alls) are left out and named in ``not_captured``;
- ``graph_floor_us``: the same timing of a graph holding one one-element kernel (what the replay itself costs);
- ``layer_graph_us``: the fused pipeline captured whole (router to reduce), replayed with the same timing;
- ``layer_eager_us``: the same pipeline run eagerly with the same timing (host launches included), for the
  same-run comparison.

    python benchmarks/validation/moe_h200/graphs.py --out $OUT            # ~3 min on an H200
    python benchmarks/validation/moe_h200/graphs.py --quick --out $OUT    # a handful of points

Writes ``moe_graphs_h200.json`` (format ``moesim.bench.moe_graphs/1``), rewritten after every point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: moesim without pip install
if "moesim" not in sys.modules:  # a bare GPU machine lacks moesim's own dependencies: skip the package __init__
    import types

    _pkg = types.ModuleType("moesim")
    _pkg.__path__ = [str(HERE.parents[2] / "moesim")]
    sys.modules["moesim"] = _pkg

import torch  # noqa: E402

from moesim.measure.moe.inputs import make_plan, make_weights  # noqa: E402
from moesim.measure.moe.pipeline import Comm, fused_steps, reference_steps  # noqa: E402
from moesim.measure.moe.points import SHAPES  # noqa: E402

TOKENS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_TOKENS = (32, 512)
HOST_SYNCED = {"permute", "dispatch", "combine"}  # split sizes to the host, NCCL calls: never captured


class Keep(SimpleNamespace):
    """A step state that keeps every tensor: a step's ``del`` would hand its memory to a later graph."""

    def __delattr__(self, name: str) -> None:
        pass


class Timer:
    """Median GPU time of one launch, L2 flushed before each (events around the launch only)."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
        self.ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(reps)]

    def us(self, fn) -> float:
        fn()
        torch.cuda.synchronize()
        for a, b in self.ev:
            self.flush.bitwise_not_()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        times = sorted(a.elapsed_time(b) * 1e3 for a, b in self.ev)
        return times[len(times) // 2]


def capture(fn, state: Keep) -> torch.cuda.CUDAGraph | None:
    """``fn(state)`` captured as a graph (None where the step syncs with the host or otherwise cannot be)."""
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn(state)
    except Exception:  # noqa: BLE001 - a capture error of any kind means "not capturable"
        torch.cuda.synchronize()
        return None
    return g


def run_point(name: str, sh: dict[str, int], w, pipeline: str, dtype: str, ep: int, routing: str, T: int,
              timer: Timer, comm: Comm) -> dict:
    plan = make_plan(name, sh, ep, routing, T, world=1, rank=0, dev=torch.device("cuda"), dtype=torch.bfloat16)
    steps = fused_steps(plan, w) if pipeline == "fused" else reference_steps(plan, w, dtype, comm)
    snaps, s = [], Keep(x=plan.x)
    for _, fn in steps:  # eager once: the state before every step (and Triton compiled)
        snaps.append(dict(vars(s)))
        fn(s)
    torch.cuda.synchronize()
    graphs, steps_us, missing = [], {}, []
    for (step, fn), snap in zip(steps, snaps):
        g = None if step in HOST_SYNCED else capture(fn, Keep(**snap))
        if g is None:
            missing.append(step)
            continue
        graphs.append(g)
        steps_us[step] = round(timer.us(g.replay), 2)
    rec = {"shape": name, "pipeline": pipeline, "dtype": dtype, "ep": ep, "routing": routing, "tokens": T,
           **sh, "local_experts": plan.L, "send_rows": T * plan.k, "rows_per_expert": plan.rows_per_expert,
           "rows": plan.rows, "steps_graph_us": steps_us, "not_captured": missing}
    if not missing:
        whole = capture(lambda st: [fn(st) for _, fn in steps], Keep(x=plan.x))
        if whole is not None:
            rec["layer_graph_us"] = round(timer.us(whole.replay), 2)
            graphs.append(whole)

        def eager() -> None:
            st = Keep(x=plan.x)
            for _, fn in steps:
                fn(st)

        rec["layer_eager_us"] = round(timer.us(eager), 2)
    del graphs, snaps, s
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return rec


def points(quick: bool) -> list[tuple[str, str, str, int, str, int]]:
    """(shape, pipeline, dtype, EP, routing, tokens): fused bf16 and torch_reference bf16 at every T (uniform;
    EP1, and the EP8 slice where the shape has 64 experts or more), fused at two T with Zipf routing, and
    torch_reference fp8 at three T (its quant steps)."""
    out = []
    for name, sh in SHAPES.items():
        if quick and name not in ("qwen3-30b-a3b", "deepseek-v3"):
            continue
        for T in QUICK_TOKENS if quick else TOKENS:
            out.append((name, "fused", "bf16", 1, "uniform", T))
            out.append((name, "torch_reference", "bf16", 1, "uniform", T))
            if sh["num_experts"] >= 64:
                out.append((name, "torch_reference", "bf16", 8, "uniform", T))
        for T in () if quick else (128, 2048):
            out.append((name, "fused", "bf16", 1, "zipf1.0", T))
        for T in () if quick else (128, 1024, 8192):
            out.append((name, "torch_reference", "fp8", 8 if sh["num_experts"] >= 64 else 1, "uniform", T))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=420.0)
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    import torch.distributed as dist

    dist.init_process_group("nccl", rank=0, world_size=1)
    comm = Comm(1, True)
    timer = Timer(a.reps)
    floor_state = torch.zeros(1, device="cuda")
    floor = capture(lambda st: floor_state.add_(1), Keep())
    assert floor is not None
    out = Path(a.out) / "moe_graphs_h200.json"
    doc = {"format": "moesim.bench.moe_graphs/1", "device": torch.cuda.get_device_name(),
           "sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "torch": torch.__version__, "reps": a.reps, "graph_floor_us": round(timer.us(floor.replay), 2),
           "method": __doc__, "records": []}
    start, pts = time.time(), points(a.quick)
    weights: dict[str, object] = {}
    for i, (name, pipeline, dtype, ep, routing, T) in enumerate(pts):
        if time.time() - start > a.max_seconds:
            print(f"stopping at the time limit: {len(pts) - i} points left", flush=True)
            break
        if name not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            weights[name] = make_weights(name, SHAPES[name], torch.device("cuda"), torch.bfloat16)
        try:
            rec = run_point(name, SHAPES[name], weights[name], pipeline, dtype, ep, routing, T, timer, comm)
        except Exception as e:  # noqa: BLE001 - record the failure and go on
            rec = {"shape": name, "pipeline": pipeline, "dtype": dtype, "ep": ep, "routing": routing, "tokens": T,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            torch.cuda.synchronize()
        doc["records"].append(rec)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)
        print(f"[{i + 1}/{len(pts)} {time.time() - start:.0f}s] {name} {pipeline} {dtype} ep{ep} {routing} T={T}: "
              f"graph {rec.get('layer_graph_us')} us eager {rec.get('layer_eager_us')} us "
              f"steps {rec.get('steps_graph_us')} missing {rec.get('not_captured')} {rec.get('error', '')}",
              flush=True)
    dist.destroy_process_group()
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
