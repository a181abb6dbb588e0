"""Typed, validated hardware descriptions: GPUs, the NVLink/NVSwitch scale-up domain, the scale-out network.

Units are in field names (``_GBps`` gigabytes per second, ``_Gbps`` gigabits per second, ``_us``
microseconds, ``_GB`` gigabytes, ``_tflops`` 10^12 FLOP/s). Line rates are what vendors sell; the
``*_efficiency`` fields scale them to what collectives and kernels achieve, and are what calibration fits.

Deliberately ignored here: power and clocks, NVLink SHARP, PCIe switches shared by several devices,
adaptive routing in the fabric (flows take one fixed path each).
"""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field, model_validator

Fraction = Field(gt=0.0, le=1.0)


class StrictModel(BaseModel):
    """A config model that rejects unknown keys and is immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class GPUSpec(StrictModel):
    """One accelerator: compute rate, memory bandwidth and capacity, kernel overhead."""

    name: str
    bf16_tflops: float = Field(gt=0, description="dense bf16 tensor-core peak, TFLOP/s")
    hbm_GBps: float = Field(gt=0, description="HBM bandwidth, GB/s")
    memory_GB: float = Field(gt=0, description="HBM capacity, GB")
    compute_efficiency: float = Fraction
    hbm_efficiency: float = Fraction
    ffn_overhead_us: float = Field(ge=0, description="fixed cost of one expert-FFN launch (GEMM, act, GEMM)")
    ffn_floor_us: float = Field(default=0.0, ge=0, description="shortest possible expert FFN (launch-bound)")
    local_copy_GBps: float | None = Field(default=None, gt=0,
                                          description="a collective's copy to its own rank (default: HBM x efficiency / 2)")

    @property
    def flops_per_s(self) -> float:
        """Achievable bf16 rate in FLOP/s."""
        return self.bf16_tflops * 1e12 * self.compute_efficiency

    @property
    def hbm_bytes_per_s(self) -> float:
        """Achievable HBM bandwidth in bytes/s."""
        return self.hbm_GBps * 1e9 * self.hbm_efficiency

    @property
    def local_copy_bytes_per_s(self) -> float:
        """Rate of a collective's self-copy (bytes a rank sends to itself)."""
        return self.local_copy_GBps * 1e9 if self.local_copy_GBps else self.hbm_bytes_per_s / 2


class NVLinkSpec(StrictModel):
    """The scale-up domain: every GPU of a node attaches to a non-blocking NVSwitch fabric."""

    name: str
    GBps: float = Field(gt=0, description="per GPU, per direction, line rate")
    efficiency: float = Fraction
    latency_us: float = Field(ge=0, description="GPU-to-GPU one-way latency")

    @property
    def bytes_per_s(self) -> float:
        return self.GBps * 1e9 * self.efficiency


class NetworkSpec(StrictModel):
    """The scale-out network: one NIC per GPU (a rail), leaf switches, one logical spine."""

    nic_Gbps: float = Field(gt=0, description="per NIC, per direction, line rate")
    nic_efficiency: float = Fraction
    latency_us: float = Field(ge=0, description="NIC-to-NIC one-way latency through one leaf")
    hop_latency_us: float = Field(default=0.5, ge=0, description="extra latency per leaf-spine hop")
    pcie_GBps: float = Field(default=64.0, gt=0, description="GPU-NIC PCIe link, per direction")
    rail_optimized: bool = Field(default=True, description="one leaf per rail (local rank) across nodes")
    nodes_per_leaf: int = Field(default=32, ge=1, description="nodes per leaf when not rail-optimized")
    oversubscription: float = Field(default=1.0, ge=1.0, description="leaf downlink:uplink ratio")

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_Gbps / 8 * 1e9 * self.nic_efficiency


class ClusterSpec(StrictModel):
    """A cluster of identical nodes, each an NVLink domain of ``gpus_per_node`` GPUs."""

    name: str
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)
    gpu: GPUSpec
    nvlink: NVLinkSpec
    network: NetworkSpec
    a2a_launch_us: float = Field(ge=0, description="fixed cost of one all-to-all call (launch, handshake)")
    expert_memory_fraction: float = Field(
        default=0.8, gt=0, le=1, description="share of HBM that expert weights may use"
    )

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    @model_validator(mode="after")
    def _check_leaves(self) -> "ClusterSpec":
        if self.nodes > 1 and not self.network.rail_optimized and self.network.nodes_per_leaf < 1:
            raise ValueError("network.nodes_per_leaf must be >= 1")
        return self


