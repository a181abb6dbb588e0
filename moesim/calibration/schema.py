"""The fields of the benchmark files ``moesim calibrate`` reads, checked before any is parsed into points.

A timing of zero, a negative byte count, a missing field, a string where a number goes, or a world size of
a billion ranks would otherwise stop the fit with a KeyError, divide by zero, or quietly fit a cluster to
NaN. Each check walks one kind of file and names the first bad field by its path (``uniform[3].ms_median_
max_over_ranks``), with the file. (Non-finite numbers and integers beyond 64 bits never get here:
:func:`moesim.loaders.load_json` refuses them while reading.) The attention-bench records are checked where
they are parsed (:func:`moesim.calibration.attention.bench_points`).

Deliberately not checked: whether the numbers are plausible measurements (a fit with large held-out errors
says so), and fields the fit does not read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from moesim.errors import InputError
from moesim.hardware.spec import ClusterSpec
from moesim.traces.model import MAX_DIM, MAX_EXPERTS

if TYPE_CHECKING:
    from moesim.calibration.bench import BenchData
    from moesim.calibration.fit import Calibration

MAX_WORLD = 4096  # ranks of one all-to-all benchmark (the matrices are world x world)
MAX_SIZE = 2**40  # tokens, rows, bytes per pair and model dimensions: beyond any real kernel


def _get(obj: Any, key: str, src: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise InputError("must be a JSON object", source=src, field=where or None)
    if key not in obj:
        raise InputError("missing", source=src, field=f"{where}.{key}" if where else key)
    return obj[key]


def _check(value: Any, src: str, field: str, *, integer: bool = False, zero: bool = False,
           most: float = MAX_SIZE) -> Any:
    """``value`` is a number (an integer when asked), above 0 (or at least 0 with ``zero``), at most ``most``."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise InputError(f"must be {kind}, got {value!r}", source=src, field=field)
    if not (value >= 0 if zero else value > 0) or value > most:
        raise InputError(f"must be {kind} {'>= 0' if zero else '> 0'} and at most {int(most)}, got {value!r}",
                         source=src, field=field)
    return value


def number(obj: Any, key: str, src: str, where: str = "", *, integer: bool = False, zero: bool = False,
           most: float = MAX_SIZE) -> Any:
    """``obj[key]``, checked by :func:`_check`; an InputError naming the field otherwise."""
    return _check(_get(obj, key, src, where), src, f"{where}.{key}" if where else key, integer=integer, zero=zero,
                  most=most)


def items(obj: Any, key: str, src: str, where: str = "", *, required: bool = False) -> list[Any]:
    """``obj[key]`` as a list (an absent optional list is empty)."""
    if not required and isinstance(obj, dict) and key not in obj:
        return []
    value = _get(obj, key, src, where)
    if not isinstance(value, list):
        raise InputError(f"must be a list, got {type(value).__name__}", source=src, field=f"{where}.{key}" if where
                         else key)
    return value


def _numbers(values: Any, src: str, field: str, *, length: int, zero: bool = True) -> None:
    if not isinstance(values, list) or len(values) != length:
        raise InputError(f"must be a list of {length} numbers", source=src, field=field)
    for i, v in enumerate(values):
        _check(v, src, f"{field}[{i}]", zero=zero)


def check_a2a(raw: dict[str, Any], src: str) -> None:
    """An all-to-all file: ``world`` ranks, ``uniform`` / ``skew`` / ``p2p`` points with positive times."""
    world = number(raw, "world", src, integer=True, most=MAX_WORLD)
    for i, u in enumerate(items(raw, "uniform", src)):
        where = f"uniform[{i}]"
        number(u, "bytes_per_pair", src, where, zero=True)
        number(u, "ms_median_max_over_ranks", src, where)
    for i, s in enumerate(items(raw, "skew", src)):
        where = f"skew[{i}]"
        matrix = _get(s, "bytes_matrix", src, where)
        if not isinstance(matrix, list) or len(matrix) != world:
            raise InputError(f"must be {world} x {world}", source=src, field=f"{where}.bytes_matrix")
        for r, row in enumerate(matrix):
            _numbers(row, src, f"{where}.bytes_matrix[{r}]", length=world)
        _numbers(_get(s, "ms_median_per_rank", src, where), src, f"{where}.ms_median_per_rank", length=world,
                 zero=False)
    for i, p in enumerate(items(raw, "p2p", src)):
        number(p, "bytes", src, f"p2p[{i}]", zero=True)
        number(p, "ms", src, f"p2p[{i}]")


def check_ffn(raw: dict[str, Any], src: str) -> None:
    """An expert-FFN file: ``single`` shapes with (tokens, ms) rows, ``multi`` runs of several experts."""
    shapes = _get(raw, "single", src, "")
    if not isinstance(shapes, dict):
        raise InputError("must be a mapping of shape name to d_model, d_ff, rows", source=src, field="single")
    for name, s in shapes.items():
        where = f"single.{name}"
        number(s, "d_model", src, where, integer=True, most=MAX_DIM)
        number(s, "d_ff", src, where, integer=True, most=MAX_DIM)
        for j, row in enumerate(items(s, "rows", src, where, required=True)):
            if not isinstance(row, list) or len(row) != 2:
                raise InputError("must be [tokens, ms]", source=src, field=f"{where}.rows[{j}]")
            _check(row[0], src, f"{where}.rows[{j}][0]", integer=True)
            _check(row[1], src, f"{where}.rows[{j}][1]")
    for i, m in enumerate(items(raw, "multi", src)):
        where = f"multi[{i}]"
        shape = _get(m, "shape", src, where)
        if not isinstance(shape, str) or shape not in shapes:
            raise InputError(f"not one of the shapes in 'single' ({', '.join(map(str, shapes))}; got {shape!r})",
                             source=src, field=f"{where}.shape")
        loads = _get(m, "loads", src, where)
        if not isinstance(loads, list) or not loads:
            raise InputError("must be a non-empty list of token counts", source=src, field=f"{where}.loads")
        for j, t in enumerate(loads):
            _check(t, src, f"{where}.loads[{j}]", integer=True, zero=True)
        number(m, "ms", src, where)


_MOE_INTS = ("num_experts", "top_k", "d_model", "d_ff", "ep", "local_experts", "tokens")
_MOE_TEXT = ("shape", "pipeline", "dtype", "routing")
_MOE_MOST = {"num_experts": MAX_EXPERTS, "top_k": MAX_EXPERTS, "local_experts": MAX_EXPERTS, "d_model": MAX_DIM,
             "d_ff": MAX_DIM, "ep": MAX_WORLD}


def _moe_work(r: dict[str, Any], src: str, where: str) -> None:
    """A measured MoE-layer record's shape and work: sizes, names, and each local expert's rows."""
    for key in _MOE_INTS:
        number(r, key, src, where, integer=True, most=_MOE_MOST.get(key, MAX_SIZE))
    number(r, "send_rows", src, where, zero=True)
    for key in _MOE_TEXT:
        if not isinstance(_get(r, key, src, where), str):
            raise InputError(f"must be a string, got {r[key]!r}", source=src, field=f"{where}.{key}")
    if r["top_k"] > r["num_experts"] or r["local_experts"] > r["num_experts"]:
        raise InputError(f"top_k ({r['top_k']}) and local_experts ({r['local_experts']}) must be at most "
                         f"num_experts ({r['num_experts']})", source=src, field=where)
    _numbers(_get(r, "rows_per_expert", src, where), src, f"{where}.rows_per_expert", length=r["local_experts"])


def check_moe(raw: dict[str, Any], src: str) -> None:
    """A ``moesim bench moe`` file: every measured record's shape, work and positive step timings."""
    for i, r in enumerate(items(raw, "records", src, required=True)):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise InputError("must be a JSON object", source=src, field=where)
        if "skipped" in r:
            continue
        _moe_work(r, src, where)
        steps = _get(r, "steps_ms", src, where)
        if not isinstance(steps, dict) or not steps:
            raise InputError("must be a mapping of step name to milliseconds", source=src, field=f"{where}.steps_ms")
        for name in steps:
            number(steps, name, src, f"{where}.steps_ms")
        number(r, "total_ms", src, where)
        if "steps_sum_ms" in r:
            number(r, "steps_sum_ms", src, where)


def check_moe_graphs(raw: dict[str, Any], src: str) -> None:
    """A ``moesim.bench.moe_graphs/1`` file (CUDA-graph replays of the MoE layer's steps): every measured
    record's shape, work and positive step timings."""
    if "graph_floor_us" in raw:
        number(raw, "graph_floor_us", src, "", zero=True)
    for i, r in enumerate(items(raw, "records", src, required=True)):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise InputError("must be a JSON object", source=src, field=where)
        if "error" in r:
            continue
        _moe_work(r, src, where)
        steps = _get(r, "steps_graph_us", src, where)
        if not isinstance(steps, dict) or not steps:
            raise InputError("must be a mapping of step name to microseconds", source=src,
                             field=f"{where}.steps_graph_us")
        for name in steps:
            number(steps, name, src, f"{where}.steps_graph_us")
        for key in ("layer_graph_us", "layer_eager_us"):
            if key in r:
                number(r, key, src, where)


def check_dense(raw: dict[str, Any], src: str) -> None:
    """A ``moesim.bench.dense/1`` file (plain GEMMs): every measured GEMM's sizes and positive timings."""
    if "graph_floor_us" in raw:
        number(raw, "graph_floor_us", src, "", zero=True)
    for i, r in enumerate(items(raw, "records", src, required=True)):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise InputError("must be a JSON object", source=src, field=where)
        if r.get("kind") != "gemm" or "error" in r:
            continue
        for key in ("tokens", "k", "n"):
            number(r, key, src, where, integer=True, most=MAX_DIM)
        if r.get("dtype") not in ("bf16", "fp8"):
            raise InputError(f"must be bf16 or fp8, got {r.get('dtype')!r}", source=src, field=f"{where}.dtype")
        number(r, "eager_us", src, where)
        if "graph_us" in r:
            number(r, "graph_us", src, where)


def calibrate_checked(data: BenchData, preset_name: str, *, name: str | None = None,
                      progress: Callable[[int], object] | None = None) -> Calibration:
    """:func:`moesim.calibration.calibrate`, its result checked by :func:`check_fitted`; points that cannot be
    fitted at all (a degenerate sweep the checks above let through) are an InputError naming the files."""
    from moesim.calibration.fit import calibrate

    try:
        result = calibrate(data, preset_name, name=name, progress=progress)
    except InputError:
        raise
    except (ValueError, ArithmeticError, IndexError) as exc:  # (pydantic's ValidationError is a ValueError)
        raise InputError(f"cannot fit these points ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                         source=", ".join(data.sources)) from None
    check_fitted(result.spec, data.sources)
    return result


def check_fitted(spec: ClusterSpec, sources: list[str]) -> None:
    """The calibrated cluster, validated again as a cluster file would be (fitting updates a validated spec
    without re-checking it): a fitted value outside its field's bounds is an InputError naming the benchmark
    files and the field, before the cluster YAML is written."""
    try:
        ClusterSpec.model_validate(spec.model_dump())
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise InputError(f"the fit gives {err.get('input')!r}, which is not a valid value ({err['msg']}); check "
                         "the timings in the benchmark files", source=", ".join(sources), field=field) from None
