"""Training-side timings (``moesim bench train``): the routed experts' grouped GEMMs forward and backward on one
GPU, and the all-gather and reduce-scatter collectives of data parallelism and FSSDP among the GPUs of one host.

GEMMs (one GPU): per expert shape (d_model, d_ff, experts, top_k), local-expert count and token count, the rows
spread evenly over the local experts (``T x k x local / E`` in all, at least one per expert), bf16. Forward: gate-up
``[r, d] x [d, 2f]`` and down ``[r, f] x [f, d]`` with ``torch._grouped_mm``; backward: autograd through each
(its data-gradient and weight-gradient GEMMs), one ``torch.autograd.grad`` call. Each timed with CUDA events,
median of ``reps`` after ``warmup``, L2 flushed (256 MiB) before each. The activation between the two GEMMs is
left out: the records are the GEMMs alone (``fwd_gate_up_ms``, ``fwd_down_ms``, ``bwd_gate_up_ms``,
``bwd_down_ms``). ``cpu``: tiny shapes in float32, a per-expert loop of ``torch.mm`` forward and backward (checks
the plumbing, not the numbers).

Collectives (``nproc`` >= 2 ranks, spawned here; NCCL, gloo with ``cpu``): ``all_gather_into_tensor`` and
``reduce_scatter_tensor`` (sum) of 1 KiB to 1 GiB per rank (bf16), each rank's median after a barrier, the
maximum over ranks recorded. One rank records none, and the method says so.

Standalone (torch only, no moesim dependency): ``benchmarks/validation/train_h200/measure.py`` runs it on a bare
GPU machine.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FORMAT = "moesim.bench.train/1"
SHAPES = {  # d_model, d_ff, experts, top_k (each model's config.json)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3": (7168, 2048, 256, 8),
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
CPU_SHAPES = {"tiny": (64, 32, 8, 2)}
TOKENS = (512, 2048, 8192, 16384)
METHOD = (__doc__ or "").strip()


def _local_counts(experts: int) -> list[int]:
    """Local experts per GPU: EP of 1/8 and 1/32 of the experts (and 2), as expert parallelism slices them."""
    return sorted({min(experts, 2), max(experts // 8, 1), max(experts // 32, 1)})


def _time_ms(fn: Callable[[], object], flush: torch.Tensor | None, warmup: int, reps: int, cpu: bool) -> float:
    out = []
    for i in range(warmup + reps):
        if cpu:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
            continue
        assert flush is not None
        flush.bitwise_not_()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out[warmup:])


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, cpu: bool) -> torch.Tensor:
    """``x[rows of e] @ w[e]`` for each expert e (``w`` [E, k, n]); a loop of mm on the CPU."""
    if not cpu:
        return torch._grouped_mm(x, w, offs=offs)
    bounds = [0, *offs.tolist()]
    return torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])])


def gemm_point(d: int, f: int, local: int, per: int, *, cpu: bool, warmup: int, reps: int,
               flush: torch.Tensor | None) -> dict[str, Any]:
    """One record: forward and backward of the gate-up and down grouped GEMMs, ``per`` rows for each of ``local``
    experts."""
    dev = torch.device("cpu") if cpu else torch.device("cuda")
    dt = torch.float32 if cpu else torch.bfloat16
    offs = torch.arange(1, local + 1, device=dev, dtype=torch.int32) * per
    rows = per * local
    x = torch.randn(rows, d, device=dev, dtype=dt, requires_grad=True)
    h = torch.randn(rows, f, device=dev, dtype=dt, requires_grad=True)
    w13 = (torch.randn(local, 2 * f, d, device=dev, dtype=dt) * 0.02).requires_grad_()
    w2 = (torch.randn(local, d, f, device=dev, dtype=dt) * 0.02).requires_grad_()

    def up() -> torch.Tensor:
        return _grouped(x, w13.transpose(-2, -1), offs, cpu)

    def down() -> torch.Tensor:
        return _grouped(h, w2.transpose(-2, -1), offs, cpu)

    rec: dict[str, Any] = {"local_experts": local, "rows": rows, "rows_per_expert": per}
    with torch.no_grad():
        rec["fwd_gate_up_ms"] = _time_ms(up, flush, warmup, reps, cpu)
        rec["fwd_down_ms"] = _time_ms(down, flush, warmup, reps, cpu)
    y_up, y_down = up(), down()
    g_up, g_down = torch.randn_like(y_up), torch.randn_like(y_down)
    rec["bwd_gate_up_ms"] = _time_ms(lambda: torch.autograd.grad(y_up, (x, w13), g_up, retain_graph=True), flush,
                                     warmup, reps, cpu)
    rec["bwd_down_ms"] = _time_ms(lambda: torch.autograd.grad(y_down, (h, w2), g_down, retain_graph=True), flush,
                                  warmup, reps, cpu)
    return rec


def gemm_sweep(shapes: dict[str, tuple[int, int, int, int]], tokens: tuple[int, ...], *, cpu: bool, warmup: int,
               reps: int, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every (shape, local experts, tokens) point of the GEMM sweep, one record each."""
    flush = None if cpu else torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    records = []
    for name, (d, f, experts, k) in shapes.items():
        for local in _local_counts(experts):
            for T in tokens:
                per = max(T * k // experts, 1)
                rec = {"shape": name, "d_model": d, "d_ff": f, "num_experts": experts, "top_k": k, "tokens": T,
                       **gemm_point(d, f, local, per, cpu=cpu, warmup=warmup, reps=reps, flush=flush)}
                records.append(rec)
                if log is not None:
                    log(f"{name} E={local} rows={rec['rows']}: fwd {rec['fwd_gate_up_ms']:.3f}+{rec['fwd_down_ms']:.3f}"
                        f" bwd {rec['bwd_gate_up_ms']:.3f}+{rec['bwd_down_ms']:.3f} ms")
    return records


def _collective_worker(rank: int, world: int, port: int, cpu: bool, sizes: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world)
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(rank)
    records = []
    for op in ("all_gather", "reduce_scatter"):
        for b in sizes:
            shard = torch.randn(max(b // 2, 1), device=dev, dtype=torch.float32 if cpu else torch.bfloat16)
            full = torch.empty(shard.numel() * world, device=dev, dtype=shard.dtype)
            if op == "all_gather":
                def fn() -> None:
                    dist.all_gather_into_tensor(full, shard)
            else:  # reduce_scatter_single in newer torch, reduce_scatter_tensor (deprecated there) before
                scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

                def fn() -> None:
                    scatter(shard, full)
            times = []
            for i in range(2 + (3 if cpu else 10)):
                dist.barrier()
                if not cpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if not cpu:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            med = torch.tensor([statistics.median(times[2:])], device=dev, dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            records.append({"op": op, "bytes_per_rank": b, "ranks": world, "ms_median_max_over_ranks": float(med)})
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def collectives(nproc: int, *, cpu: bool, tmp: Path) -> list[dict[str, Any]]:
    """All-gather and reduce-scatter among ``nproc`` spawned ranks (see the module docstring)."""
    sizes = [2**e for e in (range(10, 17, 3) if cpu else range(10, 31, 2))]
    out = tmp / ".collectives.json"
    mp.spawn(_collective_worker, args=(nproc, _free_port(), cpu, sizes, str(out)), nprocs=nproc, join=True)
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def run(out: str | Path, *, nproc: int = 1, cpu: bool = False, quick: bool = False,
        shapes: dict[str, tuple[int, int, int, int]] | None = None, warmup: int | None = None,
        reps: int | None = None, log: Callable[[str], None] | None = print) -> Path:
    """Measure and write ``out/train.json`` (format ``moesim.bench.train/1``); return its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if shapes is None:
        shapes = CPU_SHAPES if cpu else dict(list(SHAPES.items())[1:3]) if quick else SHAPES
    tokens = (64, 256) if cpu else (2048, 8192) if quick else TOKENS
    warmup = warmup if warmup is not None else (1 if cpu else 3)
    reps = reps if reps is not None else (2 if cpu else 10)
    gemms = gemm_sweep(shapes, tokens, cpu=cpu, warmup=warmup, reps=reps, log=log)
    colls = collectives(nproc, cpu=cpu, tmp=folder) if nproc > 1 else []
    device = "cpu (plumbing dry run)" if cpu else torch.cuda.get_device_name()
    note = "" if nproc > 1 else " Collectives: none (one rank; they need nproc >= 2)."
    doc = {"format": FORMAT, "device": device, "torch": torch.__version__, "world_size": nproc,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": METHOD + note, "warmup": warmup, "reps": reps, "gemms": gemms, "collectives": colls}
    path = folder / "train.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path
