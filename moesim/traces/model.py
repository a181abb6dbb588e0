"""The shape of an MoE model: what routing traces refer to and what expert compute costs."""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from moesim.loaders import NoBoolNumbers

# Sanity bounds: far beyond any model, small enough that sizes multiply without overflow (memory and time are
# then the study's own check, moesim.study.sizes).
MAX_LAYERS = 10_000  # a hundred times the MoE layers of any model so far
MAX_EXPERTS = 1_000_000
MAX_DIM = 10_000_000


class ModelSpec(NoBoolNumbers):
    """MoE layers only: ``num_layers`` counts MoE layers; dense layers and shared experts are ignored
    except for the per-layer non-expert work charged to every token: the attention projections and, when
    the attention shape (``num_heads``) is given and the workload says how long the sequences are, the
    attention core (:func:`moesim.sim.compute.attention_time`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "moe"
    num_layers: int = Field(ge=1, le=MAX_LAYERS, description="MoE layers")
    num_experts: int = Field(ge=1, le=MAX_EXPERTS, description="routed experts per layer")
    top_k: int = Field(ge=1, le=MAX_EXPERTS)
    d_model: int = Field(ge=1, le=MAX_DIM, description="hidden size")
    d_ff: int = Field(ge=1, le=MAX_DIM, description="expert FFN intermediate size (SwiGLU: three d_model x d_ff "
                                                     "matrices)")
    dtype_bytes: float = Field(default=2, ge=0.125, le=16, description="bytes per weight and activation element")
    dispatch_bytes_per_token: float | None = Field(
        default=None, gt=0, le=1e12, description="bytes per dispatched token copy (default d_model x dtype_bytes)")
    combine_bytes_per_token: float | None = Field(
        default=None, gt=0, le=1e12, description="bytes per combined token copy (default d_model x dtype_bytes)")
    dense_flops_per_token: float | None = Field(
        default=None, ge=0, le=1e18, description="non-expert FLOPs per token per layer (default: the attention "
                                                 "projections, 2 FLOPs per weight; 8 d_model^2 without num_heads)")
    dense_weight_bytes: float | None = Field(
        default=None, ge=0, le=1e18, description="non-expert weight bytes per layer (default: the attention "
                                                 "projections; 4 d_model^2 x dtype_bytes without num_heads)")
    num_heads: int | None = Field(default=None, ge=1, le=MAX_DIM, description="attention query heads (enables the "
                                  "attention core; projections then follow the GQA shape)")
    num_kv_heads: int | None = Field(default=None, ge=1, le=MAX_DIM, description="key/value heads (default num_heads)")
    head_dim: int | None = Field(default=None, ge=1, le=MAX_DIM,
                                 description="per-head size (default d_model / num_heads)")
    sliding_window: int | None = Field(default=None, ge=1, le=2**31 - 1,
                                       description="attention window in tokens (Mixtral: 4096)")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        given = [k for k in ("num_kv_heads", "head_dim", "sliding_window") if getattr(self, k) is not None]
        if self.num_heads is None and given:
            raise ValueError(f"{given[0]} needs num_heads")
        if self.num_heads is not None:
            if self.num_heads % self.kv_heads:
                raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads ({self.num_heads})")
            if self.head_dim is None and self.d_model % self.num_heads:
                raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model}), or give head_dim")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads or 1

    @property
    def head_size(self) -> int:
        return self.head_dim or (self.d_model // self.num_heads if self.num_heads else self.d_model)

    @property
    def projection_params(self) -> float:
        """Attention projection weights per layer: Q, K, V and O (GQA); ``4 d_model^2`` without a head shape."""
        if self.num_heads is None:
            return 4.0 * self.d_model**2
        q = self.num_heads * self.head_size
        return self.d_model * (2 * q + 2 * self.kv_heads * self.head_size)

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
        return 2.0 * self.projection_params if self.dense_flops_per_token is None else self.dense_flops_per_token

    @property
    def dense_bytes(self) -> float:
        return self.projection_params * self.dtype_bytes if self.dense_weight_bytes is None else self.dense_weight_bytes
