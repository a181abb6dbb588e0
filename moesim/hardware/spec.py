"""Typed, validated hardware descriptions: GPUs, the NVLink/NVSwitch scale-up domain, the scale-out network.

Units are in field names (``_GBps`` gigabytes per second, ``_Gbps`` gigabits per second, ``_us``
microseconds, ``_GB`` gigabytes, ``_tflops`` 10^12 FLOP/s). Line rates are what vendors sell; the
``*_efficiency`` fields scale them to what collectives and kernels achieve, and are what calibration fits.

NICs: by default every GPU has its own NIC (a rail per local rank, as in a DGX SuperPOD). With
``network.nics_per_node`` set, a node has fewer NICs than GPUs and each NIC serves a group of consecutive
local ranks, as GPUs behind one PCIe switch do (an HGX H200 node with 2x 400 Gb/s ConnectX-7 for 8 GPUs:
local ranks 0-3 on NIC 0, 4-7 on NIC 1); see :meth:`ClusterSpec.nic_of_local`.

Deliberately ignored here: power and clocks, NVLink SHARP, the PCIe switch's own bandwidth (each GPU keeps
its own GPU-to-NIC PCIe link; the switch's link to a shared NIC is taken to be no slower than the NIC),
adaptive routing in the fabric (flows take one fixed path each).
"""

from __future__ import annotations


from typing import Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from moesim.loaders import NoBoolNumbers

# Physical sanity bounds: every rate, size and time is a finite number within them, so no preset or override
# can make the simulator divide by zero, overflow to infinity or produce NaN.
MAX_GBPS = 1e6  # GB/s: a thousand times any link or memory built so far
MAX_US = 1e6  # one second for any latency or fixed cost
MIN_SHARE = 1e-4  # smallest efficiency: below it a "link" or "GPU" does nothing
MAX_NODES = 1_000_000
MAX_GPUS_PER_NODE = 100_000  # (the cluster's GPUs are also bounded by the memory of routing every pair)


def Fraction(**kw: Any) -> Any:  # noqa: N802 - reads as a type in field declarations
    """A share of a line rate or peak: above 0 (at least MIN_SHARE), at most 1."""
    return Field(ge=MIN_SHARE, le=1.0, **kw)


def Rate(limit: float = MAX_GBPS, **kw: Any) -> Any:  # noqa: N802
    """A rate (GB/s, Gb/s, TFLOP/s) or a capacity: positive and finite, at most ``limit``."""
    return Field(gt=0, le=limit, **kw)


def Micros(**kw: Any) -> Any:  # noqa: N802
    """A latency or fixed cost in microseconds: 0 to MAX_US."""
    return Field(ge=0, le=MAX_US, **kw)


class StrictModel(NoBoolNumbers):
    """A config model that rejects unknown keys and is immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class StepCost(StrictModel):
    """One step of an MoE kernel pipeline (:mod:`moesim.sim.kernels`): a fixed cost (its launches and host
    work) plus its bytes at a share of HBM bandwidth (gathers, scatters and atomics reach far less than a copy)."""

    fixed_us: float = Field(ge=0, lt=MAX_US)
    hbm_efficiency: float = Fraction(default=1.0)


class GemmSpec(StrictModel):
    """A GEMM kernel's tiling and rates on this GPU (:func:`moesim.sim.kernels.grouped_gemm_time`): tile-padded
    waves over the SMs against the bytes it reads, plus a fixed cost per launch (eager, and replayed from a
    CUDA graph). Fitted by ``moesim calibrate`` on measured timings."""

    tile_m: int = Field(default=128, ge=1, le=65536,
                        description="grouped-GEMM tile rows: each expert's rows are padded to it")
    tile_n: int = Field(default=128, ge=1, le=65536, description="grouped-GEMM tile columns")
    gemm_efficiency: float = Fraction(default=0.7,
                                   description="share of the bf16 peak per SM that a full GEMM tile reaches")
    fp8_gemm_efficiency: float = Fraction(default=0.5,
                                       description="share of the FP8 peak per SM that a full FP8 GEMM tile reaches")
    gemm_hbm_efficiency: float = Fraction(default=0.65,
                                       description="share of HBM bandwidth a grouped GEMM reads its weights at")
    gemm_fixed_us: float = Field(default=20.0, ge=0, lt=MAX_US, description="fixed cost of one grouped GEMM")
    fp8_gemm_hbm_efficiency: float = Fraction(default=0.65, description="share of HBM bandwidth an FP8 grouped "
                                                                        "GEMM reads its weights at")
    fp8_gemm_fixed_us: float = Field(default=20.0, ge=0, lt=MAX_US, description="fixed cost of one FP8 grouped GEMM")
    graph_gemm_fixed_us: float | None = Field(default=None, ge=0, lt=MAX_US, description="fixed cost of one "
                                              "grouped GEMM replayed from a CUDA graph (default gemm_fixed_us)")
    graph_fp8_gemm_fixed_us: float | None = Field(default=None, ge=0, lt=MAX_US, description="the same for FP8 "
                                                  "(default fp8_gemm_fixed_us)")
    fp8_tile_m: int | None = Field(default=None, ge=1, le=65536, description="FP8 grouped-GEMM tile rows "
                                   "(block-scaled kernels tile by the 128-wide scale blocks; default tile_m)")
    fp8_tile_n: int | None = Field(default=None, ge=1, le=65536, description="FP8 grouped-GEMM tile columns "
                                   "(default tile_n)")

    def tile(self, fp8: bool = False) -> tuple[int, int]:
        """(rows, columns) of one tile of the bf16 or the FP8 kernel."""
        if fp8:
            return self.fp8_tile_m or self.tile_m, self.fp8_tile_n or self.tile_n
        return self.tile_m, self.tile_n


class PipelineSpec(GemmSpec):
    """How one MoE kernel pipeline runs on this GPU: its grouped GEMMs (:class:`GemmSpec`) and every other
    step's cost. Fitted by ``moesim calibrate`` on ``moesim bench moe`` timings."""

    steps: dict[str, StepCost] = Field(default_factory=dict, description="every other step's cost, by name")
    # Replayed from a CUDA graph (engine.launch: cuda_graph, as serving engines run decode): no host launches.
    graph_steps: dict[str, StepCost] = Field(default_factory=dict, description="every other step's cost when "
                                             "replayed from a CUDA graph; a step without one cannot be captured")


class AttentionBackwardSpec(StrictModel):
    """An attention core's backward (training): 2.5 times its forward's FLOPs (QK^T recomputed, then dV, dP, dQ and
    dK) plus fixed work per query row, at a share of the bf16 peak, and a fixed cost per kernel
    (:func:`moesim.sim.compute.attention_backward_time`). Fitted by ``moesim calibrate`` on ``moesim bench
    attention-kernels``."""

    efficiency: float = Fraction(description="share of bf16 peak the backward reaches")
    fixed_keys: float = Field(default=0.0, ge=0, le=1e9, description="fixed work per query row, in key positions")
    overhead_us: float = Micros(default=0.0, description="fixed GPU-side cost of one backward")


class AttentionKernelSpec(StrictModel):
    """A prefill attention-core kernel family other than FlashAttention-2 (whose fit is the GPU's ``attention_*``
    fields): its forward as :func:`moesim.sim.compute.attention_time` models one (FLOPs plus fixed work per query row
    at a share of the bf16 peak, a fixed cost per kernel) and its backward. Fitted by ``moesim calibrate`` on
    ``moesim bench attention-kernels``."""

    efficiency: float = Fraction(description="share of bf16 peak the forward reaches")
    fixed_keys: float = Field(default=0.0, ge=0, le=1e9, description="fixed work per query row, in key positions")
    overhead_us: float = Micros(default=0.0, description="fixed GPU-side cost of one kernel")
    backward: AttentionBackwardSpec | None = Field(default=None, description="its backward (none: 2.5 times the "
                                                   "forward's time, the FLOPs' ratio)")


def _h200_fit() -> dict:
    from importlib import resources

    import yaml

    text = resources.files("moesim.hardware").joinpath("calibrated").joinpath("hgx-h200.yaml").read_text()
    return yaml.safe_load(text)["gpu"]


def measured_pipelines() -> dict[str, PipelineSpec]:
    """The MoE kernel pipelines as fitted on one H200 (``calibrated/hgx-h200.yaml``, from ``moesim bench moe``):
    the default of a GPU given without its own fit, whose shares of peak and HBM bandwidth are then assumed."""
    return {k: PipelineSpec(**v) for k, v in _h200_fit()["moe_pipelines"].items()}


def measured_plain_gemm() -> GemmSpec:
    """Plain (dense) GEMMs as fitted on one H200 (``calibrated/hgx-h200.yaml``, from
    benchmarks/validation/moe_h200/dense.py): the default of a GPU given without its own fit."""
    fit = _h200_fit().get("plain_gemm")
    return GemmSpec(**fit) if fit else GemmSpec()


def measured_attention_kernels() -> dict[str, AttentionKernelSpec]:
    """The prefill attention kernel families as fitted on one H200 (``calibrated/hgx-h200.yaml``, from ``moesim bench
    attention-kernels``): the default of a GPU given without its own fit, whose shares of peak are then assumed."""
    return {k: AttentionKernelSpec(**v) for k, v in _h200_fit().get("attention_kernels", {}).items()}


def measured_sustained_clock() -> float:
    """The tensor-core rate under sustained load as a share of the boost-clock rate the fits were timed at, as
    measured on one H200 (``calibrated/hgx-h200.yaml``, from benchmarks/validation/power_h200): the default of a GPU
    given without its own measurement; 1 (no throttling) without one."""
    return float(_h200_fit().get("sustained_clock", 1.0))


def measured_attention_backward() -> AttentionBackwardSpec | None:
    """FlashAttention-2's backward as measured on one H200 (``calibrated/hgx-h200.yaml``; none without a fit)."""
    fit = _h200_fit().get("attention_backward")
    return AttentionBackwardSpec(**fit) if fit else None


def measured_backward() -> float:
    """The experts' grouped GEMMs' backward / forward time as fitted on one H200 (``calibrated/hgx-h200.yaml``, from
    ``moesim bench train``): the default of a GPU given without its own fit; 2 (the FLOPs' ratio) without one."""
    return float(_h200_fit().get("gemm_backward", 2.0))


class GPUSpec(StrictModel):
    """One accelerator: compute rate, memory bandwidth and capacity, kernel overhead."""

    name: str
    bf16_tflops: float = Rate(description="dense bf16 tensor-core peak, TFLOP/s")
    fp8_tflops: float | None = Rate(default=None, description="dense FP8 tensor-core peak, TFLOP/s (default: twice "
                                                                  "bf16)")
    hbm_GBps: float = Rate(description="HBM bandwidth, GB/s")
    memory_GB: float = Rate(description="HBM capacity, GB")
    compute_efficiency: float = Fraction()
    hbm_efficiency: float = Fraction()
    ffn_overhead_us: float = Micros(description="fixed cost of one expert-FFN launch (GEMM, act, GEMM)")
    ffn_floor_us: float = Micros(default=0.0, description="shortest possible expert FFN (launch-bound)")
    local_copy_GBps: float | None = Rate(default=None, description="a collective's copy to its own rank (default: "
                                                                   "HBM x efficiency / 2)")
    attention_efficiency: float | None = Fraction(default=None,
                                                  description="share of bf16 peak the attention core (FlashAttention) "
                                                              "reaches (default compute_efficiency)")
    attention_fixed_keys: float = Field(default=0.0, ge=0, le=1e9,
                                        description="attention core's fixed work per query row, in key positions "
                                                    "(loading Q, finishing the softmax, storing O; fitted)")
    attention_overhead_us: float = Micros(default=0.0, description="fixed GPU-side cost of one attention-core kernel")
    dense_efficiency: float | None = Fraction(default=None,
                                              description="share of bf16 peak the attention projections (plain GEMMs) "
                                                          "reach (default compute_efficiency)")
    attention_hbm_efficiency: float | None = Fraction(default=None,
                                                      description="share of HBM bandwidth the attention core reaches "
                                                                  "reading K and V (default hbm_efficiency)")
    # FlashMLA (github deepseek-ai/FlashMLA, README): "up to 3000 GB/s in memory-bound configuration and 580 TFLOPS
    # in computation-bound configuration on H800 SXM5" (of 3350 GB/s and 989 TFLOP/s bf16). Not fitted here; a GPU
    # without its own figure is assumed to reach the same shares of its peak.
    mla_decode_efficiency: float = Fraction(default=0.586, description="share of bf16 peak the weight-absorbed MLA "
                                                                       "decode kernel (FlashMLA) reaches")
    mla_decode_hbm_efficiency: float = Fraction(default=0.896, description="share of HBM bandwidth the MLA decode "
                                                                           "kernel reads the latent KV cache at")
    attention_backward: AttentionBackwardSpec | None = Field(
        default_factory=measured_attention_backward, description="FlashAttention-2's backward in training (none: 2.5 "
        "times the forward's time; fitted by moesim calibrate on moesim bench attention-kernels; a GPU without its "
        "own fit takes the H200's shares of peak)")
    attention_kernels: dict[str, AttentionKernelSpec] = Field(
        default_factory=measured_attention_kernels, description="prefill attention-core kernel families besides "
        "FlashAttention-2 (fa2, the attention_* fields), by name: engine.attention_kernel picks one")
    sms: int = Field(default=132, ge=1, le=1_000_000,
                     description="streaming multiprocessors (GEMM tiles run in waves over them)")
    moe_pipelines: dict[str, PipelineSpec] = Field(default_factory=measured_pipelines,
                                                   description="the MoE kernel pipelines on this GPU, by name")
    gemm_backward: float = Field(default_factory=measured_backward, ge=1, le=10,
                                 description="backward / forward time of the experts' grouped GEMMs in training (their "
                                 "data- and weight-gradient GEMMs; 2 is the FLOPs' ratio): moesim calibrate fits it on "
                                 "moesim bench train; a GPU without its own fit takes the H200's")
    sustained_clock: float = Field(
        default_factory=measured_sustained_clock, gt=0, le=1,
        description="tensor-core rate under sustained load (a prefill forward or a training step: the board at its "
        "power cap) as a share of the rate of isolated launches every kernel fit was timed at; memory-bound rates "
        "do not change (moesim calibrate fits it on benchmarks/validation/power_h200; a GPU without its own "
        "measurement takes the H200's)")
    plain_gemm: GemmSpec = Field(default_factory=measured_plain_gemm,
                                 description="plain GEMMs (shared experts, dense layers, projections): tiles, rates "
                                             "and fixed costs (moesim.sim.kernels.plain_gemm_time)")

    @field_validator("fp8_tflops", mode="after")
    @classmethod
    def _fp8(cls, value: float | None, info: ValidationInfo) -> float | None:
        return value if value is not None else 2.0 * info.data["bf16_tflops"] if "bf16_tflops" in info.data else None

    def at_sustained_clock(self) -> "GPUSpec":
        """This GPU under sustained tensor-core load: both peaks at ``sustained_clock`` of those the fits were timed at,
        every memory rate unchanged (so a FLOP-bound kernel slows by 1 / sustained_clock, an HBM-bound one not)."""
        if self.sustained_clock == 1.0:
            return self
        c = self.sustained_clock
        return self.model_copy(update={"bf16_tflops": self.bf16_tflops * c, "sustained_clock": 1.0,
                                       "fp8_tflops": (self.fp8_tflops or 2.0 * self.bf16_tflops) * c})

    @property
    def flops_per_s(self) -> float:
        """Achievable bf16 rate in FLOP/s."""
        return self.bf16_tflops * 1e12 * self.compute_efficiency

    @property
    def dense_flops_per_s(self) -> float:
        """Achievable bf16 rate of the attention projections in FLOP/s."""
        return self.bf16_tflops * 1e12 * (self.dense_efficiency or self.compute_efficiency)

    @property
    def attention_flops_per_s(self) -> float:
        """Achievable attention-core rate in FLOP/s."""
        return self.bf16_tflops * 1e12 * (self.attention_efficiency or self.compute_efficiency)

    @property
    def hbm_bytes_per_s(self) -> float:
        """Achievable HBM bandwidth in bytes/s."""
        return self.hbm_GBps * 1e9 * self.hbm_efficiency

    @property
    def attention_hbm_bytes_per_s(self) -> float:
        """HBM bandwidth the attention core reaches, in bytes/s (decode reads the KV cache at this rate)."""
        return self.hbm_GBps * 1e9 * (self.attention_hbm_efficiency or self.hbm_efficiency)

    @property
    def local_copy_bytes_per_s(self) -> float:
        """Rate of a collective's self-copy (bytes a rank sends to itself)."""
        return self.local_copy_GBps * 1e9 if self.local_copy_GBps else self.hbm_bytes_per_s / 2


class NVLinkSpec(StrictModel):
    """The scale-up domain: every GPU of a node attaches to a non-blocking NVSwitch fabric."""

    name: str
    GBps: float = Rate(description="per GPU, per direction, line rate")
    efficiency: float = Fraction()
    latency_us: float = Micros(description="GPU-to-GPU one-way latency")

    @property
    def bytes_per_s(self) -> float:
        return self.GBps * 1e9 * self.efficiency


class NetworkSpec(StrictModel):
    """The scale-out network: NICs (one per GPU, a rail each, unless ``nics_per_node`` says fewer), leaf
    switches, one logical spine."""

    nic_Gbps: float = Rate(8 * MAX_GBPS, description="per NIC, per direction, line rate")
    nic_efficiency: float = Fraction()
    latency_us: float = Micros(description="NIC-to-NIC one-way latency through one leaf")
    hop_latency_us: float = Micros(default=0.5, description="extra latency per leaf-spine hop")
    pcie_GBps: float = Rate(default=64.0, description="GPU-NIC PCIe link, per direction")
    rail_optimized: bool = Field(default=True, description="one leaf per rail (local rank) across nodes")
    nodes_per_leaf: int = Field(default=32, ge=1, le=MAX_NODES, description="nodes per leaf when not rail-optimized")
    oversubscription: float = Field(default=1.0, ge=1.0, le=1e6, description="leaf downlink:uplink ratio")
    nics_per_node: int | None = Field(
        default=None, ge=1, le=MAX_GPUS_PER_NODE,
        description="NICs per node, shared by equal groups of consecutive local ranks (GPUs behind one PCIe "
                    "switch); must divide gpus_per_node; default: one NIC per GPU")

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_Gbps / 8 * 1e9 * self.nic_efficiency


class A2AKernelSpec(StrictModel):
    """One all-to-all kernel family as production stacks run it (:mod:`moesim.sim.network` charges it): fixed
    costs per call, per exchange of counts before the data moves and per peer, the share of the links' line
    rates its copies reach, and the SMs it occupies while in flight."""

    launch_us: float | None = Micros(default=None, description="fixed cost of one call: launch, handshake, "
                                     "completion (default: the cluster's a2a_launch_us)")
    notify_us: float = Micros(default=0.0, description="exchange of per-rank counts (layout/notify) before a "
                              "dispatch's data moves")
    per_peer_us: float = Micros(default=0.0, description="per peer GPU a rank exchanges bytes with (setup of one "
                                "send/receive pair), the busiest rank's count")
    nvlink_efficiency: float | None = Fraction(default=None, description="share of NVLink line rate its copies "
                                               "reach (default nvlink.efficiency)")
    rdma_efficiency: float | None = Fraction(default=None, description="share of NIC line rate its RDMA writes "
                                             "reach (default network.nic_efficiency)")
    sms: int = Field(default=0, ge=0, le=1_000_000, description="SMs the kernel occupies while in flight")
    hook_sm_us: float = Micros(default=0.0, description="with receive hooks (two-batch overlap): SM time of each "
                               "of a call's two phases, its send (taken from launch_us) and its receive once the "
                               "data landed, both on the compute stream; none while the data moves")


# Each family's figures; a cluster's ``a2a_kernels`` overrides them field by field. Sources:
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # NCCL all_to_all / all_to_all_single (torch.distributed): one grouped ncclSend/ncclRecv per peer. launch_us
    # (None: the cluster's a2a_launch_us) is the whole call as PyTorch issues it, measured on 2x H200 (0.036 ms,
    # one peer); per_peer_us cannot be told apart from it on one peer and stays 0 until measured on more GPUs
    # (moesim bench a2a --nproc 8). 24 SMs: NCCL's channels, taken as DeepEP's normal kernels (estimate).
    "nccl": {"launch_us": None, "sms": 24},
    # DeepEP normal kernels (github deepseek-ai/DeepEP, README: "NVLink and RDMA forwarding", SM number control;
    # its tests tune 24 SMs): a layout kernel and notify_dispatch (per-rank counts exchanged, the host waits for
    # them to size its buffers) before every dispatch, then the data through one RDMA copy per node and NVLink
    # forwarding. launch_us 10 and notify_us 25 are ESTIMATES (not published); the README's bandwidths are the
    # links' own rates (its tests time dispatches on a cached layout, without notify; docs/a2a.md).
    "deepep_normal": {"launch_us": 10.0, "notify_us": 25.0, "sms": 24},
    # DeepEP low-latency kernels (README: "pure RDMA", IBGDA, one message per (token, expert), hook-based overlap
    # "that does not occupy any SM resource"; CUDA-graph capturable, no notify step). launch_us 30 is DERIVED from
    # the README's H800 table, not measured apart: its kernel times less their bytes at the links' rates leave
    # 16-37 us per call (counts signalled per expert, receivers polling, packing); 30 is that of the EP128/256 rows
    # (whose dispatch-combine difference gives the RDMA rate, 0.85 of 50 GB/s: the preset's NIC rate).
    # hook_sm_us 15: that per-call residual is the kernel's SM work - its send phase (FP8 casts, message packing,
    # IBGDA posts) and its receive phase (polling the per-expert counts, unpacking into the expert-major layout).
    # With return_recv_hook the two run as separate launches on the compute stream, holding the SMs, and the data
    # moves in between on none (LMSYS 2025-05-05, TBO ablation: "decode communication kernels either fully
    # utilize SMs (during send/receive) or none (during inflight waiting)"). The even split of the 30 us between
    # the phases is an ESTIMATE: DeepEP publishes no hook-phase times.
    "deepep_low_latency": {"launch_us": 30.0, "sms": 0, "hook_sm_us": 15.0},
    # TensorRT-LLM NVLinkOneSided all-to-all (TensorRT-LLM tech blog 18, "Optimizing MoE Communication with
    # One-Sided AlltoAll Over NVLink", DGX B200 / GB200 NVL72): each rank writes its tokens straight into the
    # receivers' buffers over NVLink (symmetric memory), counts travel with the data, receivers poll flags; one
    # NVLink domain only. launch_us 8 (a kernel replayed from a CUDA graph plus a flag round trip over NVLink)
    # and 16 SMs are ESTIMATES, not published figures.
    "nvlink_one_sided": {"launch_us": 8.0, "sms": 16},
}


def _family(name: str) -> Any:
    return Field(default_factory=lambda: A2AKernelSpec(**_FAMILY_DEFAULTS[name]))


class A2AKernels(StrictModel):
    """The all-to-all kernel families (``engine.a2a``), each with its own costs (:data:`_FAMILY_DEFAULTS`, with
    their sources; docs/a2a.md says which stack each stands for). A cluster file overrides a family field by
    field: ``a2a_kernels: {deepep_low_latency: {launch_us: 20}}`` keeps its other figures."""

    nccl: A2AKernelSpec = _family("nccl")
    deepep_normal: A2AKernelSpec = _family("deepep_normal")
    deepep_low_latency: A2AKernelSpec = _family("deepep_low_latency")
    nvlink_one_sided: A2AKernelSpec = _family("nvlink_one_sided")

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: {**_FAMILY_DEFAULTS[k], **v} if k in _FAMILY_DEFAULTS and isinstance(v, dict) else v
                for k, v in data.items()}

    def family(self, name: str) -> A2AKernelSpec:
        """The spec of family ``name`` (an alias such as ``direct`` resolves first, :data:`A2A_ALIASES`)."""
        return getattr(self, A2A_ALIASES.get(name, name))


A2A_FAMILIES = ("nccl", "deepep_normal", "deepep_low_latency", "nvlink_one_sided")
# The names earlier scenarios use: direct (NCCL), hierarchical (DeepEP normal), low_latency (DeepEP low-latency).
A2A_ALIASES = {"direct": "nccl", "hierarchical": "deepep_normal", "low_latency": "deepep_low_latency"}


class ClusterSpec(StrictModel):
    """A cluster of identical nodes, each an NVLink domain of ``gpus_per_node`` GPUs."""

    name: str
    nodes: int = Field(ge=1, le=MAX_NODES)
    gpus_per_node: int = Field(ge=1, le=MAX_GPUS_PER_NODE)
    gpu: GPUSpec
    nvlink: NVLinkSpec
    network: NetworkSpec
    a2a_launch_us: float = Micros(description="fixed cost of one all-to-all call (launch, handshake)")
    a2a_self_launch_us: float | None = Micros(
        default=None, description="fixed cost of an all-to-all among one GPU (NCCL with one rank copies with "
        "cudaMemcpy, at the device copy rate); default a2a_launch_us")
    expert_memory_fraction: float = Fraction(default=0.8, description="share of HBM that expert weights may use")
    a2a_kernels: A2AKernels = Field(default_factory=A2AKernels, description="the all-to-all kernel families' fixed "
                                    "costs, bandwidth shares and SMs (engine.a2a picks one)")

    def at_sustained_clock(self) -> "ClusterSpec":
        """The cluster with its GPUs under sustained tensor-core load (:meth:`GPUSpec.at_sustained_clock`)."""
        gpu = self.gpu.at_sustained_clock()
        return self if gpu is self.gpu else self.model_copy(update={"gpu": gpu})

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    @property
    def nics_per_node_effective(self) -> int:
        """NICs per node: ``network.nics_per_node``, or one per GPU when unset."""
        return self.network.nics_per_node or self.gpus_per_node

    @property
    def gpus_per_nic(self) -> int:
        """How many GPUs share one NIC (1: a NIC per GPU)."""
        return self.gpus_per_node // self.nics_per_node_effective

    def nic_of_local(self, local: int) -> int:
        """Index on its node of the NIC local rank ``local`` uses: consecutive groups of ``gpus_per_nic``
        local ranks share one (local rank itself when every GPU has its own NIC)."""
        return local // self.gpus_per_nic

    @field_validator("network")
    @classmethod
    def _check_nics(cls, network: NetworkSpec, info: ValidationInfo) -> NetworkSpec:
        per_node = info.data.get("gpus_per_node")  # absent when gpus_per_node itself failed validation
        nics = network.nics_per_node
        if nics is not None and per_node is not None and per_node % nics:
            raise ValueError(f"network.nics_per_node={nics} must divide gpus_per_node={per_node} "
                             "(each NIC serves an equal group of GPUs)")
        return network

    @model_validator(mode="after")
    def _check_leaves(self) -> "ClusterSpec":
        if self.nodes > 1 and not self.network.rail_optimized and self.network.nodes_per_leaf < 1:
            raise ValueError("network.nodes_per_leaf must be >= 1")
        return self


