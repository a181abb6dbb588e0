"""Disaggregated serving: a prefill pool and a decode pool of GPUs in one scenario, each run as a study of its own.

A scenario with a ``pools`` section (instead of ``clusters``, ``workload`` and ``placements``) describes one
deployment whose prefill and decode run on separate GPUs (DeepSeek's inference system, SGLang and Dynamo PD
disaggregation)::

    name: ...
    model: {preset: deepseek-v3}          # shared by both pools
    engine: {moe_kernels: fused}          # shared; each pool's own engine keys override it
    requests: {input_tokens: 4383, output_tokens: 1211, cache_hit_rate: 0.563}   # optional: the request mix
    pools:
      prefill: {cluster: {preset: h800, nodes: 4}, workload: {seq_len: 4096, synthetic: {...}},
                placements: [...], engine: {a2a: hierarchical}}
      decode:  {cluster: {preset: h800, nodes: 18}, workload: {kv_len: 4989, synthetic: {...}},
                placements: [...], engine: {a2a: low_latency}}

Each pool becomes an ordinary :class:`~moesim.study.config.Scenario` (one cluster; its own EP degree, workload,
placements with their EPLB options, and engine; ``model`` keys in a pool override the shared ones) and runs
through :func:`~moesim.study.run_study`, the one engine. The prefill pool's workload must give ``seq_len``, the
decode pool's ``kv_len``. The combined figures are :func:`moesim.metrics.serving.disaggregated_figures` of each
pool's fastest placement. Deliberately ignored: the KV-cache transfer from prefill to decode GPUs, request
arrival and queueing, and pools that share GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from moesim.errors import InputError
from moesim.fileio import safe_name
from moesim.hardware.presets import deep_merge
from moesim.loaders import check_values, read_yaml
from moesim.metrics.serving import RequestMix, disaggregated_figures
from moesim.study.config import Scenario, parse_scenario
from moesim.study.plan import prepare
from moesim.study.runner import Run, StudyResult, run_study

POOLS = {"prefill": "seq_len", "decode": "kv_len"}  # each pool, and the workload key that makes it that phase
TOP_KEYS = {"name", "model", "engine", "requests", "pools", "output"}
POOL_KEYS = {"cluster", "workload", "placements", "baseline", "engine", "model"}
MIX_KEYS = {"input_tokens", "output_tokens", "cache_hit_rate"}


@dataclass(frozen=True)
class DisaggScenario:
    """A disaggregated deployment: one scenario per pool (``prefill``, ``decode``) and the request mix."""

    name: str
    source: str
    pools: dict[str, Scenario]
    mix: RequestMix | None
    output: Path


@dataclass
class DisaggResult:
    scenario: DisaggScenario
    pools: dict[str, StudyResult]
    served: dict[str, Run]  # each pool's fastest placement, which the combined figures take
    figures: dict[str, Any]


def is_disaggregated(data: Any) -> bool:
    return isinstance(data, dict) and "pools" in data


def _mapping(raw: Any, source: str, field: str, keys: set[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``raw`` as a mapping of ``keys`` with the ``required`` ones; errors name ``field.KEY`` (``KEY`` at the top)."""
    at = (lambda key: f"{field}.{key}" if field else str(key))  # noqa: E731
    if not isinstance(raw, dict):
        raise InputError(f"must be a mapping with keys {', '.join(sorted(keys))}", source=source, field=field or None)
    for key in raw:
        if key not in keys:
            raise InputError(f"unknown key; valid: {', '.join(sorted(keys))}", source=source, field=at(key))
    for key in required:
        if key not in raw:
            raise InputError("missing", source=source, field=at(key))
    return raw


def _mix(raw: Any, source: str) -> RequestMix | None:
    if raw is None:
        return None
    raw = _mapping(raw, source, "requests", MIX_KEYS, ("input_tokens", "output_tokens"))
    for key, value in raw.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            0 <= value < 1 if key == "cache_hit_rate" else value > 0)
        if not ok:
            want = "a fraction from 0 to below 1" if key == "cache_hit_rate" else "a number > 0 (tokens per request)"
            raise InputError(f"must be {want}, got {value!r}", source=source, field=f"requests.{key}")
    return RequestMix(float(raw["input_tokens"]), float(raw["output_tokens"]), float(raw.get("cache_hit_rate", 0.0)))


def _as_model_mapping(raw: Any) -> dict[str, Any]:
    return {"preset": raw} if isinstance(raw, str) else dict(raw) if isinstance(raw, dict) else {}


def _pool(data: dict[str, Any], pool: str, source: str, base_dir: Path) -> Scenario:
    """One pool as a scenario of its own; its errors name ``pools.POOL.KEY`` (or the shared key they come from)."""
    where = f"pools.{pool}"
    raw = _mapping(data["pools"][pool], source, where, POOL_KEYS, ("cluster", "workload", "placements"))
    if isinstance(raw["cluster"], list):
        raise InputError("one cluster per pool (a preset name or a mapping), not a list", source=source,
                         field=f"{where}.cluster")
    model = data.get("model")
    if "model" in raw:
        model = deep_merge(_as_model_mapping(model), _as_model_mapping(raw["model"]))
    for key, section in (("engine", data.get("engine")), (f"{where}.engine", raw.get("engine"))):
        if section is not None and not isinstance(section, dict):
            raise InputError("must be a mapping of engine settings", source=source, field=key)
    engine = deep_merge(dict(data.get("engine") or {}), dict(raw.get("engine") or {}))
    pool_data = {"name": f"{data.get('name') or Path(source).stem}/{pool}", "clusters": [raw["cluster"]],
                 "model": model, "workload": raw["workload"], "placements": raw["placements"], "engine": engine,
                 **({"baseline": raw["baseline"]} if "baseline" in raw else {})}
    if model is None:
        raise InputError("missing (shared by the pools, or in each pool)", source=source, field="model")
    try:
        scenario = parse_scenario(pool_data, source, base_dir)
    except InputError as exc:
        raise _located(exc, raw, where, source) from None
    if getattr(scenario.workload, POOLS[pool]) is None:
        raise InputError(f"a {pool} pool's workload needs {POOLS[pool]} (" + (
            "the prompts' length" if pool == "prefill" else "the KV-cache length") + ")", source=source,
            field=f"{where}.workload.{POOLS[pool]}")
    return scenario


def _located(exc: InputError, raw: dict[str, Any], where: str, source: str) -> InputError:
    """An error of a pool's scenario, its field named as the disaggregated file names it: a ``model`` or ``engine``
    key the pool sets is the pool's, any other the shared section's."""
    if exc.source != source or not exc.field:
        return exc
    field = exc.field
    head, _, rest = field.partition(".")
    if field.startswith("clusters[0]"):
        field = f"{where}.cluster{field.removeprefix('clusters[0]')}"
    elif head in ("model", "engine"):
        own = raw.get(head)
        if isinstance(own, dict) and rest.split(".")[0].split("[")[0] in own:
            field = f"{where}.{field}"
    elif not field.startswith("pools."):
        field = f"{where}.{field}"
    return InputError(exc.detail, source=exc.source, field=field)


def parse_disaggregated(data: Any, source: str, base_dir: Path | None = None) -> DisaggScenario:
    """Validate a disaggregated scenario given as plain data (what YAML loads to)."""
    base_dir = base_dir or Path(".")
    check_values(data, source, plain=False)
    data = _mapping(data, source, "", TOP_KEYS, ("pools",))
    _mapping(data["pools"], source, "pools", set(POOLS), tuple(POOLS))
    scenarios = {p: _pool(data, p, source, base_dir) for p in POOLS}
    name = str(data.get("name") or Path(source).stem)
    output = Path(str(data.get("output") or Path("results") / safe_name(name)))
    return DisaggScenario(name=name, source=source, pools=scenarios, mix=_mix(data.get("requests"), source),
                          output=output)


def load_any(path: str | Path) -> Union[Scenario, DisaggScenario]:
    """A scenario file: a disaggregated one (with ``pools``) or a plain one."""
    data = read_yaml(path, str(path))
    if is_disaggregated(data):
        return parse_disaggregated(data, str(path), Path(path).parent)
    return parse_scenario(data, str(path), Path(path).parent)


def check_disaggregated(scenario: DisaggScenario) -> None:
    """Every check of both pools (:func:`moesim.study.prepare` without building), before either runs."""
    for pool in scenario.pools.values():
        prepare(pool, build=False)


def run_disaggregated(scenario: DisaggScenario, *, progress: bool | None = None) -> DisaggResult:
    """Both pools checked, then each simulated as a study; the combined figures of each pool's fastest placement."""
    check_disaggregated(scenario)
    results = {name: run_study(pool, progress=progress) for name, pool in scenario.pools.items()}
    served = {name: min(r.runs, key=lambda run: run.metrics.e2e_ms["mean"]) for name, r in results.items()}
    prefill, decode = served["prefill"].metrics.serving, served["decode"].metrics.serving
    assert prefill is not None and decode is not None
    figures = {"prefill_placement": served["prefill"].name, "decode_placement": served["decode"].name,
               **disaggregated_figures(prefill, decode, scenario.mix)}
    return DisaggResult(scenario=scenario, pools=results, served=served, figures=figures)
