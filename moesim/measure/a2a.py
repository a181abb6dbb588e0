"""NCCL (or gloo) all-to-all and point-to-point timings among the GPUs of one host.

Uniform all-to-all over a size sweep, uneven (skewed) all-to-alls with seeded random byte matrices, and
one-way send/recv from rank 0 to rank 1. Every rank times each call with events after a barrier; the
JSON records each rank's median (the format of ../shared/calibration/a2a_2xh200.json).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moesim.measure.timing import median_ms
from moesim.fileio import atomic_write


def _worker(rank: int, world: int, out: str, cpu: bool, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world)
    if not cpu:
        torch.cuda.set_device(rank)
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank)
    res: dict[str, Any] = {"world": world, "device": "cpu" if cpu else torch.cuda.get_device_name(rank),
                           "torch": torch.__version__,
                           "nccl": "" if cpu else ".".join(map(str, torch.cuda.nccl.version())), "uniform": [],
                           "skew": [], "p2p": []}
    barrier = dist.barrier

    def gather_max(value: float) -> float:
        t = torch.tensor([value], device=dev, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    for exp in range(10, 16 if cpu else 31):
        b = 2**exp
        x = torch.randn(b // 2 * world, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        med, lo, hi = median_ms(lambda: dist.all_to_all_single(y, x), cpu, before=barrier)
        res["uniform"].append({"bytes_per_pair": b, "ms_median_rank": med, "ms_min": lo, "ms_max": hi,
                               "ms_median_max_over_ranks": gather_max(med)})
    rng = random.Random(7)
    for base in [2**12] if cpu else [2**20, 2**23, 2**26]:
        for _ in range(6):
            case = [[int(base * rng.choice([0.0, 0.25, 0.5, 1, 2, 4])) // 2 * 2 for _ in range(world)]
                    for _ in range(world)]
            send = [v // 2 for v in case[rank]]
            recv = [case[j][rank] // 2 for j in range(world)]
            x = torch.randn(max(1, sum(send)), device=dev, dtype=torch.bfloat16)[: sum(send)]
            y = torch.empty(sum(recv), device=dev, dtype=torch.bfloat16)
            med, _, _ = median_ms(lambda: dist.all_to_all_single(y, x, recv, send), cpu, before=barrier)
            t = torch.zeros(world, device=dev, dtype=torch.float64)
            t[rank] = med
            dist.all_reduce(t)
            res["skew"].append({"bytes_matrix": case, "ms_median_per_rank": t.tolist()})
    if world >= 2:
        for exp in (12, 14) if cpu else (20, 24, 28, 30):
            x = torch.randn(2**exp // 2, device=dev, dtype=torch.bfloat16)

            def p2p() -> None:
                if rank == 0:
                    dist.send(x, 1)
                elif rank == 1:
                    dist.recv(x, 0)

            med, _, _ = median_ms(p2p, cpu, before=barrier)
            res["p2p"].append({"bytes": 2**exp, "ms": gather_max(med) if rank < 2 else med})
    if rank == 0:
        text = json.dumps(res, indent=1)
        atomic_write(Path(out) / f"a2a_{world}.json", lambda fh: fh.write(text))
    dist.destroy_process_group()


def run(out: str | Path, nproc: int, *, cpu: bool = False, port: int = 29517) -> Path:
    """Spawn ``nproc`` ranks on this host, measure, and return the JSON file written into ``out``."""
    Path(out).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(nproc, str(out), cpu, port), nprocs=nproc, join=True)
    return Path(out) / f"a2a_{nproc}.json"
