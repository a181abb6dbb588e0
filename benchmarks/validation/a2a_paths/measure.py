"""Does NCCL's all-to-all cost depend on how PyTorch calls it? (run under torchrun, 2+ GPUs)

The uniform sweep in ../shared/calibration calls ``all_to_all_single(y, x)`` with equal splits; MoE dispatch
calls it with explicit (uneven) split sizes. This measures, for the same bytes per pair, (a) equal splits with
no size lists, (b) the same equal sizes passed as explicit split lists, (c) one direction only (rank 0 sends,
the others send nothing off-rank), (d) both directions with explicit splits but no self copy.
Median of 30 timed calls after 5 warm-up calls, CUDA events, slowest rank. Writes $OUT/a2a_paths.json.

    torchrun --standalone --nproc_per_node=2 benchmarks/validation/a2a_paths/measure.py
"""
import json
import os
import statistics

import torch
import torch.distributed as dist


def timed(fn, warm=5, iters=30):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def main():
    dist.init_process_group("nccl")
    r, w = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(r)
    dev = torch.device("cuda", r)
    rows = []
    for exp in range(16, 29):
        b = 2 ** exp
        n = b // 2  # bf16 elements
        x = torch.randn(n * w, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        cases = {
            "equal_no_splits": lambda: dist.all_to_all_single(y, x),
            "equal_explicit_splits": lambda: dist.all_to_all_single(y, x, [n] * w, [n] * w),
        }
        send = [n if (r == 0 and j != 0) else 0 for j in range(w)]
        recv = [n if (j == 0 and r != 0) else 0 for j in range(w)]
        x1 = torch.randn(max(sum(send), 1), device=dev, dtype=torch.bfloat16)[: sum(send)]
        y1 = torch.empty(sum(recv), device=dev, dtype=torch.bfloat16)
        cases["one_direction"] = lambda: dist.all_to_all_single(y1, x1, recv, send)
        send2 = [0 if j == r else n for j in range(w)]
        x2 = torch.randn(sum(send2), device=dev, dtype=torch.bfloat16)
        y2 = torch.empty(sum(send2), device=dev, dtype=torch.bfloat16)
        cases["both_directions_no_self"] = lambda: dist.all_to_all_single(y2, x2, send2, send2)
        row = {"bytes_per_pair": b}
        for name, fn in cases.items():
            t = torch.tensor([timed(fn)], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row[name] = t.item()
        rows.append(row)
        if r == 0:
            print(row, flush=True)
    if r == 0:
        out = {"world": w, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())), "ms_slowest_rank_median": rows}
        path = os.path.join(os.environ.get("OUT", "."), "a2a_paths.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
