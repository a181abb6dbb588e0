"""How ``moesim bench moe`` times a pipeline (CUDA events between the steps of one run, and the whole run as
one region), and the device facts it records: matmul and copy ceilings, the self-check against the dense MoE,
the blockwise fp8 probe."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from moesim.measure.moe.inputs import make_plan, make_weights
from moesim.measure.moe.pipeline import Comm, Step, dense_moe, fused_steps, reference_steps, run_layer
from moesim.measure.timing import event, sync


@dataclass
class Timer:
    """Times a pipeline's steps: events between the steps of one run, and the whole run as one region."""

    cpu: bool
    warmup: int
    reps: int
    flush_buf: torch.Tensor | None
    comm: Comm

    def _before(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.bitwise_not_()
        sync(self.cpu)
        self.comm.barrier()

    def _stepped(self, steps: list[Step], x: torch.Tensor, evs: list) -> tuple[list[float], list[float]]:
        """The GPU's time per step (events) and the host's (wall clock from the first event's record to each
        step's return: how long the host took to issue it, its waits for the device included)."""
        s = SimpleNamespace(x=x)
        stamps = [time.perf_counter()]
        evs[0].record()
        for (_, fn), ev in zip(steps, evs[1:]):
            fn(s)
            stamps.append(time.perf_counter())
            ev.record()
        sync(self.cpu)
        return ([a.elapsed_time(b) for a, b in zip(evs, evs[1:])],
                [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])])

    def _whole(self, steps: list[Step], x: torch.Tensor, pair: list) -> float:
        s = SimpleNamespace(x=x)
        pair[0].record()
        for _, fn in steps:
            fn(s)
        pair[1].record()
        sync(self.cpu)
        return pair[0].elapsed_time(pair[1])

    def measure(self, steps: list[Step], x: torch.Tensor) -> dict:
        evs = [event(self.cpu) for _ in range(len(steps) + 1)]
        pair = [event(self.cpu), event(self.cpu)]
        for _ in range(self.warmup):
            self._before()
            self._stepped(steps, x, evs)
            self._before()
            self._whole(steps, x, pair)
        per_step: list[list[float]] = [[] for _ in steps]
        host: list[list[float]] = [[] for _ in steps]
        totals = []
        for _ in range(self.reps):
            self._before()
            gpu_ms, host_ms = self._stepped(steps, x, evs)
            for acc, acc_host, ms, h in zip(per_step, host, gpu_ms, host_ms):
                acc.append(ms)
                acc_host.append(h)
            self._before()
            totals.append(self._whole(steps, x, pair))
        medians = {name: statistics.median(v) for (name, _), v in zip(steps, per_step)}
        return {"steps_ms": medians, "steps_sum_ms": sum(medians.values()), "total_ms": statistics.median(totals),
                "min_ms": min(totals), "max_ms": max(totals),
                "host_steps_ms": {name: statistics.median(v) for (name, _), v in zip(steps, host)}}


def _median_event_ms(fn: Callable[[], object], cpu: bool, n: int = 10) -> float:
    for _ in range(3):
        fn()
    sync(cpu)
    times = []
    for _ in range(n):
        a, b = event(cpu), event(cpu)
        a.record()
        fn()
        b.record()
        sync(cpu)
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _tflops_8k(dev: torch.device, cpu: bool, fp8: bool) -> float:
    n = 256 if cpu else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.float32 if cpu else torch.bfloat16)
    b = torch.randn_like(a)
    if not fp8:
        return 2 * n**3 / _median_event_ms(lambda: a @ b, cpu) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T  # column-major second operand
    one = torch.ones((), device=dev)
    return 2 * n**3 / _median_event_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16,
                                                                  use_fast_accum=True), cpu) / 1e9


def ceilings(dev: torch.device, cpu: bool) -> dict:
    """8192^3 bf16 matmul TFLOP/s, the same in fp8 (None where it does not run), 2 GiB device copy GB/s."""
    res = {"bf16_tflops_8k": _tflops_8k(dev, cpu, False), "fp8_tflops_8k": None}
    if not cpu:
        try:
            res["fp8_tflops_8k"] = _tflops_8k(dev, cpu, True)
        except (RuntimeError, TypeError):
            pass
    size = 2**20 if cpu else 2**31
    src = torch.empty(size, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    res["copy_GBps_rw"] = 2 * size / _median_event_ms(lambda: dst.copy_(src), cpu) / 1e6
    return res


def first_line(e: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), or its type's name."""
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def probe_blockwise(dev: torch.device) -> str:
    """Whether this torch runs DeepSeek-V3's fp8 recipe (1x128 activation and 128x128 weight block scales):
    dense torch._scaled_mm, and torch.nn.functional.scaled_grouped_mm. A sentence for the method text."""
    M, K, N = 256, 512, 256  # K/128 = 4: no padding of the scale rows either way
    a = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
    sa = torch.ones(K // 128, M, device=dev).T  # [M, K/128], stride (1, M)
    sb = torch.ones(N // 128, K // 128, device=dev).T  # [K/128, N/128], stride (1, K/128)
    try:
        out = torch._scaled_mm(a, b.T, sa, sb, out_dtype=torch.bfloat16)
        ref = a.float() @ b.float().T
        dense = "ran" if torch.allclose(out.float(), ref, rtol=0.02, atol=0.5) else "ran with wrong results"
    except (RuntimeError, TypeError, ValueError) as e:
        dense = f"failed ({first_line(e)})"
    try:
        rec = F.ScalingType
        bg = torch.randn(2, N, K, device=dev).to(torch.float8_e4m3fn)
        sbg = torch.ones(2, N // 128, K // 128, device=dev).transpose(-2, -1)
        # torch's functional.pyi leaves out scaled_grouped_mm, which functional.py defines (torch 2.10+)
        F.scaled_grouped_mm(a, bg.transpose(-2, -1), sa, rec.BlockWise1x128, sbg,  # type: ignore[attr-defined]
                            rec.BlockWise128x128, offs=torch.tensor([M // 2, M], device=dev, dtype=torch.int32))
        grouped = "ran"
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        grouped = f"failed ({first_line(e)})"
    return (f"Blockwise fp8 probe (DeepSeek-V3 recipe, 1x128 activation and 128x128 weight scales): dense "
            f"torch._scaled_mm {dense}; grouped torch.nn.functional.scaled_grouped_mm {grouped}. The fp8 records "
            "were measured with rowwise scales (fp8_scaling), not blockwise.")


def self_check(dev: torch.device, cpu: bool, comm: Comm, cases: list[tuple[str, str]], when: str) -> str:
    """Run each (pipeline, dtype) of ``cases`` once on a small problem and compare its output with
    :func:`dense_moe`; a sentence for the method text."""
    sh = {"d_model": 256, "d_ff": 128, "num_experts": 16, "top_k": 4}
    T, dtype = (16, torch.float32) if cpu else (64, torch.bfloat16)
    p = make_plan("self-check", sh, 1, "zipf1.0", T, world=1, rank=0, dev=dev, dtype=dtype)
    w = make_weights("self-check", sh, dev, dtype)
    gate = torch.softmax(p.x @ w.wg, dim=-1, dtype=torch.float32).topk(p.k, dim=-1).values
    ref = dense_moe(p.x, p.ids, gate / gate.sum(-1, keepdim=True), w.w13, w.w2)
    found = []
    for pipe, dt in cases:
        try:
            steps = reference_steps(p, w, dt, comm) if pipe == "torch_reference" else fused_steps(p, w)
            out = run_layer(steps, p.x).out.float()
            found.append(f"{pipe} {dt} {float((out - ref).abs().max() / ref.abs().max()):.2e}")
        except Exception as e:  # reported in the method text; the sweep records the error per point
            found.append(f"{pipe} {dt} failed ({first_line(e)})")
    return (f" Self-check {when} (T={T}, d=256, f=128, E=16, k=4, zipf1.0): max |output - dense fp32 per-token "
            "MoE| / max |dense|: " + "; ".join(found) + ".")
