"""Placements in the serving engines' own formats: a table of writers, one module per engine.

``export_placement(placement, to, path, layout)`` writes ``placement`` for engine ``to`` (a name in
:data:`WRITERS`): SGLang's ``--init-expert-location`` JSON, TensorRT-LLM's MoE load-balancer YAML, vLLM's static
map JSONL (an unmerged proposal, #41141), vllm-ascend's expert map JSON, or moesim's own ``moesim.placement/1``.
Each engine module says what its format holds and how the engine reads it; :mod:`.slots` lays a placement into
the physical slots the engines share and refuses what they cannot express; :mod:`.layout` maps MoE layers to
decoder layers (the engines index layers three different ways). Writes are atomic, and an existing file is
replaced only when it begins as this writer's files begin.
Ignored: the engines' launch flags other than the map (the summary line names the ones that must match it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.fileio import atomic_write, check_output_file, starts_with
from moesim.placement.export import sglang, trtllm, vllm, vllm_ascend
from moesim.placement.export.layout import LayerLayout
from moesim.placement.export.slots import identity_map, placement_from_map, slot_map
from moesim.placement.format import Placement, is_placement_file, save_placement


@dataclass(frozen=True)
class Writer:
    name: str
    title: str  # the engine and the file, for messages
    owned: Callable[[Path], bool]  # whether an existing file is one this writer wrote (it may be replaced)
    render: Callable[[Placement, np.ndarray, LayerLayout], str] | None  # None: moesim's own JSON
    launch: str  # how the engine is pointed at the file; {file}, {redundant} are filled in
    file_name: str  # what moesim plan calls the file in its folder
    proposal: str | None = None  # the unmerged proposal the format follows, if any


def _header(p: Placement) -> str:
    return (f"moesim placement ({p.policy or 'no policy'}), {p.num_layers} MoE layers x {p.num_experts} experts "
            f"on {p.num_ranks} EP ranks")


WRITERS: tuple[Writer, ...] = (
    Writer("sglang", "SGLang --init-expert-location JSON", starts_with(b'{"physical_to_logical_map": [\n'),
           lambda p, m, lay: sglang.render(m, p.num_experts, lay),
           "--init-expert-location {file} --ep-num-redundant-experts {redundant}", "expert_location.json"),
    Writer("trtllm", "TensorRT-LLM MoE load-balancer YAML", starts_with(b"# moesim placement"),
           lambda p, m, lay: trtllm.render(m, p.num_experts, lay, _header(p)),
           "moe_config: {{backend: WideEP, load_balancer: {file}}} (EP size = the placement's ranks)",
           "moe_load_balancer.yaml"),
    Writer("vllm", "vLLM static EPLB map JSONL", starts_with(b'{"record_type": "eplb_initial_mapping"'),
           lambda p, m, lay: vllm.render(m, p.num_experts),
           '--enable-eplb --eplb-config \'{{"num_redundant_experts": {redundant}, "initial_mapping_path": '
           '"{file}"}}\'', "eplb_initial_mapping.jsonl", proposal=vllm.PROPOSAL),
    Writer("vllm-ascend", "vllm-ascend expert map JSON", starts_with(b'{\n "moe_layer_count"'),
           lambda p, m, lay: vllm_ascend.render(m, p.num_ranks),
           "expert_map_path: {file} (in --additional-config or eplb_config, by version)", "expert_map.json"),
    Writer("moesim", "moesim placement JSON", is_placement_file, None,
           "placements: [{{name: mine, file: {file}}}] in a scenario", "placement.json"),
)


def writer_names() -> list[str]:
    return [w.name for w in WRITERS]


def get_writer(name: str, field: str = "--to") -> Writer:
    for w in WRITERS:
        if w.name == name:
            return w
    raise InputError(f"unknown engine {name!r}; valid: {', '.join(writer_names())}", field=field)


def check_export_target(path: str | os.PathLike[str], to: str) -> Path:
    """Before any work: ``path`` can take ``to``'s file (an existing one only if this writer wrote it)."""
    w = get_writer(to)
    return check_output_file(path, owned=w.owned, what=f"a {w.title} file moesim wrote")


@dataclass(frozen=True)
class Exported:
    path: Path
    num_slots: int  # P, per layer (0 for moesim's own format)
    redundant: int  # P - E
    launch: str  # how to point the engine at the file
    proposal: str | None

    def summary(self, title: str) -> str:
        slots = f", {self.num_slots} slots per layer ({self.redundant} redundant)" if self.num_slots else ""
        note = f"; follows {self.proposal}" if self.proposal else ""
        return f"wrote {self.path}: {title}{slots}{note}\n  use it with: {self.launch}"


def render_placement(placement: Placement, to: str, layout: LayerLayout | None = None,
                     source: str | None = None) -> tuple[str, np.ndarray]:
    """(file text, physical_to_logical map) of ``placement`` for engine ``to``; InputError when the engine
    cannot express it. ``layout`` defaults to MoE layers only (no dense layers)."""
    w = get_writer(to)
    if w.render is None:
        raise ValueError("moesim's own format is written by save_placement")
    layout = layout or LayerLayout.moe_only(placement.num_layers)
    layout.check(placement.num_layers, source)
    phy2log = slot_map(placement, w.title, source)
    return w.render(placement, phy2log, layout), phy2log


def export_placement(placement: Placement, to: str, path: str | os.PathLike[str], layout: LayerLayout | None = None,
                     source: str | None = None) -> Exported:
    """Write ``placement`` as engine ``to``'s file at ``path`` (atomic); see :func:`render_placement`."""
    w = get_writer(to)
    if w.render is None:
        written = save_placement(placement, path)
        return Exported(written, 0, 0, w.launch.format(file=written), None)
    text, phy2log = render_placement(placement, to, layout, source)
    written = atomic_write(path, lambda fh: fh.write(text))
    P = phy2log.shape[1]
    redundant = P - placement.num_experts
    return Exported(written, P, redundant, w.launch.format(file=written, redundant=redundant), w.proposal)


__all__ = ["WRITERS", "Exported", "LayerLayout", "Writer", "check_export_target", "export_placement",
           "get_writer", "identity_map", "placement_from_map", "render_placement", "slot_map", "writer_names"]
