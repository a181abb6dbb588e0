"""Micro-benchmark results as moesim reads them: all-to-all, point-to-point, expert-FFN and attention timings.

Reads the JSON that ``moesim bench`` and the scripts in ../shared/calibration and
benchmarks/validation/attention_h100 write (``a2a_<world>.json``: ``uniform``/``skew``/``p2p``;
``expert_ffn*.json``: ``single``/``multi``; ``attention*.json``: ``records`` with a ``part`` each, of which the
attention-core ones are kept, :func:`moesim.calibration.attention.attention_points`), recognising each file by
its keys. Each file's fields are checked first (:mod:`moesim.calibration.schema`), so a problem names the
file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.calibration.attention import AttentionPoint, ProjectionPoint, bench_points
from moesim.calibration.attention_kernels import FORMAT as KERNELS_FORMAT
from moesim.calibration.attention_kernels import KernelPoint, check_kernels
from moesim.calibration.sustained import FORMAT as SUSTAINED_FORMAT
from moesim.calibration.sustained import SustainedPoint, check_sustained
from moesim.calibration.gemm import GemmPoint, gemm_points
from moesim.calibration.moe import MoEPoint, graph_points, moe_points
from moesim.calibration.table import FORMAT as TABLE_FORMAT
from moesim.calibration.table import check_moe_table, table_points
from moesim.calibration.train import FORMAT as TRAIN_FORMAT
from moesim.calibration.train import CollectivePoint, TrainGemmPoint, check_train, train_points
from moesim.calibration.schema import check_a2a, check_dense, check_ffn, check_moe, check_moe_graphs
from moesim.errors import InputError
from moesim.fileio import read_json_object


@dataclass(frozen=True)
class A2APoint:
    """One all-to-all call: ``matrix[i][j]`` bytes from rank i to rank j; the median ms of each rank."""

    matrix: np.ndarray
    ms: np.ndarray
    kind: str  # "uniform" or "skew"

    @property
    def size(self) -> float:
        return float(self.matrix.max())


@dataclass(frozen=True)
class P2PPoint:
    nbytes: float
    ms: float


@dataclass(frozen=True)
class FFNPoint:
    """Experts of one shape run one after another on one GPU with ``tokens[i]`` tokens each."""

    shape: str
    d_model: int
    d_ff: int
    tokens: tuple[int, ...]
    ms: float


@dataclass
class BenchData:
    devices: set[str] = field(default_factory=set)
    world: int = 0
    a2a: list[A2APoint] = field(default_factory=list)
    p2p: list[P2PPoint] = field(default_factory=list)
    ffn: list[FFNPoint] = field(default_factory=list)
    attention: list[AttentionPoint] = field(default_factory=list)
    projections: list[ProjectionPoint] = field(default_factory=list)
    moe: list[MoEPoint] = field(default_factory=list)  # moesim bench moe records (moesim.calibration.moe)
    moe_graphs: list[MoEPoint] = field(default_factory=list)  # the same steps replayed from CUDA graphs
    moe_table: list[MoEPoint] = field(default_factory=list)  # whole layers from a kernel-timing table (.table)
    gemms: list[GemmPoint] = field(default_factory=list)  # plain GEMMs (moesim.calibration.gemm)
    train_gemms: list[TrainGemmPoint] = field(default_factory=list)  # moesim bench train (moesim.calibration.train)
    collectives: list[CollectivePoint] = field(default_factory=list)  # its all-gathers and reduce-scatters
    attention_kernels: list[KernelPoint] = field(default_factory=list)  # moesim bench attention-kernels
    sustained: list[SustainedPoint] = field(default_factory=list)  # kernels back to back (power_h200)
    sources: list[str] = field(default_factory=list)


def _a2a(raw: dict, data: BenchData, src: str) -> None:
    w = int(raw.get("world", 0))
    if data.world and w != data.world:
        raise InputError(f"all-to-all files of different world sizes ({data.world} and {w})", source=src, field="world")
    data.world = w
    for i, u in enumerate(raw.get("uniform", [])):
        b = float(u["bytes_per_pair"])
        data.a2a.append(A2APoint(np.full((w, w), b), np.full(w, float(u["ms_median_max_over_ranks"])), "uniform"))
    for i, s in enumerate(raw.get("skew", [])):
        m = np.asarray(s["bytes_matrix"], dtype=float)
        if m.shape != (w, w):
            raise InputError(f"must be {w} x {w}", source=src, field=f"skew[{i}].bytes_matrix")
        data.a2a.append(A2APoint(m, np.asarray(s["ms_median_per_rank"], dtype=float), "skew"))
    for p in raw.get("p2p", []):
        data.p2p.append(P2PPoint(float(p["bytes"]), float(p["ms"])))


def _ffn(raw: dict, data: BenchData) -> None:
    shapes = raw["single"]
    for name, s in shapes.items():
        for tokens, ms in s["rows"]:
            data.ffn.append(FFNPoint(name, int(s["d_model"]), int(s["d_ff"]), (int(tokens),), float(ms)))
    for m in raw.get("multi", []):
        s = shapes[m["shape"]]
        data.ffn.append(FFNPoint(m["shape"], int(s["d_model"]), int(s["d_ff"]), tuple(int(t) for t in m["loads"]),
                                 float(m["ms"])))


def load_bench(paths: list[str | Path]) -> BenchData:
    data = BenchData()
    for path in paths:
        src = str(path)
        raw = read_json_object(path)
        try:
            if "uniform" in raw or "skew" in raw:
                check_a2a(raw, src)
                _a2a(raw, data, src)
            elif "single" in raw:
                check_ffn(raw, src)
                _ffn(raw, data)
            elif raw.get("format") == "moesim.bench.moe/1":
                check_moe(raw, src)
                data.moe.extend(moe_points(raw, src))
            elif raw.get("format") == "moesim.bench.moe_graphs/1":
                check_moe_graphs(raw, src)
                data.moe_graphs.extend(graph_points(raw, src))
            elif raw.get("format") == TABLE_FORMAT:
                check_moe_table(raw, src)
                data.moe_table.extend(table_points(raw, src))
            elif raw.get("format") == TRAIN_FORMAT:
                check_train(raw, src)
                gemms, colls = train_points(raw, src)
                data.train_gemms.extend(gemms)
                data.collectives.extend(colls)
            elif raw.get("format") == KERNELS_FORMAT:
                data.attention_kernels.extend(check_kernels(raw, src))
            elif raw.get("format") == SUSTAINED_FORMAT:
                data.sustained.extend(check_sustained(raw, src))
            elif raw.get("format") == "moesim.bench.dense/1":
                check_dense(raw, src)
                data.gemms.extend(gemm_points(raw, src))
            elif "records" in raw:
                cores, projections = bench_points(raw, src)
                data.attention.extend(cores)
                data.projections.extend(projections)
            else:
                raise InputError("neither an all-to-all (uniform/skew/p2p), an expert-FFN (single/multi) nor an "
                                 "attention (records) benchmark", source=src)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # what the checks above did not foresee
            if isinstance(exc, InputError):
                raise
            raise InputError(f"malformed benchmark entry ({type(exc).__name__}: {exc})", source=src) from None
        data.devices.add(str(raw.get("device", "?")))
        data.sources.append(src)
    return data
