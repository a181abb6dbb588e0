"""Cluster presets: the machines MoE serving runs on, with the figure behind every number.

A preset is a plain nested dict of :class:`~moesim.hardware.spec.ClusterSpec` fields; scenarios deep-merge
their overrides into it before validation, so a preset can never hold a value a YAML file could not.

Efficiencies come from measurements on 2x H200 (../shared/calibration, benchmarks/validation/attention_h200) and
one H100 (benchmarks/validation/ffn_h100, attention_h100), fitted by ``moesim calibrate`` on two thirds of the
points and checked on the rest; the fits ship as ``calibrated/hgx-h200.yaml`` and ``calibrated/dgx-h100.yaml``
(each header is the command that wrote it) and the ``hgx-h200`` preset and the ``dgx-h100`` GPU are those
files. Where a machine was not measured, the H200's fitted efficiencies are assumed and marked so.
"""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any

import yaml

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


def _calibrated(name: str) -> dict[str, Any]:
    """A cluster file written by ``moesim calibrate`` and shipped with the package."""
    text = resources.files("moesim.hardware").joinpath("calibrated").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)


# Fitted on 2x H200: expert-FFN efficiencies, launch cost and floor; NVLink efficiency and latency; NCCL
# all-to-all launch cost; the rate of a collective's copy to its own rank.
_H200 = _calibrated("hgx-h200")
_FITTED_GPU = {k: _H200["gpu"][k] for k in ("compute_efficiency", "hbm_efficiency", "ffn_overhead_us", "ffn_floor_us")}
_LOCAL_COPY_PER_HBM = _H200["gpu"]["local_copy_GBps"] / _H200["gpu"]["hbm_GBps"]
_FITTED_NVLINK = {k: _H200["nvlink"][k] for k in ("efficiency", "latency_us")}
_A2A_LAUNCH_US = _H200["a2a_launch_us"]
_A2A_SELF_US = _H200.get("a2a_self_launch_us")  # NCCL with one rank (moesim bench moe on one H200)


# Fitted on one H100 (benchmarks/validation/ffn_h100 and attention_h100, ``moesim calibrate``, every third point
# held out): its expert-FFN efficiencies, launch cost and floor (that host's floor is 88 us against the H200
# host's 58), the attention core (FlashAttention-2 as PyTorch ships it) and the projections' GEMM efficiency.
# An H200 fits the same attention compute terms and a lower share of its faster HBM (calibrated/hgx-h200.yaml).
# The H800 is an H100 with NVLink cut down and takes this fit; for the A100 and the B200 the H200's FFN
# efficiencies and the H100's attention fit are assumed.
_H100 = _calibrated("dgx-h100")
_ATTENTION_H100 = {k: _H100["gpu"][k] for k in ("attention_efficiency", "attention_fixed_keys", "attention_overhead_us",
                                                 "attention_hbm_efficiency", "dense_efficiency")}


def _gpu(name: str, tflops: float, hbm_GBps: float, memory_GB: float, sms: int) -> dict[str, Any]:
    """A GPU that was not measured: the H200's fitted FFN efficiencies and MoE kernel pipelines and the H100's
    attention fit (all assumed), its local copy scaled by HBM bandwidth."""
    return {"name": name, "bf16_tflops": tflops, "hbm_GBps": hbm_GBps, "memory_GB": memory_GB, "sms": sms,
            **_FITTED_GPU, "moe_pipelines": _H200["gpu"]["moe_pipelines"],
            **_ATTENTION_H100, "local_copy_GBps": round(_LOCAL_COPY_PER_HBM * hbm_GBps, 1)}


# NVLink 4: 18 links x 25 GB/s = 450 GB/s per direction (NCCL reaches about 370 in p2p).
_NVLINK4 = {"name": "nvlink4", "GBps": 450.0, **_FITTED_NVLINK}

PRESETS: dict[str, dict[str, Any]] = {
    # NVIDIA DGX H100: 8x H100 SXM5 (989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s), 4 NVSwitch,
    # 8x ConnectX-7 400 Gb/s, one per GPU (DGX H100 datasheet). GPU efficiencies measured on one H100
    # (calibrated/dgx-h100.yaml); NVLink and NCCL figures from the H200 (same NVLink 4).
    "dgx-h100": {
        "name": "dgx-h100",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": _H100["gpu"],
        "nvlink": dict(_NVLINK4),
        "network": dict(_CX7_400G),
        "a2a_launch_us": _A2A_LAUNCH_US,  # NCCL all-to-all call cost fitted on 2x H200
    },
    # NVIDIA HGX H200: H200 SXM (same compute as H100, 141 GB HBM3e at 4.8 TB/s), NVLink 4, one
    # ConnectX-7 400 Gb/s per GPU. Efficiencies measured (../shared/calibration; attention:
    # benchmarks/validation/attention_h200).
    "hgx-h200": {
        "name": "hgx-h200",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": _H200["gpu"],  # attention fitted on one H200 (benchmarks/validation/attention_h200)
        "nvlink": _H200["nvlink"],
        "network": dict(_CX7_400G),
        "a2a_launch_us": _A2A_LAUNCH_US,
        "a2a_self_launch_us": _A2A_SELF_US,
    },
    # H800 (DeepEP's testbed): H100 compute and memory, NVLink cut to 8 links = 200 GB/s per direction,
    # "about 160 GB/s" achievable per DeepEP's README => 0.8; one CX7 400 Gb/s per GPU.
    "h800": {
        "name": "h800",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": {**_H100["gpu"], "name": "H800-SXM"},  # an H100's compute and memory
        "nvlink": {"name": "nvlink4-8links", "GBps": 200.0, "efficiency": 0.80, "latency_us": 2.0},
        "network": dict(_CX7_400G),
        "a2a_launch_us": _A2A_LAUNCH_US,
    },
    # NVIDIA DGX A100: A100 SXM4 80 GB (312 TFLOP/s bf16, 2.0 TB/s), 6 NVSwitch, NVLink 3
    # (600 GB/s bidirectional = 300 per direction), 8x HDR 200 Gb/s, one per GPU (DGX A100 datasheet).
    "dgx-a100": {
        "name": "dgx-a100",
        "nodes": 1,
        "gpus_per_node": 8,
        "gpu": _gpu("A100-SXM-80GB", 312.0, 2039.0, 80.0, 108),
        "nvlink": {"name": "nvlink3", "GBps": 300.0, **_FITTED_NVLINK},
        "network": {**_CX7_400G, "nic_Gbps": 200.0},
        "a2a_launch_us": _A2A_LAUNCH_US,
    },
    # NVIDIA GB200 NVL72: 72 Blackwell GPUs in one NVLink 5 domain (1.8 TB/s bidirectional per GPU =
    # 900 GB/s per direction); about 2.5 PFLOP/s dense bf16, 186 GB HBM3e at 8 TB/s per GPU
    # (GB200 NVL72 datasheet: 180 PFLOP/s dense FP16/BF16 per rack); one CX7 400 Gb/s per GPU between racks.
    "gb200-nvl72": {
        "name": "gb200-nvl72",
        "nodes": 1,
        "gpus_per_node": 72,
        "gpu": _gpu("B200-GB200", 2500.0, 8000.0, 186.0, 148),
        "nvlink": {"name": "nvlink5", "GBps": 900.0, **_FITTED_NVLINK},
        "network": dict(_CX7_400G),
        "a2a_launch_us": _A2A_LAUNCH_US,
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
