"""How fast and how lean are the trace tools? Import + statistics of 10 million routing entries, and a
1-million-token DeepSeek-V3-shaped trace generated, stored and replayed through the engine.

    python benchmarks/bench_traces.py [--part all|import|big] [--tokens 1000000] [--workdir DIR]

Part ``import``: about 10 million (token, layer, choice) entries - 64,103 tokens x 26 layers x top-6
(DeepSeek-V2-Lite's shape, drawn from the shipped fitted parameters) - written as the per-layer CSV layout
of the DeepSeek-V2-Lite logs (250 files), as JSONL per-token records and as one raw .npy array; each is
imported (``import_trace``), then ``trace_stats`` runs on the result. Wall seconds of each step are printed.

Part ``big``: 1,000,000 tokens x 58 MoE layers x top-8 of 256 experts (DeepSeek-V3's shape, about 0.93 GB
of int16 ids) from the plain synthetic generator, written block by block to an uncompressed .npz
(``save_trace_blocks``), memory-mapped back (``load_trace(mmap=True)``, validation included), planned
(greedy, on counts accumulated block by block) and replayed through ``Simulation.run`` on 2 x 8 H200
(2048 tokens per GPU per batch: 31 batches of 32,768 tokens, 1,015,808 tokens in all). Generation+storing and
loading+replay each run in a fresh child process, and each prints the child's peak resident memory (``VmHWM``,
mapped file pages included) next to the 2 GB budget. Wall times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIG_LAYERS, BIG_EXPERTS, BIG_TOP_K = 58, 256, 8
GPUS_PER_NODE, NODES, TOKENS_PER_GPU = 8, 2, 2048


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM). Not ``ru_maxrss``: that survives exec, so a child
    started from a parent that already held a lot (the import part) would report the parent's memory."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def part_import(workdir: Path) -> None:
    from moesim.traces.fitted_generator import generate_fitted, load_params
    from moesim.traces.readers import import_trace
    from moesim.traces.stats import trace_stats

    params = load_params("deepseek-v2-lite")
    tokens = 64103
    trace = generate_fitted(params, num_gpus=1, tokens_per_gpu=tokens, batches=1, rng=np.random.default_rng(0),
                            weights=False)
    ex = trace.experts
    entries = ex.size
    print(f"import: {tokens} tokens x {ex.shape[1]} layers x top-{ex.shape[2]} = {entries / 1e6:.2f} M entries")
    # Writing the inputs is setup, not timed. CSV: 250 requests, rows grouped by layer then token.
    bounds = np.linspace(0, tokens, 251).astype(int)
    csv_files = []
    for r in range(250):
        a, b = bounds[r], bounds[r + 1]
        path = workdir / f"prompt_{r:03d}.csv.gz"
        with gzip.open(path, "wt", newline="", compresslevel=1) as fh:
            w = csv.writer(fh)
            w.writerow(["Layer ID", "Batch Number", "Token", "Activated Expert IDs"])
            for l in range(ex.shape[1]):
                w.writerows([l + 1, 0, f"t{t}", "[" + ", ".join(map(str, ex[t, l])) + "]"] for t in range(a, b))
        csv_files.append(path)
    jsonl = workdir / "routing.jsonl"
    with open(jsonl, "w") as fh:
        for l in range(ex.shape[1]):
            fh.writelines(json.dumps({"layer": l, "token": int(t), "topk_ids": ex[t, l].tolist()}) + "\n"
                          for t in range(tokens))
    npy = workdir / "routing.npy"
    np.save(npy, ex)

    for label, files, kw in (("CSV (250 gz files)", csv_files, {}), ("JSONL (1.67 M lines)", [jsonl], {}),
                             ("numpy .npy", [npy], {})):
        t0, c0 = time.perf_counter(), time.process_time()
        res = import_trace(files, num_experts=64, num_gpus=8, tokens_per_gpu=4096, **kw)
        t1, c1 = time.perf_counter(), time.process_time()
        st = trace_stats(res.trace)
        t2, c2 = time.perf_counter(), time.process_time()
        assert res.trace.experts.size == entries and res.skipped == 0
        print(f"  {label:22s} import {t1 - t0:6.2f} s + stats {t2 - t1:5.2f} s = {t2 - t0:6.2f} s wall; CPU "
              f"{c1 - c0:.2f} + {c2 - c1:.2f} = {c2 - c0:.2f} s ({entries / (t2 - t0) / 1e6:.2f} M entries/s wall; "
              f"max/mean median {np.median(st.max_over_mean):.2f})")


def part_generate(path: Path, tokens: int) -> None:
    from moesim.traces.format import TraceMeta, save_trace_blocks
    from moesim.traces.synthetic import SyntheticParams, generate_trace

    G = GPUS_PER_NODE * NODES
    per_batch = G * TOKENS_PER_GPU
    batches = -(-tokens // per_batch)
    T = batches * per_batch
    params = SyntheticParams(zipf_alpha=0.6, affinity=0.5, affinity_fanout=8)

    def blocks():
        for b in range(batches):  # one batch per block; the same structure, fresh tokens
            tr = generate_trace(num_layers=BIG_LAYERS, num_experts=BIG_EXPERTS, top_k=BIG_TOP_K, num_gpus=G,
                                tokens_per_gpu=TOKENS_PER_GPU, batches=1, params=params,
                                rng=np.random.default_rng([7, b]), structure_rng=np.random.default_rng(7))
            yield tr.experts, None

    home = ((np.arange(T) % per_batch) // TOKENS_PER_GPU).astype(np.int32)
    batch = (np.arange(T) // per_batch).astype(np.int32)
    meta = TraceMeta(num_experts=BIG_EXPERTS, num_layers=BIG_LAYERS, top_k=BIG_TOP_K, model="deepseek-v3-shape",
                     source="bench_traces")
    t0 = time.perf_counter()
    save_trace_blocks(path, meta, blocks(), num_tokens=T, home=home, batch=batch)
    wall = time.perf_counter() - t0
    print(f"  generated + stored {T} tokens x {BIG_LAYERS} x top-{BIG_TOP_K} ({path.stat().st_size / 1e9:.2f} GB) "
          f"in {wall:.1f} s; peak RSS {peak_rss_mb():.0f} MB")


def part_replay(path: Path) -> None:
    from moesim.hardware import ClusterSpec, build_topology, deep_merge, preset
    from moesim.placement import PlacementProblem, make_placement
    from moesim.sim import EngineOptions, Simulation
    from moesim.traces.format import load_trace
    from moesim.traces.model import ModelSpec
    from moesim.traces.stats import expert_counts

    t0 = time.perf_counter()
    trace = load_trace(path, mmap=True)
    t1 = time.perf_counter()
    assert isinstance(trace.experts, np.memmap)
    G = GPUS_PER_NODE * NODES
    load = expert_counts(trace).astype(float)
    t2 = time.perf_counter()
    problem = PlacementProblem(num_layers=BIG_LAYERS, num_experts=BIG_EXPERTS, num_ranks=G, gpus_per_node=GPUS_PER_NODE,
                               slots_per_gpu=BIG_EXPERTS // G, load=load, seed=0)
    placement = make_placement("greedy", problem)
    spec = ClusterSpec(**deep_merge(preset("hgx-h200"), {"nodes": NODES}))
    model = ModelSpec(name="deepseek-v3-shape", num_layers=BIG_LAYERS, num_experts=BIG_EXPERTS, top_k=BIG_TOP_K,
                      d_model=7168, d_ff=2048)
    sim = Simulation(build_topology(spec), model, options=EngineOptions())
    layout = trace.layout(G, None)
    t3 = time.perf_counter()
    rec = sim.run(trace, layout, placement, keep_collectives=False)
    t4 = time.perf_counter()
    per_batch = (rec.batch_end - rec.batch_start).mean() * 1e3
    print(f"  memory-mapped load + validation {t1 - t0:.1f} s, expert counts {t2 - t1:.1f} s, replay of "
          f"{layout.num_batches} batches x {BIG_LAYERS} layers on {G} GPUs {t4 - t3:.1f} s "
          f"({per_batch:.2f} simulated ms per batch); peak RSS {peak_rss_mb():.0f} MB")


def child(part: str, *args: str) -> float:
    """Run ``part`` in a fresh interpreter, echo what it prints, and return the peak RSS in MB it reports."""
    out = subprocess.run([sys.executable, __file__, "--child", part, *args], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    print(out, end="", flush=True)
    return max(float(m) for m in re.findall(r"peak RSS (\d+) MB", out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "import", "big"], default="all")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--workdir", help="folder for the inputs and the big trace (default: a temporary one)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "generate":
            part_generate(Path(rest[0]), int(rest[1]))
        elif what == "replay":
            part_replay(Path(rest[0]))
        return
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.part in ("all", "import"):
            t0 = time.perf_counter()
            part_import(work)
            print(f"  (part wall {time.perf_counter() - t0:.0f} s, setup included)")
        if args.part in ("all", "big"):
            path = work / "big.npz"
            print(f"big: {args.tokens} tokens x {BIG_LAYERS} layers x top-{BIG_TOP_K} of {BIG_EXPERTS} experts")
            rss = max(child("generate", str(path), str(args.tokens)), child("replay", str(path)))
            print(f"  peak RSS of the two steps: {rss:.0f} MB (budget 2048 MB)")


if __name__ == "__main__":
    main()
