"""Sweep grids: a scenario's ``sweep:`` section and ``--grid key=v1,v2`` options -> validated scenario points.

A grid is a list of axes, each a dotted key into the scenario and the values it takes; the points are every
combination (the first axis varies slowest). A key is a path of names into the scenario's YAML, with three
shorthands for the lists:

- ``clusters[1].nodes``, ``placements[0].seed`` or ``placements[eplb].redundant_experts`` (a placement by name)
  name one entry; ``cluster.nodes`` sets the field on every cluster;
- ``placement.redundant_experts`` sets the option on every placement whose policy takes it (an error when none
  does);
- ``workload.tokens_per_gpu`` is ``workload.synthetic.tokens_per_gpu`` (or ``workload.trace.*``): a workload key
  that is not the workload's own goes into whichever source the scenario has.

Keys joined by commas move together (one axis): ``"cluster.nodes, placement.redundant_experts": [[1, 32], [8, 64]]``
(a ``sweep:`` section or :func:`sweep_points`; ``--grid`` takes one key each).

Every point is the scenario's data with its values written in, then validated by the scenario loader
(:func:`moesim.study.config.parse_scenario`) and the study's up-front checks (:func:`moesim.study.plan.check_study`:
fit, replicas, memory, time): a bad point is the loader's one-line error, naming the field, with the point appended.
A point is keyed by a digest of its resolved scenario (every validated field but the file name, output folder and
progress switch), so a resumed sweep recognises the points it has already simulated. Deliberately not here:
running the points (:mod:`moesim.study.sweep`) and writing anything.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moesim.errors import InputError
from moesim.loaders import load_yaml, read_yaml
from moesim.placement.registry import policy_names, policy_options
from moesim.study.config import Scenario, Workload, parse_scenario

MAX_POINTS = 100_000  # a grid larger than this is a typo, not a study
_WORKLOAD_OWN = set(Workload.model_fields)  # seq_len, prefix_len, kv_len, speculative, phase, the sources
_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\[\]]+\])*)$")


@dataclass(frozen=True)
class Axis:
    """One swept key and its values; ``origin`` says where it was given (``--grid`` or ``sweep``) for errors."""

    key: str
    values: tuple[Any, ...]
    origin: str

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys this axis sets: one, or several moving together (``"a, b": [[a1, b1], [a2, b2]]``)."""
        return tuple(k.strip() for k in self.key.split(","))


@dataclass(frozen=True)
class SweepPoint:
    """One combination of the axes' values, its validated scenario and the digest that keys it."""

    index: int
    values: tuple[tuple[str, Any], ...]  # (key, value) per axis, in axis order
    scenario: Scenario
    digest: str

    def label(self) -> str:
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in self.values)


def parse_grid_option(item: str) -> Axis:
    """``--grid KEY=V1,V2,...``: each value read as YAML (numbers, true/false, names); a single value fixes the
    key at every point."""
    key, sep, text = item.partition("=")
    key = key.strip()
    flag = f"--grid {key}" if key else "--grid"
    if not sep or not key or not text.strip():
        raise InputError(f"needs KEY=V1,V2,..., got {item!r}", field="--grid")
    _segments(key, flag)
    values = []
    for part in text.split(","):
        if not part.strip():
            raise InputError(f"an empty value in {text!r}", field=flag)
        try:
            values.append(load_yaml(part, None))
        except InputError as exc:
            raise InputError(f"value {part!r}: {exc.detail}", field=flag) from None
    return Axis(key, tuple(values), "--grid")


def section_axes(raw: Any, source: str) -> list[Axis]:
    """The axes of a scenario's ``sweep:`` section: a mapping of dotted keys to non-empty lists of values."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not raw:
        raise InputError("must be a mapping of dotted keys to lists of values, e.g. {cluster.nodes: [1, 2, 4]}",
                         source=source, field="sweep")
    axes = []
    for key, values in raw.items():
        axis = Axis(str(key), tuple(values) if isinstance(values, list) else (), "sweep")
        for k in axis.keys:
            _segments(k, f"sweep.{key}", source)
        if not isinstance(values, list) or not values:
            raise InputError("must be a non-empty list of values", source=source, field=f"sweep.{key}")
        if len(axis.keys) > 1 and any(not isinstance(v, list) or len(v) != len(axis.keys) for v in values):
            raise InputError(f"keys that move together take lists of {len(axis.keys)} values, one per key",
                             source=source, field=f"sweep.{key}")
        axes.append(axis)
    return axes


def sweep_points(data: dict[str, Any], sweep: dict[str, list[Any]], *, source: str = "<sweep>",
                 base_dir: str | Path = ".", check: bool = True) -> tuple[list[Axis], list[SweepPoint]]:
    """The Python form of a ``sweep:`` section: scenario ``data`` (a mapping, as the YAML loads) and the swept
    keys with their values, expanded and validated (:func:`expand`); paths resolve against ``base_dir``."""
    axes = section_axes(sweep, source)
    return axes, expand(data, axes, source, Path(base_dir), check=check)


def merge_axes(section: list[Axis], grid: list[Axis]) -> list[Axis]:
    """The section's axes, each replaced by a ``--grid`` axis of the same key, then the other ``--grid`` axes in
    the order given; a key given twice on the command line is an error."""
    seen: set[str] = set()
    for axis in grid:
        if axis.key in seen:
            raise InputError("given twice", field=f"--grid {axis.key}")
        seen.add(axis.key)
    given = {a.key: a for a in grid}
    merged = [given.pop(a.key, a) for a in section]
    return merged + list(given.values())


def _segments(key: str, field: str, source: str | None = None) -> list[str | int]:
    """``a.b[0].c[name]`` -> ["a", "b", 0, "c", "[name]"]: names, list indices, and entries by name."""
    out: list[str | int] = []
    for part in key.split("."):
        m = _SEGMENT.match(part.strip())
        if m is None:
            raise InputError(f"a key is names joined by dots, each with optional [index] or [name], got {key!r}",
                             source=source, field=field)
        out.append(m.group(1))
        for inner in re.findall(r"\[([^\[\]]+)\]", m.group(2)):
            out.append(int(inner) if inner.strip().isdigit() else f"[{inner.strip()}]")
    return out


def _as_mapping(node: Any, head: str) -> Any:
    """A list entry given as a bare name, as the mapping it stands for (a preset or a policy)."""
    if isinstance(node, str):
        return {"policy": node} if head == "placements" else {"preset": node}
    return node


def _set_path(node: Any, path: list[str | int], value: Any, head: str, field: str) -> None:
    """Write ``value`` at ``path`` inside ``node`` (mappings made on the way); ``head`` is the top-level key."""
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(part, int) or part.startswith("["):
            if not isinstance(node, list):
                raise InputError("indexes something that is not a list", field=field)
            index = _entry_index(node, part, field)
            if last:
                node[index] = value
                return
            node[index] = _as_mapping(node[index], head)
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise InputError(f"{part!r} is inside something that is not a mapping", field=field)
        if last:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = {}
        if head == "model" and i == 0 and isinstance(node[part], str):
            node[part] = {"preset": node[part]}
        node = node[part]


def _entry_index(items: list[Any], part: str | int, field: str) -> int:
    if isinstance(part, int):
        if part >= len(items):
            raise InputError(f"index {part} is past the list's {len(items)} entries", field=field)
        return part
    name = part[1:-1]
    for i, item in enumerate(items):
        if isinstance(item, str) and item == name:
            return i
        if isinstance(item, dict) and name in (item.get("name"), item.get("policy") if "name" not in item else None):
            return i
    raise InputError(f"no entry named {name!r}", field=field)


def apply_value(data: dict[str, Any], key: str, value: Any, field: str) -> None:
    """Write one swept value into scenario data (in place), expanding the shorthands of the module docstring."""
    path = _segments(key, field)
    head = path[0]
    if head == "cluster" and len(path) > 1:
        clusters = data.get("clusters")
        if not isinstance(clusters, list) or not clusters:
            raise InputError("the scenario has no clusters list", field=field)
        for i in range(len(clusters)):
            _set_path(data, ["clusters", i, *path[1:]], value, "clusters", field)
        return
    if head == "placement" and len(path) == 2 and isinstance(path[1], str):
        _set_option(data, path[1], value, field)
        return
    if head == "workload" and len(path) > 1 and path[1] not in _WORKLOAD_OWN:
        workload = data.get("workload")
        source = next((s for s in ("synthetic", "trace") if isinstance(workload, dict) and s in workload), None)
        if source is None:
            raise InputError("the scenario's workload has neither 'synthetic' nor 'trace'", field=field)
        path = ["workload", source, *path[1:]]
    _set_path(data, list(path), value, str(head), field)


def _set_option(data: dict[str, Any], option: str, value: Any, field: str) -> None:
    """Set a placement option on every placement whose policy takes it."""
    entries = data.get("placements")
    hit = False
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        entry = _as_mapping(entry, "placements")
        policy = entry.get("policy") if isinstance(entry, dict) else None
        if isinstance(policy, str) and policy in policy_names() and option in policy_options(policy):
            entries[i] = {**entry, option: value}  # type: ignore[index]
            hit = True
    if not hit:
        raise InputError(f"no placement of the scenario takes the option {option!r}", field=field)


def point_digest(scenario: Scenario) -> str:
    """A digest of everything a point's results depend on: the validated scenario, less its file name, output
    folder and progress switch (16 hex digits of SHA-256)."""
    data = scenario.model_dump(mode="json", exclude={"source": True, "output": True, "engine": {"progress"}})
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def grid_size(axes: list[Axis]) -> int:
    """Points in the grid (before points that resolve to the same scenario are merged)."""
    count = 1
    for axis in axes:
        count *= len(axis.values)
    return count


def expand(data: dict[str, Any], axes: list[Axis], source: str, base_dir: Path, *, check: bool = True,
           progress: Callable[[], object] | None = None) -> list[SweepPoint]:
    """Every point of the grid over scenario ``data`` (its ``sweep`` section left out), validated; ``check``
    also runs the study's up-front checks (fit, memory, time) on each; ``progress()`` is called after each.
    Points with the same resolved scenario (a value written twice) are kept once."""
    from moesim.study.plan import check_study

    count = grid_size(axes)
    if count > MAX_POINTS:
        raise InputError(f"the grid has {count} points; at most {MAX_POINTS}", source=source, field="sweep")
    base = {k: v for k, v in data.items() if k != "sweep"}
    points: list[SweepPoint] = []
    seen: set[str] = set()
    for combo in itertools.product(*(a.values for a in axes)):
        values = tuple(pair for a, v in zip(axes, combo)
                       for pair in (zip(a.keys, v) if len(a.keys) > 1 else [(a.key, v)]))
        label = ", ".join(f"{k}={json.dumps(v)}" for k, v in values)
        point = copy.deepcopy(base)
        try:
            for axis, value in zip(axes, combo):
                field = f"--grid {axis.key}" if axis.origin == "--grid" else f"sweep.{axis.key}"
                for key, v in (zip(axis.keys, value) if len(axis.keys) > 1 else [(axis.key, value)]):
                    apply_value(point, key, v, field)
            scenario = parse_scenario(point, source, base_dir)
            if check:
                check_study(scenario)
        except InputError as exc:
            raise InputError(f"{exc.detail} (sweep point {label})", source=exc.source or source,
                             field=exc.field) from None
        digest = point_digest(scenario)
        if progress is not None:
            progress()
        if digest not in seen:
            seen.add(digest)
            points.append(SweepPoint(len(points), values, scenario, digest))
    return points


def load_grid(path: str | Path, grid: list[str] | None = None, *, check: bool = True,
              progress: Callable[[int], Callable[[], object]] | None = None) -> tuple[list[Axis], list[SweepPoint]]:
    """A scenario file's sweep: its ``sweep:`` section merged with ``--grid`` items, expanded and validated;
    ``progress(count)`` gives what to call after each point is checked."""
    source = str(path)
    data = read_yaml(path, source)
    if not isinstance(data, dict):
        raise InputError("a scenario must be a YAML mapping", source=source)
    axes = merge_axes(section_axes(data.get("sweep"), source), [parse_grid_option(g) for g in grid or []])
    if not axes:
        raise InputError("nothing to sweep: give --grid KEY=V1,V2,... or a 'sweep:' section (or --redundant and "
                         "--every for the rebalancing trade-off)", source=source, field="sweep")
    step = progress(grid_size(axes)) if progress is not None else None
    return axes, expand(data, axes, source, Path(path).parent, check=check, progress=step)


def check_sweep(raw: Any, source: str) -> None:
    """A ``sweep`` section's shape (``moesim sweep`` expands it: moesim.study.grid); other commands run the
    scenario as written, without it."""
    if raw is None:
        return
    if not isinstance(raw, dict) or not raw:
        raise InputError("must be a mapping of dotted keys to lists of values, e.g. {cluster.nodes: [1, 2, 4]}",
                         source=source, field="sweep")
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise InputError("must be a non-empty list of values", source=source, field=f"sweep.{key}")
