"""vllm-ascend's expert map JSON (``expert_map_path``; written by its ``expert_map_record_path``).

``{"moe_layer_count": L, "layer_list": [{"layer_id": l, "device_count": R, "device_list": [{"device_id": r,
"device_expert": [global logical ids in local-slot order]}, ...]}, ...]}``, ``layer_id`` counting MoE layers
from 0 (as vllm-ascend's own map generator writes it), replicas expressed by listing an id on several devices.
Every device lists the same number of experts here (the slot convention; see :mod:`.slots`).
Ignored: where the option sits (``--additional-config`` or ``eplb_config``, by version), and vllm-ascend's
dynamic EPLB, which rewrites the map as it runs.
"""

from __future__ import annotations

import json

import numpy as np


def render(phy2log: np.ndarray, num_ranks: int) -> str:
    L, P = phy2log.shape
    per = P // num_ranks
    layers = [{"layer_id": l, "device_count": num_ranks,
               "device_list": [{"device_id": r, "device_expert": [int(x) for x in phy2log[l, r * per:(r + 1) * per]]}
                               for r in range(num_ranks)]} for l in range(L)]
    return json.dumps({"moe_layer_count": L, "layer_list": layers}, indent=1) + "\n"
