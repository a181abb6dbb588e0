"""The sweep driver of ``moesim bench moe``: the process group, one record per point (measured, or skipped
with the reason), the JSON rewritten atomically after every point, the torchrun launch and the command line
(``python -m moesim.measure.moe``)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import torch
import torch.distributed as dist

from moesim.measure.moe.inputs import Weights, make_plan, make_weights
from moesim.measure.moe.measure import Timer, first_line, ceilings, probe_blockwise, self_check
from moesim.measure.moe.method import METHOD
from moesim.measure.moe.pipeline import Comm, fused_steps, reference_steps
from moesim.measure.moe.points import (
    BUDGET_S, CPU_SHAPES, DTYPES, PIPELINES, QUICK_SHAPES, SHAPES, Point, estimate_ms, estimate_seconds, sweep,
)
from moesim.errors import InputError
from moesim.fileio import atomic_write

FORMAT = "moesim.bench.moe/1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_group(cpu: bool) -> tuple[Comm, bool, str]:
    """The process group the pipelines talk through: torchrun's (WORLD_SIZE > 1), one already made, or a new
    world of one (env:// on 127.0.0.1 and a free port; gloo on the CPU, NCCL on a GPU). Returns it, whether this
    call made it (and should destroy it), and a note for the method text if none could be made (world 1: the
    all-to-alls then become device copies)."""
    if dist.is_initialized():
        return Comm(dist.get_world_size(), True), False, ""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "gloo" if cpu else "nccl"
    if world > 1:
        dist.init_process_group(backend)
        return Comm(world, True), True, ""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)
        _check_a2a(cpu)
        return Comm(1, True), True, ""
    except (RuntimeError, ValueError) as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        return Comm(1, False), False, (f" No working {backend} process group ({first_line(e)}): the all-to-alls "
                                      "(permute's count exchange, dispatch, combine) were plain device copies.")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_a2a(cpu: bool) -> None:
    """An all_to_all_single with split sizes to itself, on the device: it must return its rows."""
    dev = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    x = torch.arange(6, device=dev, dtype=torch.float32).reshape(3, 2)
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, [3], [3])
    if not torch.equal(x, y):
        raise RuntimeError("all_to_all_single to itself returned other rows")


@dataclass
class _Run:
    """What every point of one sweep shares."""

    dev: torch.device
    cpu: bool
    rank: int
    dtype: torch.dtype
    timer: Timer
    res: dict
    path: Path
    t0: float
    max_seconds: float | None
    log: Callable[[str], None]
    fp8_ok: bool
    fused_error: str | None
    lines: list[str] = field(default_factory=list)  # the records, each encoded once

    def add(self, rec: dict) -> None:
        self.res["records"].append(rec)
        self.lines.append(json.dumps(rec))

    def dump(self) -> None:
        """Write the JSON (atomically): the header indented, then one record per line."""
        if self.rank == 0:
            head = json.dumps({k: v for k, v in self.res.items() if k != "records"}, indent=1)
            text = head[:-2] + ',\n "records": [\n' + ",\n".join(self.lines) + "\n ]\n}\n"

            def write(fh: IO[str]) -> None:
                fh.write(text)

            atomic_write(self.path, write)

    def out_of_time(self) -> bool:
        late = self.max_seconds is not None and time.time() - self.t0 > self.max_seconds
        if self.timer.comm.world > 1:  # every rank skips the same points
            flag = torch.tensor([int(late)], device=self.dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late


def _base(pt: Point, sh: dict[str, int]) -> dict:
    return {"shape": pt.shape, "d_model": sh["d_model"], "d_ff": sh["d_ff"], "num_experts": sh["num_experts"],
            "top_k": sh["top_k"], "ep": pt.ep, "local_experts": sh["num_experts"] // pt.ep, "pipeline": pt.pipeline,
            "dtype": pt.dtype, "routing": pt.routing, "tokens": pt.tokens}


def _cannot_run(pt: Point, run: _Run) -> str | None:
    if pt.dtype == "fp8" and not run.fp8_ok:
        return "fp8 needs a CUDA GPU of compute capability 9.0+ and torch._scaled_grouped_mm"
    if pt.pipeline == "fused":
        if pt.dtype != "bf16" or pt.ep != 1:
            return "the fused pipeline is measured in bf16 at EP1 only"
        return run.fused_error
    return None


def measure_point(pt: Point, sh: dict[str, int], w: Weights, run: _Run) -> dict:
    """One record: route, build the pipeline, time it (or say why it was skipped)."""
    rec = _base(pt, sh)
    reason = _cannot_run(pt, run)
    if reason:
        return dict(rec, skipped=reason)
    world, rank = run.timer.comm.world, run.rank
    p = make_plan(pt.shape, sh, pt.ep, pt.routing, pt.tokens, world=world, rank=rank, dev=run.dev, dtype=run.dtype)
    rec.update(rows=p.rows, rows_per_expert=p.rows_per_expert, send_rows=pt.tokens * p.k)
    if p.rows == 0 and world == 1:
        return dict(rec, skipped="no rows reach this GPU's experts")
    if pt.pipeline == "fused":
        steps = fused_steps(p, w)
    else:
        steps = reference_steps(p, w, pt.dtype, run.timer.comm)
    return dict(rec, **run.timer.measure(steps, p.x))


def _line(i: int, n: int, rec: dict, run: _Run, left_s: float) -> str:
    head = (f"[{i + 1:3d}/{n} {time.time() - run.t0:5.0f}s, ~{left_s:4.0f}s left] {rec['shape']} ep{rec['ep']} "
            f"{rec['pipeline']} {rec['dtype']} {rec['routing']} T={rec['tokens']}")
    if "skipped" in rec:
        return f"{head}: skipped ({rec['skipped']})"
    steps = " ".join(f"{k} {v:.3f}" for k, v in rec["steps_ms"].items())
    return (f"{head} rows={rec['rows']}: total {rec['total_ms']:.3f} ms (min {rec['min_ms']:.3f}), "
            f"steps sum {rec['steps_sum_ms']:.3f}: {steps}")


def _weights_for(name: str, sh: dict[str, int], run: _Run) -> Weights | str:
    if not run.cpu:
        torch.cuda.empty_cache()
    try:
        return make_weights(name, sh, run.dev, run.dtype)
    except torch.cuda.OutOfMemoryError as e:
        return "out of memory for the weights: " + first_line(e)


def _point_record(pt: Point, sh: dict[str, int], w: Weights | str | None, run: _Run) -> dict:
    """The record of one point: measured, or skipped with the reason (time budget, OOM, an error)."""
    if run.out_of_time():
        return dict(_base(pt, sh), skipped="time budget of the run exhausted")
    if not isinstance(w, Weights):
        return dict(_base(pt, sh), skipped=str(w))
    try:
        return measure_point(pt, sh, w, run)
    except torch.cuda.OutOfMemoryError as e:
        rec = dict(_base(pt, sh), skipped="out of memory: " + first_line(e))
    except Exception as e:  # one failing point (a kernel that does not support a shape, ...) is recorded
        if run.timer.comm.world > 1:
            raise  # the other ranks would wait in a collective forever
        rec = dict(_base(pt, sh), skipped=f"error: {type(e).__name__}: {first_line(e)}")
    if not run.cpu:
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: the next points will say so
            pass
    return rec


def _sweep(shapes: dict[str, dict[str, int]], points: list[Point], run: _Run, estimates: list[float]) -> None:
    w: Weights | str | None = None
    current = None
    for i, pt in enumerate(points):
        sh = shapes[pt.shape]
        if pt.shape != current:
            w, current = None, pt.shape  # the last shape's weights are freed before the next are made
            w = _weights_for(pt.shape, sh, run)
        rec = _point_record(pt, sh, w, run)
        if pt.dtype == "fp8" and "total_ms" in rec:
            run.res["fp8_scaling"] = "rowwise"
        run.add(rec)
        run.dump()
        done = sum(estimates[: i + 1])
        left = sum(estimates[i + 1:]) * (time.time() - run.t0) / max(done, 1e-9)
        run.log(_line(i, len(points), rec, run, left))


def _fused_error(cpu: bool) -> str | None:
    """Why the fused pipeline cannot run here, or None. On the CPU it runs in Triton's interpreter."""
    if cpu and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU the fused pipeline runs only in Triton's interpreter (TRITON_INTERPRET=1)"
    try:
        from moesim.measure import fused_moe  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({first_line(e)})"
    return None


def _header(cpu: bool, world: int, warmup: int, reps: int, flush: bool) -> dict:
    if cpu:
        device, sms = "cpu (plumbing dry run)", 0
    else:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device, sms = props.name, props.multi_processor_count
    return {"format": FORMAT, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "sms": sms, "world_size": world,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": METHOD, "warmup": warmup, "reps": reps, "l2_flush": flush,
            "ceilings": {"bf16_tflops_8k": 0.0, "fp8_tflops_8k": None, "copy_GBps_rw": 0.0},
            "fp8_scaling": None, "records": []}


def _defaults(cpu: bool, quick: bool, shapes: dict[str, dict[str, int]] | None, warmup: int | None,
              reps: int | None) -> tuple[dict[str, dict[str, int]], int, int]:
    if shapes is None:
        shapes = CPU_SHAPES if cpu else {n: SHAPES[n] for n in QUICK_SHAPES} if quick else SHAPES
    if warmup is None:
        warmup = 1 if cpu else 3
    if reps is None:
        reps = 2 if cpu else 12
    return shapes, warmup, reps


def _check_names(dtypes: tuple[str, ...], pipelines: tuple[str, ...]) -> None:
    for given, valid, flag in ((dtypes, DTYPES, "--dtypes"), (pipelines, PIPELINES, "--pipelines")):
        bad = [v for v in given if v not in valid]
        if bad or not given:
            raise InputError(f"unknown {bad or 'empty list'}; valid: {', '.join(valid)}", field=flag)


def launch(out: str | Path, nproc: int, filename: str, flags: list[str]) -> Path:
    """Run the sweep on ``nproc`` GPUs (ranks) of this host under torchrun: ``python -m torch.distributed.run
    --nproc_per_node N -m moesim.measure.moe ...`` with this checkout on PYTHONPATH; rank 0 writes the JSON."""
    root = str(Path(__file__).resolve().parents[3])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "moesim.measure.moe",
           "--out", str(out), "--filename", filename, *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    subprocess.run(cmd, env=env, check=True)
    return Path(out) / filename


def _flags(cpu: bool, quick: bool, dtypes: tuple[str, ...], pipelines: tuple[str, ...],
           shapes: dict[str, dict[str, int]] | None, warmup: int | None, reps: int | None, flush: bool,
           max_seconds: float | None) -> list[str]:
    flags = ["--dtypes", ",".join(dtypes), "--pipelines", ",".join(pipelines)]
    flags += ["--cpu"] * cpu + ["--quick"] * quick + ["--no-flush"] * (not flush)
    flags += ["--shapes", json.dumps(shapes)] if shapes else []
    flags += ["--warmup", str(warmup)] if warmup is not None else []
    flags += ["--reps", str(reps)] if reps is not None else []
    return flags + ["--max-seconds", str(max_seconds if max_seconds is not None else -1)]


def run(out: str | Path, *, cpu: bool = False, quick: bool = False, nproc: int = 1,
        dtypes: tuple[str, ...] = DTYPES, pipelines: tuple[str, ...] = PIPELINES,
        shapes: dict[str, dict[str, int]] | None = None, warmup: int | None = None, reps: int | None = None,
        flush: bool = True, max_seconds: float | None = BUDGET_S, filename: str = "moe.json",
        log: Callable[[str], None] | None = print) -> Path:
    """Measure the sweep (:func:`sweep`) and write ``out/filename`` (rewritten after every point); return its path.

    ``nproc`` > 1 (and not already under torchrun): launch ``nproc`` ranks with torchrun (:func:`launch`).
    ``cpu``: tiny shapes in float32 with gloo, 1 + 2 repetitions. ``max_seconds``: points not started by then are
    recorded as skipped. ``log`` gets one line per point.
    """
    _check_names(dtypes, pipelines)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(out, nproc, filename, _flags(cpu, quick, dtypes, pipelines, shapes, warmup, reps, flush,
                                                   max_seconds))
    if not cpu and not torch.cuda.is_available():
        raise InputError("no CUDA GPU visible to torch; --cpu runs tiny shapes on the CPU", field="--cpu")
    t0 = time.time()
    shapes, warmup, reps = _defaults(cpu, quick, shapes, warmup, reps)
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    comm, owned, note = open_group(cpu)
    try:
        path = Path(out) / filename
        _run(path, shapes, sweep(shapes, world=comm.world, quick=quick, cpu=cpu, dtypes=dtypes, pipelines=pipelines),
             comm, note, cpu=cpu, warmup=warmup, reps=reps, flush=flush, max_seconds=max_seconds, t0=t0,
             log=log or (lambda line: None))
    finally:
        if owned:
            dist.destroy_process_group()
    return path


def _checks_before(run: _Run, points: list[Point]) -> str:
    """The method text's notes that can be made before the sweep: the torch_reference self-check (the kernels
    the sweep itself runs first)."""
    kinds = {(p.pipeline, p.dtype) for p in points}
    cases = [("torch_reference", dt) for dt in DTYPES if ("torch_reference", dt) in kinds
             and (dt == "bf16" or run.fp8_ok)]
    if run.timer.comm.world > 1 or not cases:
        return ""
    return self_check(run.dev, run.cpu, run.timer.comm, cases, "at the start of this run")


def _checks_after(run: _Run, points: list[Point]) -> str:
    """The notes made after the sweep, so that a kernel fault in them cannot spoil a measurement: the fused
    pipeline's self-check and the blockwise fp8 probe."""
    extra = ""
    if run.timer.comm.world == 1 and run.fused_error is None and any(p.pipeline == "fused" for p in points):
        extra += self_check(run.dev, run.cpu, run.timer.comm, [("fused", "bf16")], "after the sweep")
    if run.fp8_ok and run.rank == 0 and any(p.dtype == "fp8" for p in points):
        extra += " " + probe_blockwise(run.dev)
    return extra


def _run(path: Path, shapes: dict[str, dict[str, int]], points: list[Point], comm: Comm, note: str, *, cpu: bool,
         warmup: int, reps: int, flush: bool, max_seconds: float | None, t0: float,
         log: Callable[[str], None]) -> None:
    dev = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    rank = dist.get_rank() if comm.use_dist else 0
    say = log if rank == 0 else (lambda line: None)
    flush_buf = torch.empty(2**20 if cpu else 256 * 2**20, dtype=torch.uint8, device=dev) if flush else None
    fp8_ok = (not cpu and torch.cuda.get_device_capability(dev) >= (9, 0) and hasattr(torch, "_scaled_grouped_mm"))
    fused_error = _fused_error(cpu) if any(p.pipeline == "fused" for p in points) else None
    run = _Run(dev, cpu, rank, torch.float32 if cpu else torch.bfloat16, Timer(cpu, warmup, reps, flush_buf, comm),
               _header(cpu, comm.world, warmup, reps, flush), path, t0, max_seconds, say, fp8_ok, fused_error)
    est = [2 * (warmup + reps) * (estimate_ms(shapes[p.shape], p) + 0.3) / 1e3 + 0.1 for p in points]
    say(f"moesim bench moe: {len(points)} points on {run.res['device']} x{comm.world}; estimated "
        f"{estimate_seconds(shapes, points, warmup, reps):.0f} s on an H200"
        + (f" (points not started after {max_seconds:.0f} s are skipped)" if max_seconds is not None else ""))
    torch.backends.cuda.matmul.allow_tf32 = False
    run.res["ceilings"] = c = ceilings(dev, cpu)
    extra = note + (" This is a --cpu dry run: float32 instead of bf16, wall-clock timers, tiny shapes." if cpu
                    else "") + _checks_before(run, points)
    run.res["method"] = METHOD + extra
    say(f"ceilings: bf16 {c['bf16_tflops_8k']:.0f} TFLOP/s, fp8 {c['fp8_tflops_8k'] or 0:.0f} TFLOP/s, copy "
        f"{c['copy_GBps_rw']:.0f} GB/s;{extra}")
    run.dump()
    _sweep(shapes, points, run, est)
    after = _checks_after(run, points)
    run.res["method"] += after
    run.dump()
    n_ok = sum("total_ms" in r for r in run.res["records"])
    say(f"{n_ok} of {len(points)} points measured in {time.time() - t0:.0f} s;{after} Wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m moesim.measure.moe`` (what :func:`launch` runs on every rank)."""
    ap = argparse.ArgumentParser(description="The whole MoE layer on one GPU, step by step: what "
                                             "``moesim bench moe`` measures.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--filename", default="moe.json")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--shapes", help="JSON {name: {d_model, d_ff, num_experts, top_k}}")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=BUDGET_S, help="negative: no limit")
    a = ap.parse_args(argv)
    run(a.out, cpu=a.cpu, quick=a.quick, nproc=a.nproc, dtypes=tuple(a.dtypes.split(",")),
        pipelines=tuple(a.pipelines.split(",")), shapes=json.loads(a.shapes) if a.shapes else None,
        warmup=a.warmup, reps=a.reps, flush=not a.no_flush, max_seconds=a.max_seconds if a.max_seconds >= 0 else None,
        filename=a.filename, log=lambda line: print(line, flush=True))
