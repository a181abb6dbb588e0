"""SGLang's ``--init-expert-location`` JSON: ``{"physical_to_logical_map": [[...P ids] x num_hidden_layers]}``.

As ``sglang/srt/eplb/expert_location.py`` (``compute_initial_expert_location_metadata``, ``init_by_mapping``)
reads it: the file's keys are passed as keyword arguments, so the map is the only key; it has one row per decoder
layer (``num_hidden_layers``, dense layers included: DeepSeek-V3's model config for expert location counts all 61)
and ``P = E + --ep-num-redundant-experts`` columns, slot ``p`` on EP rank ``p // (P / ep_size)``. A dense layer's
row is what SGLang builds itself for ``trivial`` (``init_trivial``): slot ``p`` holds expert ``p % E``; SGLang
never routes through it. Launch with ``--init-expert-location FILE --ep-num-redundant-experts P-E``.
Ignored: the ``logical_count`` form of the same option (SGLang would then run its own EPLB at startup).
"""

from __future__ import annotations

import json

import numpy as np

from moesim.placement.export.layout import LayerLayout
from moesim.placement.export.slots import identity_map


def render(phy2log: np.ndarray, num_experts: int, layout: LayerLayout) -> str:
    rows = identity_map(layout.num_decoder_layers, num_experts, phy2log.shape[1])
    rows[list(layout.layer_ids)] = phy2log
    lines = ",\n".join(json.dumps([int(x) for x in row]) for row in rows)
    return '{"physical_to_logical_map": [\n' + lines + "\n]}\n"
