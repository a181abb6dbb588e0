"""Reading an engine's map back as a placement: the user's current map, for ``moesim plan --current``.

Recognised by content: moesim's ``moesim.placement/1`` JSON, SGLang's ``{"physical_to_logical_map": ...}`` (one
row per decoder layer: the MoE layers' rows are kept), vLLM #41141's ``eplb_initial_mapping`` JSONL line (keys are
MoE-layer indices), vllm-ascend's ``{"moe_layer_count", "layer_list"}`` and TensorRT-LLM's load-balancer YAML
(keys are decoder-layer indices of the MoE layers). Each map is checked against the slot convention of
:mod:`.slots` (every expert in every layer, ids in range, slots a multiple of the ranks); a problem names the
file and the field. Ignored: SGLang's ``logical_count`` form (counts, not a map: SGLang runs its own EPLB on it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.fileio import head
from moesim.loaders import read_json, read_yaml
from moesim.placement.export.layout import LayerLayout
from moesim.placement.export.slots import placement_from_map
from moesim.placement.format import Placement, is_placement_file, load_placement


def _rows(value: Any, src: str, field: str) -> np.ndarray:
    ok = isinstance(value, list) and value and all(
        isinstance(r, list) and r and all(isinstance(x, int) and not isinstance(x, bool) for x in r) for r in value)
    if not ok or len({len(r) for r in value}) != 1:
        raise InputError("must be a non-empty list of equally long lists of expert ids", source=src, field=field)
    return np.array(value, dtype=np.int64)


def _keyed(table: Any, keys: list[Any], src: str, field: str) -> np.ndarray:
    if not isinstance(table, dict):
        raise InputError("must be a mapping of layer to slot list", source=src, field=field)
    missing = [k for k in keys if k not in table]
    if missing:
        raise InputError(f"has no layer {missing[0]!r} (the model's MoE layers are {keys[:4]}...)", source=src,
                         field=field)
    return _rows([table[k] for k in keys], src, field)


def _sglang(raw: dict, layout: LayerLayout, src: str) -> np.ndarray:
    rows = _rows(raw["physical_to_logical_map"], src, "physical_to_logical_map")
    if rows.shape[0] != layout.num_decoder_layers:
        raise InputError(f"has {rows.shape[0]} rows, the model {layout.num_decoder_layers} decoder layers (SGLang "
                         "lists every decoder layer)", source=src, field="physical_to_logical_map")
    return rows[list(layout.layer_ids)]


def _ascend(raw: dict, src: str) -> np.ndarray:
    layers = raw.get("layer_list")
    if not isinstance(layers, list):
        raise InputError("must be a list", source=src, field="layer_list")
    rows = []
    for i, layer in enumerate(layers):
        devices = layer.get("device_list") if isinstance(layer, dict) else None
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise InputError("must be a list of devices", source=src, field=f"layer_list[{i}].device_list")
        devices = sorted(devices, key=lambda d: d.get("device_id", 0))
        rows.append([e for d in devices for e in (d.get("device_expert") or [])])
    return _rows(rows, src, "layer_list")


def _jsonl_record(path: str | os.PathLike[str]) -> Any:
    """The ``eplb_initial_mapping`` line of a JSONL file (vLLM's loader takes the first such record)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    rec = json.loads(line)
                    if isinstance(rec, dict) and rec.get("record_type") == "eplb_initial_mapping":
                        return rec
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read it as JSONL ({exc})", source=str(path)) from None
    raise InputError("holds no eplb_initial_mapping record", source=str(path))


def read_map(path: str | os.PathLike[str], layout: LayerLayout, num_experts: int, num_ranks: int) -> Placement:
    """The placement an engine map (or a moesim placement file) at ``path`` holds."""
    src = str(path)
    if is_placement_file(path):
        return load_placement(path)
    start = head(Path(path), 64).lstrip()
    if start.startswith(b"{"):
        raw = _jsonl_record(path) if start.startswith(b'{"record_type"') else read_json(path)
        if not isinstance(raw, dict):
            raise InputError("must be a JSON object", source=src)
        if "physical_to_logical_map" in raw:
            rows = _sglang(raw, layout, src)
        elif raw.get("record_type") == "eplb_initial_mapping":
            rows = _keyed(raw.get("initial_global_assignments"), [str(l) for l in range(layout.num_moe_layers)], src,
                          "initial_global_assignments")
        elif "layer_list" in raw:
            rows = _ascend(raw, src)
        else:
            raise InputError("not an engine map moesim reads (SGLang physical_to_logical_map, vLLM "
                             "eplb_initial_mapping, vllm-ascend layer_list, moesim placement)", source=src)
    else:
        raw = read_yaml(path, src)
        if not isinstance(raw, dict) or "initial_global_assignments" not in raw:
            raise InputError("not an engine map moesim reads (TensorRT-LLM YAML needs initial_global_assignments)",
                             source=src)
        rows = _keyed(raw["initial_global_assignments"], list(layout.layer_ids), src, "initial_global_assignments")
    if rows.shape[0] != layout.num_moe_layers:
        raise InputError(f"has {rows.shape[0]} MoE layers, the model {layout.num_moe_layers}", source=src)
    return placement_from_map(rows, num_experts, num_ranks, "current map", source=src)
