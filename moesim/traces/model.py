"""The shape of an MoE model: what routing traces refer to and what expert compute costs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelSpec(BaseModel):
    """MoE layers only: ``num_layers`` counts MoE layers; dense layers and shared experts are ignored
    except for the per-layer non-expert work (attention projections) charged to every token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "moe"
    num_layers: int = Field(ge=1, description="MoE layers")
    num_experts: int = Field(ge=1, description="routed experts per layer")
    top_k: int = Field(ge=1)
    d_model: int = Field(ge=1, description="hidden size")
    d_ff: int = Field(ge=1, description="expert FFN intermediate size (SwiGLU: three d_model x d_ff matrices)")
    dtype_bytes: float = Field(default=2, gt=0, description="bytes per weight and activation element")
    dispatch_bytes_per_token: float | None = Field(default=None, gt=0,
                                                   description="bytes per dispatched token copy (default d_model x dtype_bytes)")
    combine_bytes_per_token: float | None = Field(default=None, gt=0,
                                                  description="bytes per combined token copy (default d_model x dtype_bytes)")
    dense_flops_per_token: float | None = Field(default=None, ge=0,
                                                description="non-expert FLOPs per token per layer (default 8 d_model^2, attention projections)")
    dense_weight_bytes: float | None = Field(default=None, ge=0,
                                             description="non-expert weight bytes per layer (default 4 d_model^2 x dtype_bytes)")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self

    @property
    def expert_weight_bytes(self) -> float:
        return 3 * self.d_model * self.d_ff * self.dtype_bytes

    @property
    def dispatch_bytes(self) -> float:
        return self.dispatch_bytes_per_token or self.d_model * self.dtype_bytes

    @property
    def combine_bytes(self) -> float:
        return self.combine_bytes_per_token or self.d_model * self.dtype_bytes

    @property
    def dense_flops(self) -> float:
        return 8.0 * self.d_model**2 if self.dense_flops_per_token is None else self.dense_flops_per_token

    @property
    def dense_bytes(self) -> float:
        return 4.0 * self.d_model**2 * self.dtype_bytes if self.dense_weight_bytes is None else self.dense_weight_bytes
