"""Cluster presets: the machines MoE serving runs on, with the figure behind every number.

A preset is a plain nested dict of :class:`~moesim.hardware.spec.ClusterSpec` fields; scenarios deep-merge
their overrides into it before validation, so a preset can never hold a value a YAML file could not.

Efficiency defaults come from measurements on 2x H200 (../shared/calibration, summarised in the README):
773 TFLOP/s on an 8k bf16 matmul, expert FFN curves of about 0.63 x peak at large token counts and
about 30 us of fixed cost per FFN, 366 GB/s NVLink p2p of 450 GB/s line rate. Where a machine was not
measured, the H200 efficiencies are assumed and marked so.
"""

from __future__ import annotations

import copy
from typing import Any

# ConnectX-7 NDR: 400 Gb/s per port; 46-49 GB/s achieved in nccl-tests => efficiency 0.94.
_CX7_400G = {
    "nic_Gbps": 400.0,
    "nic_efficiency": 0.94,
    "latency_us": 3.0,  # RDMA write, NIC to NIC through one switch (NCCL NET base 2.7-4.0 us)
    "hop_latency_us": 0.5,
    "pcie_GBps": 64.0,  # PCIe Gen5 x16, per direction
    "rail_optimized": True,
    "oversubscription": 1.0,
}

# H200 measurements (../shared/calibration/expert_ffn_h200.json): fitted by hand to the FFN curves of five
# expert shapes: time = max(floor, roofline + overhead); small experts bottom out at 0.053-0.061 ms.
_MEASURED_H200_EFFICIENCY = {"compute_efficiency": 0.63, "hbm_efficiency": 0.80, "ffn_overhead_us": 30.0,
                             "ffn_floor_us": 55.0}

# NVLink 4: 18 links x 25 GB/s = 450 GB/s per direction; 366 GB/s measured p2p on H200 => 0.81.
_NVLINK4 = {"name": "nvlink4", "GBps": 450.0, "efficiency": 0.81, "latency_us": 2.0}

PRESETS: dict[str, dict[str, Any]] = {
    # NVIDIA DGX H100: 8x H100 SXM5 (989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s), 4 NVSwitch,
    # 8x ConnectX-7 400 Gb/s, one per GPU (DGX H100 datasheet). Efficiencies assumed from the H200.
    "dgx-h100": {
        "name": "dgx-h100",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": {"name": "H100-SXM", "bf16_tflops": 989.0, "hbm_GBps": 3350.0, "memory_GB": 80.0,
                **_MEASURED_H200_EFFICIENCY},
        "nvlink": dict(_NVLINK4),
        "network": dict(_CX7_400G),
        "a2a_launch_us": 35.0,  # NCCL alltoall floor: about 0.037 ms per call measured on 2x H200
    },
    # NVIDIA HGX H200: H200 SXM (same compute as H100, 141 GB HBM3e at 4.8 TB/s), NVLink 4, one
    # ConnectX-7 400 Gb/s per GPU. Efficiencies measured (../shared/calibration).
    "hgx-h200": {
        "name": "hgx-h200",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": {"name": "H200-SXM", "bf16_tflops": 989.0, "hbm_GBps": 4800.0, "memory_GB": 141.0,
                **_MEASURED_H200_EFFICIENCY},
        "nvlink": dict(_NVLINK4),
        "network": dict(_CX7_400G),
        "a2a_launch_us": 35.0,
    },
    # H800 (DeepEP's testbed): H100 compute and memory, NVLink cut to 8 links = 200 GB/s per direction,
    # "about 160 GB/s" achievable per DeepEP's README => 0.8; one CX7 400 Gb/s per GPU.
    "h800": {
        "name": "h800",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": {"name": "H800-SXM", "bf16_tflops": 989.0, "hbm_GBps": 3350.0, "memory_GB": 80.0,
                **_MEASURED_H200_EFFICIENCY},
        "nvlink": {"name": "nvlink4-8links", "GBps": 200.0, "efficiency": 0.80, "latency_us": 2.0},
        "network": dict(_CX7_400G),
        "a2a_launch_us": 35.0,
    },
    # NVIDIA DGX A100: A100 SXM4 80 GB (312 TFLOP/s bf16, 2.0 TB/s), 6 NVSwitch, NVLink 3
    # (600 GB/s bidirectional = 300 per direction), 8x HDR 200 Gb/s, one per GPU (DGX A100 datasheet).
    "dgx-a100": {
        "name": "dgx-a100",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": {"name": "A100-SXM-80GB", "bf16_tflops": 312.0, "hbm_GBps": 2039.0, "memory_GB": 80.0,
                **_MEASURED_H200_EFFICIENCY},
        "nvlink": {"name": "nvlink3", "GBps": 300.0, "efficiency": 0.81, "latency_us": 2.0},
        "network": {**_CX7_400G, "nic_Gbps": 200.0},
        "a2a_launch_us": 35.0,
    },
    # NVIDIA GB200 NVL72: 72 Blackwell GPUs in one NVLink 5 domain (1.8 TB/s bidirectional per GPU =
    # 900 GB/s per direction); about 2.5 PFLOP/s dense bf16, 186 GB HBM3e at 8 TB/s per GPU
    # (GB200 NVL72 datasheet: 180 PFLOP/s dense FP16/BF16 per rack); one CX7 400 Gb/s per GPU between racks.
    "gb200-nvl72": {
        "name": "gb200-nvl72",
        "nodes": 1,
        "gpus_per_node": 72,
        "gpu": {"name": "B200-GB200", "bf16_tflops": 2500.0, "hbm_GBps": 8000.0, "memory_GB": 186.0,
                **_MEASURED_H200_EFFICIENCY},
        "nvlink": {"name": "nvlink5", "GBps": 900.0, "efficiency": 0.81, "latency_us": 2.0},
        "network": dict(_CX7_400G),
        "a2a_launch_us": 35.0,
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> dict[str, Any]:
    """A deep copy of preset ``name`` as a plain dict; raises KeyError listing the valid names."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise KeyError(f"unknown cluster preset {name!r}; valid: {', '.join(preset_names())}") from None


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overrides`` merged in, recursing into nested dicts; inputs are not changed."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
