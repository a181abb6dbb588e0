"""vLLM's static EPLB map, as proposed in vllm-project/vllm#41141 (**an unmerged proposal**: names may change).

One JSONL line, as that PR's ``tools/eplb/generate_static_mapping.py`` writes it and ``EplbState`` loads it
(``initial_mapping_path``): ``{"record_type": "eplb_initial_mapping", "version": 1, "num_redundant_experts": R,
"num_slots": P, "initial_global_assignments": {"0": [P ids], ...}}``, keyed by **MoE-layer index** as a string
(0 .. L_moe - 1, dense layers not counted), ``num_slots = E + R`` matching ``--eplb-config``'s
``num_redundant_experts``, every logical expert in every layer. Merged vLLM has no placement-file import.
Ignored: the PR's later revision that renames the config keys (``enable_online``, ``write_stats_path``).
"""

from __future__ import annotations

import json

import numpy as np

PROPOSAL = "vLLM #41141, an unmerged proposal"


def render(phy2log: np.ndarray, num_experts: int) -> str:
    record = {"record_type": "eplb_initial_mapping", "version": 1,
              "num_redundant_experts": int(phy2log.shape[1] - num_experts), "num_slots": int(phy2log.shape[1]),
              "initial_global_assignments": {str(l): [int(x) for x in row] for l, row in enumerate(phy2log)}}
    return json.dumps(record) + "\n"
