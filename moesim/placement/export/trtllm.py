"""TensorRT-LLM's MoE load-balancer YAML (``moe_config: {backend: WideEP, load_balancer: FILE}``).

As ``examples/wide_ep/ep_load_balancer/README.md`` and ``MoeLoadBalancerConfig`` give it: ``num_slots`` (P),
``initial_global_assignments`` keyed by the **decoder-layer index** of each MoE layer (3 .. 60 for DeepSeek-R1;
dense layers have no row), each a list of ``num_slots`` logical expert ids with every ``num_slots / ep_size``
consecutive slots on one rank, and ``layer_updates_per_iter: 0`` (a static map: no online rebalancing). Lists are
written in flow style as ``generate_eplb_config.py`` writes them. Only these three keys: the config model is
strict, and whether it accepts the co-occurrence script's extra ``ep_size`` is unconfirmed.
Ignored: online balancing (``layer_updates_per_iter > 0``), which replaces this map as it runs.
"""

from __future__ import annotations

import json

import numpy as np

from moesim.placement.export.layout import LayerLayout


def render(phy2log: np.ndarray, num_experts: int, layout: LayerLayout, header: str) -> str:
    lines = [f"# {header}", f"num_slots: {phy2log.shape[1]}", "layer_updates_per_iter: 0",
             "initial_global_assignments:"]
    lines += [f"  {layer}: {json.dumps([int(x) for x in row])}" for layer, row in zip(layout.layer_ids, phy2log)]
    return "\n".join(lines) + "\n"
