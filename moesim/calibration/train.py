"""The training side of ``moesim calibrate``: the experts' grouped GEMMs' backward from ``moesim bench train``
(format ``moesim.bench.train/1``), and its all-gathers and reduce-scatters against the network model.

Backward: a training step runs each grouped GEMM's backward as a data-gradient and a weight-gradient GEMM, twice
the forward's FLOPs. Each measured backward is modelled as ``gemm_backward x forward + harness``: the ratio is the
GPU's (``GPUSpec.gemm_backward``, what the training engine multiplies a forward GEMM's time by), the harness is
the fixed cost of the benchmark's own ``torch.autograd.grad`` call around one GEMM (the autograd engine started
and stopped), which a training step's one backward pass over the whole model does not pay per GEMM: fitted
alongside, never simulated. Both are fitted on two thirds of the GEMMs (every third of each shape, ordered by
local experts and rows, held out), per GEMM (gate-up and down apart), minimising the mean |log error|.
Reported: the backward predicted from the measured forward (``train-bwd-ratio``: the ratio alone) and from the
forward the engine predicts (``train-bwd``: the torch_reference pipeline's grouped-GEMM fit, what a simulated
training step charges).

Collectives (two ranks or more): each all-gather and reduce-scatter predicted by the engine's own collective
timer (:class:`moesim.sim.training.CollectiveTimer`) on one node of as many GPUs (a copy of every rank's shard to
every other rank, as FSSDP's and data parallelism's collectives are simulated); reported, not fitted (the
network's parameters come from the all-to-all benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.calibration.schema import MAX_WORLD, items, number
from moesim.errors import InputError
from moesim.hardware import build_topology, deep_merge
from moesim.hardware.spec import ClusterSpec, GPUSpec
from moesim.sim.kernels import grouped_gemm_time

FORMAT = "moesim.bench.train/1"
GEMM_FIELDS = ("d_model", "d_ff", "local_experts", "rows_per_expert", "fwd_gate_up_ms", "fwd_down_ms",
               "bwd_gate_up_ms", "bwd_down_ms")
COLLECTIVES = ("all_gather", "reduce_scatter")


@dataclass(frozen=True)
class TrainGemmPoint:
    """One grouped GEMM's forward and backward: ``[rows, k] x [k, n]`` per expert for ``experts`` experts."""

    label: str
    shape: str
    experts: int
    rows_per_expert: int
    n: int
    k: int
    fwd_ms: float
    bwd_ms: float


@dataclass(frozen=True)
class CollectivePoint:
    op: str  # all_gather | reduce_scatter
    bytes_per_rank: float
    ranks: int
    ms: float


def check_train(raw: dict, src: str) -> None:
    """One-line errors naming the field of a malformed ``moesim bench train`` file."""
    for i, r in enumerate(items(raw, "gemms", src, required=True)):
        for name in GEMM_FIELDS:
            number(r, name, src, f"gemms[{i}]", integer=not name.endswith("_ms"))
    for i, c in enumerate(items(raw, "collectives", src)):
        op = c.get("op") if isinstance(c, dict) else c
        if op not in COLLECTIVES:
            raise InputError(f"must be one of {', '.join(COLLECTIVES)}, got {op!r}", source=src,
                             field=f"collectives[{i}].op")
        number(c, "bytes_per_rank", src, f"collectives[{i}]")
        number(c, "ms_median_max_over_ranks", src, f"collectives[{i}]")
        if number(c, "ranks", src, f"collectives[{i}]", integer=True, most=MAX_WORLD) < 2:
            raise InputError("a collective needs 2 ranks or more", source=src, field=f"collectives[{i}].ranks")


def train_points(raw: dict, src: str) -> tuple[list[TrainGemmPoint], list[CollectivePoint]]:
    """The GEMMs of a checked file, two per record (gate-up ``n = 2f, k = d``; down ``n = d, k = f``), and its
    collectives."""
    gemms = []
    for r in raw["gemms"]:
        d, f, e, per = int(r["d_model"]), int(r["d_ff"]), int(r["local_experts"]), int(r["rows_per_expert"])
        name = str(r.get("shape", f"d{d}-f{f}"))
        for part, n, k in (("gate_up", 2 * f, d), ("down", d, f)):
            gemms.append(TrainGemmPoint(f"{src}: {name} E={e} rows={e * per} {part}", name, e, per, n, k,
                                        float(r[f"fwd_{part}_ms"]), float(r[f"bwd_{part}_ms"])))
    colls = [CollectivePoint(str(c["op"]), float(c["bytes_per_rank"]), int(c["ranks"]),
                             float(c["ms_median_max_over_ranks"])) for c in raw.get("collectives", [])]
    return gemms, colls


def held_out(points: list[TrainGemmPoint]) -> list[bool]:
    """Every third (experts, rows) of each shape, both of its GEMMs together."""
    held = [False] * len(points)
    for shape in {p.shape for p in points}:
        order = sorted({(p.experts, p.rows_per_expert) for p in points if p.shape == shape})
        out = {key for j, key in enumerate(order) if j % 3 == 1}
        for i, p in enumerate(points):
            if p.shape == shape and (p.experts, p.rows_per_expert) in out:
                held[i] = True
    return held


def fit_backward(points: list[TrainGemmPoint], held: list[bool]) -> tuple[float, float]:
    """``(gemm_backward, harness_ms)`` minimising the mean |log error| of ``ratio x forward + harness`` against
    the measured backward over the points not held out (module docstring)."""
    train = [p for p, h in zip(points, held) if not h]
    if not train:
        raise InputError("every GEMM of the training benchmark is held out: measure more points", field="gemms")
    fwd = np.array([p.fwd_ms for p in train])
    bwd = np.array([p.bwd_ms for p in train])
    ratios = np.linspace(1.0, 5.0, 401)
    harness = np.linspace(0.0, 1.0, 401)  # ms
    pred = ratios[:, None, None] * fwd[None, None, :] + harness[None, :, None]
    err = np.abs(np.log(pred / bwd[None, None, :])).mean(-1)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return round(float(ratios[i]), 3), round(float(harness[j]), 4)


def model_forward_ms(p: TrainGemmPoint, gpu: GPUSpec) -> float:
    """The forward the engine predicts: the torch_reference pipeline's grouped-GEMM fit, bf16."""
    spec = gpu.moe_pipelines["torch_reference"]
    rows = np.full(p.experts, float(p.rows_per_expert))
    return float(grouped_gemm_time(rows, p.n, p.k, gpu, spec, weight_bytes=2, act_bytes=2, out_bytes=2)) * 1e3


def collective_ms(c: CollectivePoint, spec: ClusterSpec) -> float:
    """The engine's time for one all-gather or reduce-scatter among ``c.ranks`` GPUs of one node."""
    from moesim.sim.training import CollectiveTimer

    # one node of that many GPUs (NVLink only: its NICs, whatever their layout, carry nothing)
    one = ClusterSpec(**deep_merge(spec.model_dump(mode="json"), {"nodes": 1, "gpus_per_node": c.ranks,
                                                                  "network": {"nics_per_node": None}}))
    nbytes = c.bytes_per_rank * (1.0 - np.eye(c.ranks))
    return float(CollectiveTimer(build_topology(one)).durations(nbytes, c.op).max()) * 1e3


def train_predictions(gemms: list[TrainGemmPoint], held: list[bool], colls: list[CollectivePoint],
                      spec: ClusterSpec, harness_ms: float) -> list[tuple[str, str, float, float, bool]]:
    """(kind, label, measured ms, predicted ms, held out) of every backward (``train-bwd-ratio``, ``train-bwd``)
    and every collective (``all_gather``, ``reduce_scatter``; all marked held out: nothing is fitted to them)."""
    r = spec.gpu.gemm_backward
    out: list[tuple[str, str, float, float, bool]] = []
    for p, h in zip(gemms, held):
        out.append(("train-bwd-ratio", p.label, p.bwd_ms, r * p.fwd_ms + harness_ms, h))
        out.append(("train-bwd", p.label, p.bwd_ms, r * model_forward_ms(p, spec.gpu) + harness_ms, h))
    out += [(c.op, f"{c.op} {c.ranks} ranks {c.bytes_per_rank:.0f} B", c.ms, collective_ms(c, spec), True)
            for c in colls]
    return out
