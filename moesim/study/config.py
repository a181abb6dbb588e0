"""Scenario files: YAML -> validated, typed objects, with every error naming the file and the field.

A scenario has top-level keys ``name``, ``clusters``, ``model``, ``workload``, ``placements``, ``baseline``,
``engine`` and ``output``; see ``scenarios/*.yaml`` and the README. Unknown keys are rejected, units are in
field names, and cross-field checks (EP vs experts, trace vs model, baseline vs placements) run before
anything is simulated. Relative paths (trace and placement files) resolve against the scenario's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moesim.errors import InputError
from moesim.hardware.presets import deep_merge, preset, preset_names
from moesim.hardware.spec import ClusterSpec
from moesim.placement.registry import check_option, policy_names, policy_options
from moesim.traces.model import ModelSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterEntry(_Strict):
    """A cluster of the study: the hardware, and how expert parallelism is laid over it."""

    name: str
    spec: ClusterSpec
    tp: int = Field(default=1, ge=1, description="expert tensor parallelism: GPUs per EP rank")

    @property
    def ep(self) -> int:
        return self.spec.num_gpus // self.tp


class SyntheticWorkload(_Strict):
    tokens_per_gpu: int = Field(ge=1, description="tokens resident on each GPU per batch")
    batches: int = Field(default=1, ge=1)
    profile_batches: int = Field(default=1, ge=1, description="independent batches placements are profiled on")
    zipf_alpha: float = Field(default=0.3, ge=0)
    gpu_mix_sigma: float = Field(default=0.3, ge=0)
    affinity: float = Field(default=0.5, ge=0, le=1)
    affinity_fanout: int = Field(default=4, ge=1)
    seed: int = 0


class TraceWorkload(_Strict):
    file: Path
    tokens_per_gpu: int | None = Field(default=None, ge=1, description="batch size when the trace has no batch array")
    profile_batches: int | None = Field(default=None, ge=1, description="first N batches to profile on (default: all)")


class Workload(_Strict):
    synthetic: SyntheticWorkload | None = None
    trace: TraceWorkload | None = None

    @model_validator(mode="after")
    def _one(self) -> "Workload":
        if (self.synthetic is None) == (self.trace is None):
            raise ValueError("give exactly one of 'synthetic' or 'trace'")
        return self


class PlacementEntry(_Strict):
    name: str
    policy: str | None = None
    file: Path | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class EngineConfig(_Strict):
    dispatch: Literal["per_gpu", "per_expert"] = Field(
        default="per_gpu", description="one token copy per destination GPU (DeepEP) or per expert (naive)")
    expert_kernel: Literal["grouped", "per_expert"] = "grouped"
    rate_tolerance: float = Field(default=0.01, ge=0, le=0.2)
    progress: bool = True


class Scenario(_Strict):
    name: str
    source: str  # the file it came from
    clusters: tuple[ClusterEntry, ...]
    model: ModelSpec
    workload: Workload
    placements: tuple[PlacementEntry, ...]
    baseline: str
    engine: EngineConfig
    output: Path


TOP_KEYS = {"name", "clusters", "model", "workload", "placements", "baseline", "engine", "output"}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _pydantic_error(exc: ValidationError, source: str, prefix: str) -> InputError:
    err = exc.errors()[0]
    field = _loc(tuple(err["loc"]))
    field = f"{prefix}.{field}" if prefix and field else (prefix or field)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return InputError(msg, source=source, field=field)


def _cluster(raw: Any, i: int, source: str, base_dir: Path) -> ClusterEntry:
    where = f"clusters[{i}]"
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict):
        raise InputError("must be a preset name or a mapping", source=source, field=where)
    raw = dict(raw)
    tp = raw.pop("tp", 1)
    name = raw.pop("name", None)
    if "file" in raw:
        path = Path(str(raw.pop("file")))
        path = path if path.is_absolute() else base_dir / path
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read cluster file {path} ({' '.join(str(exc).split())})", source=source,
                             field=f"{where}.file") from None
        if not isinstance(loaded, dict):
            raise InputError(f"cluster file {path} must be a YAML mapping", source=source, field=f"{where}.file")
        raw = deep_merge(loaded, raw)
    if "preset" in raw:
        try:
            base = preset(str(raw.pop("preset")))
        except KeyError as exc:
            raise InputError(str(exc.args[0]), source=source, field=f"{where}.preset") from None
    else:
        base = {}
    merged = deep_merge(base, raw)
    if name is None:
        nodes = merged.get("nodes", 1)
        name = f"{merged.get('name', 'cluster')}-{nodes}x{merged.get('gpus_per_node', '?')}"
    merged["name"] = str(name)
    try:
        spec = ClusterSpec(**merged)
    except ValidationError as exc:
        raise _pydantic_error(exc, source, where) from None
    except TypeError as exc:
        raise InputError(str(exc), source=source, field=where) from None
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise InputError(f"must be a positive integer (got {tp!r})", source=source, field=f"{where}.tp")
    if spec.gpus_per_node % tp:
        raise InputError(f"tp={tp} must divide gpus_per_node={spec.gpus_per_node}", source=source, field=f"{where}.tp")
    return ClusterEntry(name=str(name), spec=spec, tp=tp)


def _placement(raw: Any, i: int, source: str, base_dir: Path) -> PlacementEntry:
    where = f"placements[{i}]"
    if isinstance(raw, str):
        raw = {"policy": raw}
    if not isinstance(raw, dict):
        raise InputError("must be a policy name or a mapping with 'policy' or 'file'", source=source, field=where)
    raw = dict(raw)
    name = raw.pop("name", None)
    if "file" in raw:
        file = raw.pop("file")
        if raw:
            raise InputError("unknown key next to 'file'", source=source, field=f"{where}.{sorted(raw)[0]}")
        path = Path(str(file))
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise InputError(f"placement file not found: {path}", source=source, field=f"{where}.file")
        return PlacementEntry(name=str(name or path.stem), file=path)
    if "policy" not in raw:
        raise InputError("needs 'policy' (one of " + ", ".join(policy_names()) + ") or 'file'",
                         source=source, field=where)
    policy = str(raw.pop("policy"))
    if policy not in policy_names():
        raise InputError(f"unknown policy {policy!r}; valid: {', '.join(policy_names())}", source=source,
                         field=f"{where}.policy")
    accepted = policy_options(policy)
    for key in raw:
        if key not in accepted:
            valid = ", ".join(accepted) or "none"
            raise InputError(f"policy {policy!r} has no option {key!r}; valid options: {valid}", source=source,
                             field=f"{where}.{key}")
        try:
            check_option(policy, key, raw[key])
        except TypeError as exc:
            raise InputError(str(exc), source=source, field=f"{where}.{key}") from None
    return PlacementEntry(name=str(name or policy), policy=policy, options=raw)


def parse_scenario(data: Any, source: str, base_dir: Path | None = None) -> Scenario:
    """Validate a scenario given as plain data (what YAML loads to)."""
    base_dir = base_dir or Path(".")
    if not isinstance(data, dict):
        raise InputError("a scenario must be a YAML mapping", source=source)
    for key in data:
        if key not in TOP_KEYS:
            raise InputError(f"unknown key; valid: {', '.join(sorted(TOP_KEYS))}", source=source, field=str(key))
    for key in ("clusters", "model", "workload", "placements"):
        if key not in data:
            raise InputError("missing", source=source, field=key)
    raw_clusters = data["clusters"]
    if not isinstance(raw_clusters, list) or not raw_clusters:
        raise InputError("must be a non-empty list", source=source, field="clusters")
    clusters = tuple(_cluster(c, i, source, base_dir) for i, c in enumerate(raw_clusters))
    names = [c.name for c in clusters]
    if len(set(names)) != len(names):
        raise InputError(f"cluster names must be unique, got {names}", source=source, field="clusters")
    try:
        model = ModelSpec(**data["model"]) if isinstance(data["model"], dict) else ModelSpec.model_validate(data["model"])
    except ValidationError as exc:
        raise _pydantic_error(exc, source, "model") from None
    try:
        workload = Workload.model_validate(data["workload"])
    except ValidationError as exc:
        raise _pydantic_error(exc, source, "workload") from None
    syn = workload.synthetic
    if syn is not None and syn.affinity >= 1 and syn.affinity_fanout < model.top_k:
        raise InputError(f"affinity 1 with affinity_fanout {syn.affinity_fanout} < top_k {model.top_k} cannot give "
                         "top_k distinct experts; lower affinity or raise affinity_fanout", source=source,
                         field="workload.synthetic.affinity_fanout")
    if workload.trace is not None and not workload.trace.file.is_absolute():
        workload = Workload(trace=workload.trace.model_copy(update={"file": base_dir / workload.trace.file}))
    if workload.trace is not None and not workload.trace.file.is_file():
        raise InputError(f"trace file not found: {workload.trace.file}", source=source, field="workload.trace.file")
    raw_placements = data["placements"]
    if not isinstance(raw_placements, list) or not raw_placements:
        raise InputError("must be a non-empty list", source=source, field="placements")
    placements = tuple(_placement(p, i, source, base_dir) for i, p in enumerate(raw_placements))
    pnames = [p.name for p in placements]
    dupes = sorted({n for n in pnames if pnames.count(n) > 1})
    if dupes:
        raise InputError(f"placement names must be unique; {dupes[0]!r} repeats (give each a 'name')",
                         source=source, field="placements")
    baseline = str(data.get("baseline", pnames[0]))
    if baseline not in pnames:
        raise InputError(f"{baseline!r} is not one of the placements: {', '.join(pnames)}", source=source,
                         field="baseline")
    try:
        engine = EngineConfig.model_validate(data.get("engine") or {})
    except ValidationError as exc:
        raise _pydantic_error(exc, source, "engine") from None
    name = str(data.get("name") or Path(source).stem)
    output = Path(str(data.get("output") or Path("results") / name))
    return Scenario(name=name, source=source, clusters=clusters, model=model, workload=workload,
                    placements=placements, baseline=baseline, engine=engine, output=output)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InputError("file not found", source=source) from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", source=source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"malformed YAML: {problem}", source=source, field=where) from None
    return parse_scenario(data, source, Path(path).parent)


def known_presets() -> list[str]:
    return preset_names()
