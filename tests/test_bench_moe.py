"""moesim bench moe on the CPU (gloo, float32, tiny shapes): the JSON schema, the routing, and the numerics of
every pipeline against a dense per-token computation of the same MoE."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moesim.measure.moe.driver as driver  # noqa: E402
import moesim.measure.moe.measure as measure_mod  # noqa: E402
from moesim.measure import moe  # noqa: E402
from moesim.cli import main  # noqa: E402
from moesim.errors import InputError  # noqa: E402

ROOT = Path(__file__).parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CPU = torch.device("cpu")
TOP_KEYS = {"format", "device", "torch", "cuda", "sms", "world_size", "date", "method", "warmup", "reps", "l2_flush",
            "ceilings", "fp8_scaling", "records"}
POINT_KEYS = {"shape", "d_model", "d_ff", "num_experts", "top_k", "ep", "local_experts", "pipeline", "dtype",
              "routing", "tokens"}
TIMED_KEYS = POINT_KEYS | {"rows", "rows_per_expert", "send_rows", "steps_ms", "steps_sum_ms", "total_ms", "min_ms",
                           "max_ms", "host_steps_ms"}
STEPS = {
    ("torch_reference", "bf16"): ["router", "permute", "dispatch", "regroup", "gemm_gate_up", "activation",
                                  "gemm_down", "unregroup", "combine", "reduce"],
    ("torch_reference", "fp8"): ["router", "permute", "dispatch", "regroup", "quant", "gemm_gate_up", "activation",
                                 "quant_down", "gemm_down", "unregroup", "combine", "reduce"],
    ("fused", "bf16"): ["router", "align", "gemm_gate_up", "activation", "gemm_down", "reduce"],
}
SHAPE = {"d_model": 48, "d_ff": 40, "num_experts": 16, "top_k": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    path = moe.run(out, cpu=True, log=None)
    return path, json.loads(path.read_text())


@pytest.fixture
def world_one():
    comm, owned, note = moe.open_group(cpu=True)
    assert comm.use_dist and comm.world == 1 and note == ""
    yield comm
    if owned:
        dist.destroy_process_group()


def _gates(x, wg, k):
    top = torch.softmax(x.float() @ wg.float(), dim=-1).topk(k, dim=-1).values
    return top / top.sum(-1, keepdim=True)


def test_cpu_run_writes_the_schema(cpu_run):
    path, raw = cpu_run
    assert path.name == "moe.json" and set(raw) == TOP_KEYS
    assert raw["format"] == "moesim.bench.moe/1" and raw["world_size"] == 1 and raw["sms"] == 0
    assert isinstance(raw["device"], str) and isinstance(raw["torch"], str) and isinstance(raw["cuda"], str)
    assert raw["method"].startswith(moe.METHOD)
    assert "Self-check at the start of this run" in raw["method"] and "torch_reference bf16 " in raw["method"]
    assert ("Self-check after the sweep" in raw["method"]) == HAS_TRITON  # fused: after the reference points
    assert "failed" not in raw["method"] and "Blockwise" not in raw["method"]  # no fp8 probe on the CPU
    assert (raw["warmup"], raw["reps"], raw["l2_flush"]) == (1, 2, True)
    assert set(raw["ceilings"]) == {"bf16_tflops_8k", "fp8_tflops_8k", "copy_GBps_rw"}
    assert raw["ceilings"]["bf16_tflops_8k"] > 0 and raw["ceilings"]["copy_GBps_rw"] > 0
    assert raw["ceilings"]["fp8_tflops_8k"] is None and raw["fp8_scaling"] is None  # no fp8 on the CPU
    points = moe.sweep(moe.CPU_SHAPES, cpu=True)
    assert [(r["shape"], r["ep"], r["pipeline"], r["dtype"], r["routing"], r["tokens"]) for r in raw["records"]] == \
        [(p.shape, p.ep, p.pipeline, p.dtype, p.routing, p.tokens) for p in points]


def test_cpu_run_records(cpu_run):
    records = cpu_run[1]["records"]
    timed = [r for r in records if "skipped" not in r]
    assert {(r["pipeline"], r["dtype"]) for r in timed} >= {("torch_reference", "bf16")}
    assert {r["ep"] for r in timed} == {1, 8} and {r["routing"] for r in timed} == {"uniform", "zipf2.0"}
    for r in timed:
        assert set(r) == TIMED_KEYS
        sh = moe.CPU_SHAPES[r["shape"]]
        assert all(r[k] == v for k, v in sh.items())
        assert r["local_experts"] == sh["num_experts"] // r["ep"] == len(r["rows_per_expert"])
        assert sum(r["rows_per_expert"]) == r["rows"] > 0 and min(r["rows_per_expert"]) >= 0
        assert r["send_rows"] == r["tokens"] * r["top_k"]
        if r["ep"] == 1:
            assert r["rows"] == r["send_rows"]  # every copy stays on the one GPU
        assert list(r["steps_ms"]) == STEPS[(r["pipeline"], r["dtype"])]
        assert all(v >= 0 for v in r["steps_ms"].values())
        assert r["steps_sum_ms"] == pytest.approx(sum(r["steps_ms"].values()))
        assert list(r["host_steps_ms"]) == list(r["steps_ms"]) and all(v > 0 for v in r["host_steps_ms"].values())
        assert 0 < r["min_ms"] <= r["total_ms"] <= r["max_ms"]
    for r in records:
        if "skipped" in r:
            assert POINT_KEYS <= set(r) and not {"steps_ms", "total_ms", "min_ms", "max_ms"} & set(r)
    fp8 = [r for r in records if r["dtype"] == "fp8"]
    assert fp8 and all("fp8 needs a CUDA GPU" in r["skipped"] for r in fp8)
    fused = [r for r in records if r["pipeline"] == "fused"]
    assert fused and all(r["ep"] == 1 and r["dtype"] == "bf16" for r in fused)
    if HAS_TRITON:  # run in Triton's interpreter
        assert all("total_ms" in r for r in fused)
    else:
        assert all("Triton is not installed" in r["skipped"] for r in fused)


@pytest.mark.parametrize("routing", ["uniform", "zipf1.0", "zipf2.0"])
@pytest.mark.parametrize("T", [1, 13, 64])
def test_reference_layer_equals_dense_moe(world_one, routing, T):
    """Every token's k copies go out, through their experts and back into its row: the pipeline's output is the
    dense per-token MoE's."""
    w = moe.make_weights("t", SHAPE, CPU, torch.float32)
    p = moe.make_plan("t", SHAPE, 1, routing, T, world=1, rank=0, dev=CPU, dtype=torch.float32)
    assert p.rows == T * p.k and not p.emulated
    s = moe.run_layer(moe.reference_steps(p, w, "bf16", world_one), p.x)
    ref = moe.dense_moe(p.x, p.ids, _gates(p.x, w.wg, p.k), w.w13, w.w2)
    assert s.out.shape == (T, SHAPE["d_model"])
    torch.testing.assert_close(s.out, ref, rtol=1e-4, atol=1e-5)
    assert s.offs.tolist() == torch.tensor(p.rows_per_expert).cumsum(0).tolist()


def test_emulated_slice_processes_the_rows_its_experts_receive(world_one):
    w = moe.make_weights("t", SHAPE, CPU, torch.float32)
    for routing in ("uniform", "zipf2.0"):
        p = moe.make_plan("t", SHAPE, 8, routing, 24, world=1, rank=0, dev=CPU, dtype=torch.float32)
        assert p.emulated and p.L == 2 and p.first % 2 == 0
        ids = p.incoming_ids
        assert ((ids >= p.first) & (ids < p.first + p.L)).all() and len(ids) == p.rows
        assert torch.bincount(ids - p.first, minlength=p.L).tolist() == p.rows_per_expert
        group = moe.pick_experts(24 * 8, 16, 4, routing, moe.seed_of("t", routing, 24, 8), moe.seed_of("t", routing),
                                 CPU)
        per_rank = torch.bincount(group.reshape(-1) // 2, minlength=8)
        assert p.rows == int(per_rank.max())  # the busiest GPU of the slice
        s = moe.run_layer(moe.reference_steps(p, w, "bf16", world_one), p.x)
        ones = torch.ones(len(ids), 1)
        torch.testing.assert_close(s.back, moe.dense_moe(p.incoming_x, ids.unsqueeze(1), ones, w.w13, w.w2),
                                   rtol=1e-4, atol=1e-5)
        assert s.out.shape == (24, SHAPE["d_model"]) and p.returned.shape == (24 * 4, SHAPE["d_model"])


def test_without_a_process_group_the_all_to_alls_are_copies(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no NCCL here")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    comm, owned, note = moe.open_group(cpu=True)
    assert not comm.use_dist and not owned and "no NCCL here" in note and "device copies" in note
    w = moe.make_weights("t", SHAPE, CPU, torch.float32)
    p = moe.make_plan("t", SHAPE, 1, "zipf1.0", 9, world=1, rank=0, dev=CPU, dtype=torch.float32)
    s = moe.run_layer(moe.reference_steps(p, w, "bf16", comm), p.x)
    torch.testing.assert_close(s.out, moe.dense_moe(p.x, p.ids, _gates(p.x, w.wg, p.k), w.w13, w.w2),
                               rtol=1e-4, atol=1e-5)


def test_fp8_steps_against_dense(world_one, monkeypatch):
    """The fp8 pipeline's scales, wired to an emulation of torch._scaled_grouped_mm's documented semantics
    (out = (a * scale_a[:, None]) @ (b * scale_b[:, None, :]) per group), stay within fp8 error of the dense MoE."""
    def scaled_grouped_mm(a, b, sa, sb, offs=None, out_dtype=None, use_fast_accum=False):
        assert a.dtype == b.dtype == torch.float8_e4m3fn and b.stride(-2) == 1  # mat_b column-major
        assert sa.shape == (a.shape[0],) and sb.shape == (b.shape[0], b.shape[2])
        return torch._grouped_mm(a.float() * sa[:, None], b.float() * sb[:, None, :], offs=offs).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_grouped_mm", scaled_grouped_mm)
    w = moe.make_weights("t", SHAPE, CPU, torch.float32)
    p = moe.make_plan("t", SHAPE, 1, "zipf1.0", 32, world=1, rank=0, dev=CPU, dtype=torch.float32)
    s = moe.run_layer(moe.reference_steps(p, w, "fp8", world_one), p.x)
    ref = moe.dense_moe(p.x, p.ids, _gates(p.x, w.wg, p.k), w.w13, w.w2)
    assert float((s.out.float() - ref).abs().max() / ref.abs().max()) < 0.1


def test_quant_rows_round_trips():
    x = torch.randn(7, 64) * torch.logspace(-3, 3, 7).unsqueeze(1)
    q, scale = moe.quant_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (7,)
    torch.testing.assert_close(q.float() * scale[:, None], x, rtol=0.07, atol=0)
    wq, ws = moe.quant_weights(torch.randn(5, 6, 32), chunk=2)
    assert wq.shape == (5, 6, 32) and ws.shape == (5, 6)


def test_routing_draws_distinct_experts_with_the_requested_skew():
    n, E, k = 4000, 32, 4
    shares = {}
    for routing in moe.ROUTINGS:
        ids = moe.pick_experts(n, E, k, routing, 1, 2, CPU)
        assert ids.shape == (n, k) and ids.dtype == torch.int64
        assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts per token
        assert torch.equal(ids, moe.pick_experts(n, E, k, routing, 1, 2, CPU))  # seeded
        counts = torch.bincount(ids.reshape(-1), minlength=E).float()
        shares[routing] = float(counts.max() / counts.sum())
    assert shares["uniform"] < 1.3 / E  # k/E of the tokens each
    assert shares["uniform"] < shares["zipf1.0"] < shares["zipf2.0"]
    assert shares["zipf2.0"] > 0.9 / k  # the top expert is in nearly every token's k


def _two_rank_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        comm, owned, _ = moe.open_group(cpu=True)
        assert comm.world == 2 and not owned
        w = moe.make_weights("t", SHAPE, CPU, torch.float32)
        p = moe.make_plan("t", SHAPE, 2, "zipf1.0", 11, world=2, rank=rank, dev=CPU, dtype=torch.float32)
        assert not p.emulated and p.first == rank * 8
        s = moe.run_layer(moe.reference_steps(p, w, "bf16", comm), p.x)
        assert s.offs.tolist() == torch.tensor(p.rows_per_expert).cumsum(0).tolist()  # what arrived = the plan
        ref = moe.dense_moe(p.x, p.ids, _gates(p.x, w.wg, p.k), w.w13, w.w2)
        torch.testing.assert_close(s.out, ref, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_two_ranks_exchange_rows_and_reproduce_the_dense_moe():
    mp.spawn(_two_rank_worker, args=(_free_port(),), nprocs=2, join=True)


@pytest.mark.skipif(not HAS_TRITON, reason="the fused pipeline needs Triton (on the CPU: its interpreter)")
def test_fused_pipeline_equals_dense_moe_in_the_interpreter():
    """Runs in a subprocess: TRITON_INTERPRET=1 must be set before Triton is imported."""
    script = """
import torch
from moesim.measure import moe, fused_moe
sh = {"d_model": 48, "d_ff": 40, "num_experts": 6, "top_k": 2}
cpu = torch.device("cpu")
w = moe.make_weights("t", sh, cpu, torch.float32)
for routing, T in (("uniform", 1), ("zipf2.0", 13), ("zipf1.0", 40)):
    p = moe.make_plan("t", sh, 1, routing, T, world=1, rank=0, dev=cpu, dtype=torch.float32)
    top = torch.softmax(p.x @ w.wg, -1).topk(p.k, -1).values
    ref = moe.dense_moe(p.x, p.ids, top / top.sum(-1, keepdim=True), w.w13, w.w2)
    for cfg in (None, fused_moe.Config(16, 32, 32, 2, 4, 2), fused_moe.Config(32, 16, 16, 1, 4, 2)):
        steps = [moe.router_step(p, w), *fused_moe.expert_steps(p.x, w.w13, w.w2, T, p.k, cfg)]
        torch.testing.assert_close(moe.run_layer(steps, p.x).out, ref, rtol=1e-4, atol=1e-5)
ids = torch.tensor([[3, 0], [3, 5], [0, 3]]).reshape(-1)
ar = torch.arange(0, 6 + 6 * 3, 4)
sorted_ids, block_expert, n_padded = fused_moe.align_block_size(ids, 6, 4, torch.arange(6), torch.arange(6), ar)
assert n_padded.tolist() == [12], n_padded
assert sorted_ids[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6], sorted_ids
assert block_expert[:3].tolist() == [0, 3, 5], block_expert
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_default_sweep_fits_the_time_budget():
    points = moe.sweep(moe.SHAPES)
    assert len(set(points)) == len(points)
    ref16 = [p for p in points if p.pipeline == "torch_reference" and p.dtype == "bf16"]
    assert len(ref16) == (8 + 7) * 3 * 6  # EP1 for all eight shapes, EP8 for the seven with >= 64 experts
    assert {p.ep for p in points if p.shape == "mixtral-8x7b"} == {1}
    assert all(p.ep == 1 and p.dtype == "bf16" for p in points if p.pipeline == "fused")
    assert points[0].pipeline == "torch_reference" and points[-1].pipeline == "fused"  # the budget cuts fused first
    warmup, reps = 3, 12
    assert moe.estimate_seconds(moe.SHAPES, points, warmup, reps) < 0.5 * moe.BUDGET_S
    quick = moe.sweep({n: moe.SHAPES[n] for n in moe.QUICK_SHAPES}, quick=True)
    assert 8 <= len(quick) <= 24


def test_time_budget_skips_points(tmp_path):
    path = moe.run(tmp_path, cpu=True, quick=True, max_seconds=0, pipelines=("torch_reference",), dtypes=("bf16",),
                   log=None)
    records = json.loads(path.read_text())["records"]
    assert records and all(r["skipped"] == "time budget of the run exhausted" for r in records)


SCENARIO = """name: mine
clusters: [{preset: hgx-h200}]
model: {name: my-moe, num_layers: 2, num_experts: 8, top_k: 2, d_model: 512, d_ff: 768}
workload: {synthetic: {tokens_per_gpu: 16}}
placements: [contiguous]
"""


def test_cli_bench_moe_measures_the_scenario_model(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(SCENARIO)
    out = tmp_path / "b"
    assert main(["bench", "moe", "--cpu", "--scenario", str(path), "--dtypes", "bf16", "--pipelines",
                 "torch_reference", "-o", str(out)]) == 0
    assert f"wrote {out / 'moe.json'}" in capsys.readouterr().out
    raw = json.loads((out / "moe.json").read_text())
    assert {r["shape"] for r in raw["records"]} == {"my-moe"}
    r = raw["records"][0]
    assert (r["d_model"], r["d_ff"], r["num_experts"], r["top_k"]) == (32, 48, 8, 2)  # scaled 16x down on the CPU
    assert all("total_ms" in r and r["ep"] == 1 for r in raw["records"])


def test_cli_bench_moe_rejects_unknown_names(tmp_path, capsys):
    assert main(["bench", "moe", "--cpu", "--dtypes", "bf16,int4", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtypes" in err and "int4" in err
    assert not (tmp_path / "b").exists()


def test_cli_bench_moe_two_ranks_under_torchrun(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "moe", "--cpu", "--nproc", "2", "--dtypes", "bf16", "--pipelines", "torch_reference",
                 "-o", str(out)]) == 0
    raw = json.loads((out / "moe.json").read_text())
    assert raw["world_size"] == 2 and "Self-check" not in raw["method"]
    assert {r["ep"] for r in raw["records"]} == {2}
    for r in raw["records"]:
        assert r["local_experts"] == r["num_experts"] // 2 == len(r["rows_per_expert"]) and "total_ms" in r
        assert sum(r["rows_per_expert"]) == r["rows"]


def test_validation_wrapper_runs_from_a_bare_checkout(tmp_path):
    """benchmarks/validation/moe_h200/measure.py puts the checkout on sys.path itself (no pip install)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/validation/moe_h200/measure.py"), "--cpu", "--quick",
                           "--dtypes", "bf16", "--pipelines", "torch_reference", "--out", str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads((tmp_path / "moe_h200.json").read_text())
    assert raw["records"] and all("total_ms" in r for r in raw["records"])


# ---------------------------------------------------------------- the driver's and timer's branches, in-process

def _fake_run(tmp_path, *, world: int = 1, fp8_ok: bool = False, fused_error: str | None = None):
    comm = moe.Comm(world, world > 1)
    return driver._Run(CPU, True, 0, torch.float32, moe.Timer(True, 0, 1, None, comm),
                       driver._header(True, world, 0, 1, False), tmp_path / "moe.json", 0.0, None, lambda line: None,
                       fp8_ok, fused_error)


def test_open_group_uses_the_group_already_made(world_one):
    comm, owned, note = moe.open_group(cpu=True)
    assert (comm.world, comm.use_dist, owned, note) == (1, True, False, "")


def test_open_group_under_torchrun_joins_its_world(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    for cpu, backend in ((True, "gloo"), (False, "nccl")):
        comm, owned, note = moe.open_group(cpu=cpu)
        assert (comm.world, comm.use_dist, owned, note) == (4, True, True, "")
        assert calls.pop() == ((backend,), {})  # env:// from torchrun's variables


def test_open_group_that_fails_its_self_test_is_dropped_and_the_environment_restored(monkeypatch):
    def wrong_rows(out, inp, out_splits=None, in_splits=None):
        out.zero_()

    monkeypatch.setattr(dist, "all_to_all_single", wrong_rows)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    comm, owned, note = moe.open_group(cpu=True)
    assert (comm.world, comm.use_dist, owned) == (1, False, False) and not dist.is_initialized()
    assert note == (" No working gloo process group (all_to_all_single to itself returned other rows): the "
                    "all-to-alls (permute's count exchange, dispatch, combine) were plain device copies.")
    assert os.environ["MASTER_ADDR"] == "10.1.2.3" and "MASTER_PORT" not in os.environ


def test_why_a_point_cannot_run():
    def reason(pipeline, dtype, ep, fp8_ok=False, fused_error=None):
        run = types.SimpleNamespace(fp8_ok=fp8_ok, fused_error=fused_error)
        return driver._cannot_run(moe.Point("s", ep, pipeline, dtype, "uniform", 16), run)

    assert reason("torch_reference", "bf16", 8) is None
    assert reason("torch_reference", "fp8", 1) == "fp8 needs a CUDA GPU of compute capability 9.0+ and " \
                                                  "torch._scaled_grouped_mm"
    assert reason("torch_reference", "fp8", 1, fp8_ok=True) is None
    assert reason("fused", "fp8", 1, fp8_ok=True) == "the fused pipeline is measured in bf16 at EP1 only"
    assert reason("fused", "bf16", 8) == "the fused pipeline is measured in bf16 at EP1 only"
    assert reason("fused", "bf16", 1) is None
    assert reason("fused", "bf16", 1, fused_error="Triton is not installed (x)") == "Triton is not installed (x)"


def test_a_failing_point_is_recorded_with_its_reason(tmp_path, monkeypatch):
    run = _fake_run(tmp_path)
    pt = moe.Point("t", 1, "torch_reference", "bf16", "uniform", 8)
    base = driver._base(pt, SHAPE)
    assert base == {"shape": "t", "d_model": 48, "d_ff": 40, "num_experts": 16, "top_k": 4, "ep": 1,
                    "local_experts": 16, "pipeline": "torch_reference", "dtype": "bf16", "routing": "uniform",
                    "tokens": 8}

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nGPU 0 has 1 GiB free")

    monkeypatch.setattr(driver, "make_weights", oom)
    weights = driver._weights_for("t", SHAPE, run)
    assert weights == "out of memory for the weights: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert driver._point_record(pt, SHAPE, weights, run) == dict(base, skipped=weights)
    monkeypatch.setattr(driver, "measure_point", oom)
    assert driver._point_record(pt, SHAPE, moe.make_weights("t", SHAPE, CPU, torch.float32), run) == dict(
        base, skipped="out of memory: CUDA out of memory. Tried to allocate 20.00 GiB")

    def unsupported(*args):
        raise ValueError("no kernel for this shape")

    monkeypatch.setattr(driver, "measure_point", unsupported)
    w = moe.make_weights("t", SHAPE, CPU, torch.float32)
    assert driver._point_record(pt, SHAPE, w, run) == dict(base, skipped="error: ValueError: no kernel for this shape")
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None: reduced.append(int(flag.item())))
    with pytest.raises(ValueError, match="no kernel"):  # with other ranks waiting in a collective: raised
        driver._point_record(pt, SHAPE, w, _fake_run(tmp_path, world=2))
    assert reduced == [0]  # the ranks agreed first that there was time left


def test_measure_without_a_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError) as err:
        moe.run(tmp_path / "b", cpu=False, log=None)
    assert str(err.value) == "--cpu: no CUDA GPU visible to torch; --cpu runs tiny shapes on the CPU"
    assert not (tmp_path / "b").exists()


def test_the_fused_pipeline_needs_triton_and_on_the_cpu_its_interpreter(monkeypatch):
    import moesim.measure

    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))  # imported before the variable was set
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert driver._fused_error(cpu=True) == ("on the CPU the fused pipeline runs only in Triton's interpreter "
                                             "(TRITON_INTERPRET=1)")
    monkeypatch.setitem(sys.modules, "triton", None)  # not installed
    monkeypatch.delitem(sys.modules, "moesim.measure.fused_moe", raising=False)
    monkeypatch.delattr(moesim.measure, "fused_moe", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert driver._fused_error(cpu=False) == "Triton is not installed (import of triton halted; None in sys.modules)"


def test_checks_before_and_after_the_sweep(tmp_path, monkeypatch):
    fused = [moe.Point("t", 1, "fused", "bf16", "uniform", 8)]
    fp8 = [moe.Point("t", 1, "torch_reference", "fp8", "uniform", 8)]
    assert driver._checks_before(_fake_run(tmp_path), fused) == ""  # no torch_reference point to check
    assert driver._checks_before(_fake_run(tmp_path, world=2), fp8 + fused) == ""  # not across ranks
    assert driver._checks_after(_fake_run(tmp_path, fused_error="no Triton"), fused + fp8) == ""
    monkeypatch.setattr(driver, "probe_blockwise", lambda dev: "Blockwise fp8 probe: ran.")
    assert driver._checks_after(_fake_run(tmp_path, fp8_ok=True, fused_error="no Triton"), fp8) == \
        " Blockwise fp8 probe: ran."


def test_self_check_reports_a_failing_pipeline_and_keeps_going(monkeypatch):
    def broken(p, w):
        raise RuntimeError("0 active drivers ([]).\nThere should only be one.")

    monkeypatch.setattr(measure_mod, "fused_steps", broken)
    text = moe.self_check(CPU, True, moe.Comm(1, False), [("fused", "bf16"), ("torch_reference", "bf16")], "now")
    head = (" Self-check now (T=16, d=256, f=128, E=16, k=4, zipf1.0): max |output - dense fp32 per-token MoE| / "
            "max |dense|: fused bf16 failed (0 active drivers ([]).); torch_reference bf16 ")
    assert text.startswith(head) and text.endswith(".")
    assert float(text[len(head):-1]) < 1e-5  # the reference pipeline matches the dense MoE in float32


def test_blockwise_probe_reports_what_each_kernel_did(monkeypatch):
    seen = {}

    def exact(a, b, sa, sb, out_dtype=None):
        seen["scales"] = (tuple(sa.shape), tuple(sb.shape))
        return (a.float() @ b.float()).to(out_dtype)

    def grouped(a, b, sa, rec_a, sb, rec_b, offs=None):
        seen["offs"] = offs.tolist()

    monkeypatch.setattr(torch, "_scaled_mm", exact)
    monkeypatch.setattr(F, "scaled_grouped_mm", grouped, raising=False)
    tail = ". The fp8 records were measured with rowwise scales (fp8_scaling), not blockwise."
    assert moe.probe_blockwise(CPU) == ("Blockwise fp8 probe (DeepSeek-V3 recipe, 1x128 activation and 128x128 "
                                        "weight scales): dense torch._scaled_mm ran; grouped "
                                        "torch.nn.functional.scaled_grouped_mm ran" + tail)
    assert seen == {"scales": ((256, 4), (4, 2)), "offs": [128, 256]}  # one 1x128 scale per row, 128x128 blocks
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, sa, sb, out_dtype=None: exact(a, b, sa, sb, out_dtype) + 9)
    monkeypatch.delattr(F, "scaled_grouped_mm")
    text = moe.probe_blockwise(CPU)
    assert "dense torch._scaled_mm ran with wrong results;" in text
    assert "grouped torch.nn.functional.scaled_grouped_mm failed (module 'torch.nn.functional' has no attribute " \
           "'scaled_grouped_mm')" + tail in text

    def refuses(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration.\nFor RowWise scaling, ...")

    monkeypatch.setattr(torch, "_scaled_mm", refuses)
    assert "dense torch._scaled_mm failed (Invalid scaling configuration.);" in moe.probe_blockwise(CPU)


def test_ceilings_are_flops_and_bytes_over_the_median_time(monkeypatch):
    calls = []

    def two_ms(fn, cpu, n=10):
        calls.append(fn())
        return 2.0

    monkeypatch.setattr(measure_mod, "_median_event_ms", two_ms)
    assert moe.ceilings(CPU, True) == {"bf16_tflops_8k": 2 * 256**3 / 2.0 / 1e9, "fp8_tflops_8k": None,
                                       "copy_GBps_rw": 2 * 2**20 / 2.0 / 1e6}  # read + write of 1 MiB
    assert [tuple(c.shape) for c in calls] == [(256, 256), (2**20,)]
    assert measure_mod._tflops_8k(CPU, True, True) == 2 * 256**3 / 2.0 / 1e9
    assert calls[-1].dtype == torch.bfloat16 and tuple(calls[-1].shape) == (256, 256)  # the fp8 GEMM's output


@pytest.mark.parametrize("kwargs", [
    dict(cpu=True, quick=True, dtypes=("bf16",), pipelines=("torch_reference",), shapes={"x": SHAPE}, warmup=0,
         reps=3, flush=False, max_seconds=None),
    dict(cpu=False, quick=False, dtypes=moe.DTYPES, pipelines=moe.PIPELINES, shapes=None, warmup=None, reps=None,
         flush=True, max_seconds=12.5),
])
def test_every_rank_under_torchrun_gets_the_call_that_launched_it(tmp_path, monkeypatch, kwargs):
    """launch() passes _flags() to ``python -m moesim.measure.moe`` on every rank; its main() must rebuild the
    same run() call."""
    import runpy

    calls = []
    monkeypatch.setattr(driver, "run", lambda out, **kw: calls.append((out, kw)))
    monkeypatch.setattr(sys, "argv", ["moe", "--out", str(tmp_path), "--filename", "m.json",
                                      *driver._flags(**kwargs)])
    runpy.run_module("moesim.measure.moe", run_name="__main__")
    (out, got), = calls
    log = got.pop("log")
    assert out == str(tmp_path) and got == dict(kwargs, nproc=1, filename="m.json") and callable(log)
