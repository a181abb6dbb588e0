"""The ``training`` section of a scenario (``workload.phase: train``): how the step runs and which expert
layouts to compare (:mod:`moesim.study.training`). Validated like the rest of a scenario: unknown keys
rejected, every error naming the field.

Layouts (``kind``):

- ``ep``: static expert parallelism, the placement ``placement`` (any registered policy, with ``options``)
  planned once on the profile's loads;
- ``rearrange``: the same, re-planned every ``every_steps`` steps on the loads of the last ``window_steps``
  steps (FlexMoE / SmartMoE style), each re-plan paying the migration of the moved experts' parameters and
  optimizer states before the step;
- ``fssdp``: Hecate's fully sharded sparse data parallelism (:mod:`moesim.placement.fssdp`): expert states
  sharded by ``sharding``, experts materialised every step where ``placement`` (re-planned on the step's
  predicted loads; ``everywhere``: on every GPU) puts them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from moesim.loaders import NoBoolNumbers


class _Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LayoutEntry(_Strict):
    name: str
    kind: Literal["ep", "rearrange", "fssdp"]
    placement: str = Field(default="contiguous", description="placement policy (fssdp: where experts are "
                           "materialised each step; 'everywhere' materialises every expert on every GPU)")
    options: dict[str, Any] = Field(default_factory=dict, description="the placement policy's options")
    every_steps: int = Field(default=0, ge=0, le=1_000_000, description="rearrange: re-plan before every N-th step")
    window_steps: int = Field(default=1, ge=1, le=1_000_000, description="rearrange: plan on the last N steps' loads")
    sharding: str = Field(default="home", description="fssdp: uniform, home (heterogeneous: where the static plan "
                          "puts each expert) or node")
    sparse: bool = Field(default=True, description="fssdp: materialise only copies that receive rows this step")
    rematerialize: bool = Field(default=False, description="fssdp: free materialised experts after the forward and "
                                "gather them again for the backward (less memory, twice the gathers)")
    predict: Literal["previous", "current"] = Field(default="previous", description="fssdp: plan the step's "
                                                    "materialisation on the previous step's loads, or on its own")
    group: int | None = Field(default=None, ge=1, le=1_000_000, description="fssdp: plan the materialisation "
                              "over groups of this many EP ranks (e.g. a node's), every group holding a full set: "
                              "tokens stay in their group, parameters travel instead (topology-aware)")
    replica_rule: Literal["token_index", "local", "balanced_split"] = Field(
        default="local", description="fssdp and replicated placements: which copy serves a token (Hecate's "
        "topology-aware dispatch is local: same GPU, then node)")

    @model_validator(mode="after")
    def _kind(self) -> "LayoutEntry":
        if self.kind == "rearrange" and self.every_steps < 1:
            raise ValueError("a rearrange layout needs every_steps >= 1")
        if self.kind != "fssdp" and self.placement == "everywhere":
            raise ValueError("placement 'everywhere' is for fssdp layouts (every expert materialised everywhere)")
        return self


class TrainingConfig(_Strict):
    pp: int = Field(default=1, ge=1, le=4096, description="pipeline stages (the first one is simulated)")
    ep: int | None = Field(default=None, ge=1, le=1_000_000, description="EP ranks per expert-parallel group "
                           "(ep and rearrange layouts); the stage's ranks form expert-data-parallel copies of the "
                           "group, whose expert gradients are all-reduced; default: one group of every rank")
    micro_batches: int = Field(default=1, ge=1, le=100_000, description="micro-batches per step, each the "
                               "workload's tokens_per_gpu per GPU")
    overlap: Literal["none", "dualpipe"] = Field(default="none", description="none, or dualpipe: a forward chunk "
                                                 "beside a backward chunk, layer by layer (DeepSeek DualPipe)")
    overlap_grad_sync: bool = True
    prefetch: bool = Field(default=True, description="fssdp: gathers and reduce-scatters hidden behind the "
                           "neighbouring layer's compute")
    recompute: bool = False
    shard_optimizer: bool = Field(default=True, description="non-expert optimizer states sharded over data "
                                  "parallelism (ZeRO-1)")
    gemm_backward: float | None = Field(default=None, ge=1, le=10, description="backward / forward time of every "
                                        "GEMM; default the GPU's gpu.gemm_backward (fitted by moesim calibrate on "
                                        "moesim bench train; 2, the FLOPs' ratio, where not measured)")
    fp8_gradient_dispatch: bool = Field(default=False, description="the backward's all-to-all that sends the "
                                        "activation gradients to the experts moves the forward dispatch's bytes per "
                                        "token (FP8, as DeepSeek-V3 trains: arXiv 2412.19437, 3.3.2) instead of the "
                                        "combine's (BF16)")
    grad_bytes: float = Field(default=4.0, gt=0, le=16)
    optimizer_bytes: float = Field(default=12.0, ge=0, le=64)
    model_layers: int | None = Field(default=None, ge=1, le=100_000, description="the whole model's MoE layers, "
                                     "when model.num_layers simulates fewer: step time and memory scale by their "
                                     "ratio (per stage)")
    layouts: tuple[LayoutEntry, ...] = Field(min_length=1)
    baseline: str | None = None

    @model_validator(mode="after")
    def _names(self) -> "TrainingConfig":
        names = [lay.name for lay in self.layouts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"layout names must be unique; {dupes[0]!r} repeats")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the layouts: {', '.join(names)}")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.layouts[0].name

    def scenario_placements(self) -> list[dict[str, Any]]:
        """The layouts' placements as scenario placements (what ``moesim validate`` and the planner check)."""
        return [{"name": lay.name, "policy": "contiguous" if lay.placement == "everywhere" else lay.placement,
                 **lay.options} for lay in self.layouts]
